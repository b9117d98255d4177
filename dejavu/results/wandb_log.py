"""Logging a finished run's folder to Weights & Biases.

Offline by default: the run lands under ``<run_dir>/wandb/offline-run-*/`` and can be uploaded later
with ``wandb sync``. Online needs a key that wandb finds itself (``WANDB_API_KEY`` or ``wandb login``'s
netrc entry); we never read, pass or write it. The config and summary go through ``scrub`` first, and
wandb's own metadata capture (command line, git remote, environment facts) is switched off, so a key
given on a command line or inside a URL cannot reach the files either.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .metrics import flatten, per_request
from .scrub import scrub
from .writer import PLOTS, load_records

MODES = ("offline", "online", "disabled")
WANDB_SUBDIR = "wandb"


@dataclass
class WandbRun:
    id: str
    dir: Path | None  # the offline/online run's local folder (holds run-<id>.wandb and files/)
    url: str | None  # online only
    mode: str


def has_api_key() -> bool:
    """Whether wandb could find a key (env or netrc), asked without prompting and without reading it out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk.lib import apikey

        return bool(apikey.api_key())
    except Exception:  # noqa: BLE001 — an older wandb layout: fall back to the netrc check alone
        import netrc

        try:
            return netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            return False


def _reinit_arg() -> Any:
    import wandb

    major, minor = (int(x) for x in re.findall(r"\d+", wandb.__version__)[:2])
    return "create_new" if (major, minor) >= (0, 19) else True


def request_table(run_dir: Path):
    """The per-request table: ids, status, sizes, timings and the decoded text when there is one."""
    import wandb

    cols = ["id", "status", "prompt_tokens", "output_tokens", "arrival_s", "first_token_s", "finish_s",
            "ttft_s", "latency_s", "tpot_s", "normalized_latency_s", "text", "error"]
    table = wandb.Table(columns=cols)
    for r in load_records(run_dir):
        d = per_request(r)
        table.add_data(r.id, r.status, len(r.prompt_ids), len(r.output_ids), r.arrival_s, r.first_token_s,
                       r.finish_s, d["ttft_s"], d["latency_s"], d["tpot_s"], d["normalized_latency_s"],
                       r.text, r.error)
    return table


def log_run(run_dir: str | Path, summary: Mapping[str, Any] | None = None, config: Any = None, *,
            mode: str = "offline", project: str = "dejavu", group: str | None = None, name: str | None = None,
            tags: Sequence[str] = (), entity: str | None = None, dir: str | Path | None = None,
            artifact: bool = True) -> WandbRun | None:
    """Log a results folder: config, summary (flattened with '/'), per-request table, plots, and the
    folder itself as an artifact. ``summary``/``config`` default to the folder's ``summary.json`` and
    ``config.yaml``. ``group`` ties the points of a sweep together. Returns None when disabled."""
    if mode not in MODES:
        raise ValueError(f"logger mode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "disabled":
        return None
    if mode == "online" and not has_api_key():
        raise RuntimeError("W&B online logging needs an API key: export WANDB_API_KEY or run `wandb login` "
                           "first, or log offline (logger mode 'offline') and `wandb sync` later")
    import wandb
    from omegaconf import OmegaConf

    from .writer import CONFIG, plain_config

    run_dir = Path(run_dir)
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text())
    if config is None and (run_dir / CONFIG).exists():
        config = OmegaConf.load(run_dir / CONFIG)
    wandb_dir = Path(dir) if dir is not None else run_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)

    settings = wandb.Settings(console="off", disable_git=True, save_code=False, x_disable_meta=True,
                              x_disable_stats=True, silent=True)
    run = wandb.init(mode=mode, project=project, entity=entity, group=group, name=name or run_dir.name,
                     tags=list(tags) or None, dir=str(wandb_dir), config=plain_config(config),
                     settings=settings, reinit=_reinit_arg())
    try:
        run.summary.update(flatten(scrub(dict(summary))))
        payload: dict[str, Any] = {"requests": request_table(run_dir)}
        if summary.get("failures"):  # one row per failure generation (fault-tolerant runs)
            cols = [k for k in summary["failures"][0] if not isinstance(summary["failures"][0][k], (dict,))]
            payload["failures"] = wandb.Table(columns=cols, data=[[str(f.get(c)) if isinstance(f.get(c), list)
                                                                  else f.get(c) for c in cols]
                                                                 for f in summary["failures"]])
        for png in sorted((run_dir / PLOTS).glob("*.png")):
            payload[f"plots/{png.stem}"] = wandb.Image(str(png))
        run.log(payload)
        if artifact:
            art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", f"run-{run.name or run.id}"), type="dejavu-run",
                                 description=f"results folder {run_dir.name}")
            for f in sorted(run_dir.rglob("*")):
                rel = f.relative_to(run_dir)
                # Skip W&B's own folder (the live run writes there) and hidden paths: our temporaries, and
                # .hydra/, whose raw command-line overrides are not scrubbed (config.yaml is, and resolved).
                if f.is_file() and rel.parts[0] != WANDB_SUBDIR and not any(p.startswith(".") for p in rel.parts) \
                        and (wandb_dir == run_dir or wandb_dir not in f.parents):
                    art.add_file(str(f), name=str(rel))
            run.log_artifact(art)
        info = WandbRun(id=run.id, dir=Path(run.dir).parent if run.dir else None,
                        url=run.url if mode == "online" else None, mode=mode)
    finally:
        run.finish()
        _close_service()
    return info


def _close_service() -> None:
    """Wait until wandb-core has closed the run, so its ``run-<id>.wandb`` file is whole on return.

    ``run.finish()`` returns once the exit record is handled, but wandb-core keeps the transaction log
    in a buffered writer that is flushed only when the run's stream closes, and ``finish`` asks for that
    close without waiting for it. Under CPU load a reader (``wandb sync``, a test, a copy) could find the
    file still holding only its 7-byte header. ``wandb.teardown()`` closes every stream and waits for the
    service process to exit; it also drops the ``WANDB_SERVICE`` token wandb put in ``os.environ``, which
    our child processes would otherwise inherit and attach to. A caller's own run still open in this
    process keeps the service up (teardown would finish that run): then the file is completed later."""
    import wandb

    wl = wandb.setup()
    if getattr(wl, "most_recent_active_run", wandb.run) is not None:
        return
    try:
        wandb.teardown()
    except SystemExit as e:  # wandb exits the process when wandb-core ended badly; a library must not
        raise RuntimeError(f"wandb-core exited with code {e.code} while closing the run") from None
