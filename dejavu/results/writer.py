"""The results folder of one run.

    config.yaml      the resolved config (secrets scrubbed)
    requests.jsonl   one RequestRecord per line, in id order (``RequestRecord.from_dict`` reads it back)
    events.jsonl     one StageEvent per line (the raw timeline, for re-plotting)
    trace.json       Chrome trace of every worker's timeline, bubbles shown as ``idle``
    summary.json     metrics (see ``metrics.py``) and ``outputs_sha256``
    plots/*.png      latency CDF, throughput over time, per-worker busy/bubble bars

Process logs are written into the same folder by the runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..records import RequestRecord, StageEvent
from .metrics import as_events, as_records, summarize
from .scrub import scrub
from .trace import write_trace

CONFIG = "config.yaml"
REQUESTS = "requests.jsonl"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"
TRACE = "trace.json"
PLOTS = "plots"


def _atomic_write(path: Path, text: str) -> None:
    # A run killed while writing leaves the previous file or none, never half a JSON document.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plain_config(config: Any) -> Any:
    """A dict/DictConfig/dataclass as plain YAML-able values, interpolations resolved, secrets scrubbed."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if config is None:
        return {}
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)

    def plain(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {(k if isinstance(k, (str, int)) else str(k)): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple, set)):
            return [plain(v) for v in x]
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        return str(x)  # Path, enum, dtype ...

    # Through OmegaConf once more so that ${...} interpolations inside a plain dict are resolved too.
    resolved = OmegaConf.to_container(OmegaConf.create(plain(config)), resolve=True)
    return scrub(resolved)


def write_config(run_dir: str | Path, config: Any) -> Path:
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, OmegaConf.to_yaml(OmegaConf.create(plain_config(config))))
    return path


def write_results(run_dir: str | Path, records: Iterable[RequestRecord | Mapping[str, Any]],
                  events: Iterable[StageEvent | Mapping[str, Any]], worker_stats: Any, config: Any,
                  extra: Mapping[str, Any] | None = None, *, plots: bool = True) -> dict[str, Any]:
    """Write the whole results folder and return the summary.

    ``worker_stats``: a list of ``WorkerStats`` (or their dicts), or a mapping rank -> stats dict, or
    None. ``extra``: more top-level summary keys (e.g. ``failures``: detection/recovery times, tokens
    recomputed); a key that collides with a computed one is an error.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recs, evs = as_records(records), as_events(events)
    summary = scrub(summarize(recs, evs, worker_stats, extra))

    write_config(run_dir, config)
    _atomic_write(run_dir / REQUESTS, "".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    _atomic_write(run_dir / EVENTS, "".join(json.dumps(e.to_dict()) + "\n" for e in evs))
    span = (summary["span_s"]["start"], summary["span_s"]["end"])
    write_trace(run_dir / TRACE, evs, span, {"failures": summary["failures"]} if isinstance(summary.get("failures"), list) else None)
    _atomic_write(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    if plots:  # last: the numbers are on disk even if plotting fails
        from .plots import write_plots

        write_plots(run_dir / PLOTS, recs, summary)
    return summary


# Reading a folder back -------------------------------------------------------------------------

def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FileNotFoundError(f"no readable {SUMMARY} in '{run_dir}': {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno})") from None


def load_records(run_dir: str | Path) -> list[RequestRecord]:
    path = Path(run_dir) / REQUESTS
    if not path.exists():
        return []
    return [RequestRecord.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def load_events(run_dir: str | Path) -> list[StageEvent]:
    path = Path(run_dir) / EVENTS
    if not path.exists():
        return []
    return [StageEvent.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
