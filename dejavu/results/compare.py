"""``dejavu compare``: runs side by side, bar charts per metric, and whether their outputs are identical.

Inputs are run folders (holding ``summary.json``), sweep folders (holding ``sweep_index.json``, or just
run folders somewhere below), or a W&B group pulled online.

``sweep_index.json`` (written by ``write_sweep_index``, which the Hydra runner calls after a multirun)::

    {"format": "dejavu-sweep-index/1",
     "runs": [{"run_dir": "0",                      # relative to the sweep folder
               "overrides": ["topology=baseline", "workload.rps=1"],
               "summary": {"throughput/requests_per_s": 1.9, ..., "outputs_sha256": "ab12..."}}, ...]}

``overrides`` come from the run's ``.hydra/overrides.yaml`` (Hydra writes it) unless given; ``summary``
holds the key metrics of ``KEY_METRICS``, flattened with '/'.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .metrics import flatten, unflatten
from .scrub import scrub
from .writer import SUMMARY, load_summary

SWEEP_INDEX = "sweep_index.json"
FAILED_POINT = "failed.json"  # written in a sweep point's folder when that point failed (runners/app.py)
SWEEP_INDEX_FORMAT = "dejavu-sweep-index/1"

# (row label, flattened summary key)
KEY_METRICS: list[tuple[str, str]] = [
    ("requests completed", "counts/completed"),
    ("requests failed", "counts/failed"),
    ("requests unfinished", "counts/unfinished"),
    ("throughput req/s", "throughput/requests_per_s"),
    ("throughput tok/s", "throughput/output_tokens_per_s"),
    ("TTFT p50 s", "ttft_s/p50"),
    ("TTFT p99 s", "ttft_s/p99"),
    ("TPOT p50 s", "tpot_s/p50"),
    ("latency p50 s", "latency_s/p50"),
    ("latency p99 s", "latency_s/p99"),
    ("norm. latency p50 s/tok", "normalized_latency_s/p50"),
    ("norm. latency p99 s/tok", "normalized_latency_s/p99"),
    ("bubble fraction (mean)", "bubble_fraction_mean"),
    ("makespan s", "makespan_s"),
]
# Shown when a run has them (summary.json: kv_memory; microbatch swapping).
KV_METRICS: list[tuple[str, str]] = [
    ("peak device KV bytes (max)", "kv_memory/peak_device_kv_bytes_max"),
    ("host swap bytes (total)", "kv_memory/swap/peak_host_swap_bytes_total"),
    ("swaps", "kv_memory/swap/count"),
    ("swap s", "kv_memory/swap/seconds"),
    ("swap hidden share", "kv_memory/swap/hidden_share"),
    ("swap / step (worst stage)", "kv_memory/swap/swap_to_step_max"),
]
# Shown when a run survived failures (summary.json: recovery).
FT_METRICS: list[tuple[str, str]] = [
    ("failures", "recovery/failures"),
    ("detection s (mean)", "recovery/detection_s_mean"),
    ("recovery s (mean)", "recovery/recovery_s_mean"),
    ("downtime s (total)", "recovery/downtime_s_total"),
    ("tokens recomputed", "recovery/tokens_recomputed"),
    ("replication bytes", "recovery/replication_bytes"),
    ("replication s", "recovery/replication_s"),
]
DIGEST = "outputs_sha256"


@dataclass
class RunSummary:
    label: str
    source: str  # folder path or W&B URL
    summary: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    @property
    def flat(self) -> dict[str, Any]:
        return flatten(self.summary)


@dataclass
class CompareResult:
    runs: list[RunSummary]
    table: str
    same_outputs: bool | None  # None when fewer than two runs carry a digest
    digest_groups: dict[str, list[str]]  # digest -> run letters
    plots: list[Path]


# ------------------------------------------------------------------------------------------ sweeps

def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.as_posix())]


def _run_dirs_under(folder: Path) -> list[Path]:
    """Run folders under ``folder``: those with a summary, and sweep points that failed before writing one."""
    found = {s.parent for name in (SUMMARY, FAILED_POINT) for s in folder.rglob(name)
             if "wandb" not in s.relative_to(folder).parts}
    return sorted(found, key=lambda p: _natural_key(p.relative_to(folder)))


def failed_points(sweep_dir: str | Path) -> list[dict]:
    """The sweep index's entries of points that failed (each with its exit code and reason)."""
    index = json.loads((Path(sweep_dir) / SWEEP_INDEX).read_text())
    return [r for r in index["runs"] if r.get("failed")]


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) or []]


def key_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten(summary)
    keys = [k for _, k in KEY_METRICS] + [k for _, k in FT_METRICS if k in flat] + [DIGEST]
    return {k: flat.get(k) for k in keys}


def write_sweep_index(sweep_dir: str | Path, overrides: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Scan ``sweep_dir`` for run folders (any depth, holding ``summary.json``) and write the index.

    ``overrides`` maps a run folder (relative to ``sweep_dir``) to its overrides; by default they are read
    from Hydra's ``.hydra/overrides.yaml`` in each run folder. Returns the index file's path.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder '{sweep_dir}' does not exist")
    runs = []
    for run_dir in _run_dirs_under(sweep_dir):
        rel = run_dir.relative_to(sweep_dir).as_posix()
        ov = list(overrides[rel]) if overrides is not None and rel in overrides else _hydra_overrides(run_dir)
        entry = {"run_dir": rel, "overrides": scrub(ov),
                 "summary": key_metrics(load_summary(run_dir)) if (run_dir / SUMMARY).exists() else {}}
        if (run_dir / FAILED_POINT).exists():
            entry["failed"] = json.loads((run_dir / FAILED_POINT).read_text())
        runs.append(entry)
    path = sweep_dir / SWEEP_INDEX
    path.write_text(json.dumps({"format": SWEEP_INDEX_FORMAT, "runs": runs}, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------- loading

def load_runs(path: str | Path) -> list[RunSummary]:
    """The runs of one run folder or sweep folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist (expected a run folder or a sweep folder)")
    if (path / SUMMARY).exists():
        return [RunSummary(path.name or str(path), str(path), load_summary(path), _hydra_overrides(path))]
    index = path / SWEEP_INDEX
    if index.exists():
        try:
            entries = json.loads(index.read_text())["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"'{index}' is not a sweep index ({e}); regenerate it with write_sweep_index") from None
        runs = []
        for e in entries:
            run_dir = path / e["run_dir"]
            if e.get("failed") and not (run_dir / SUMMARY).exists():
                continue  # a point that failed before serving anything has no numbers to compare
            # The full summary when the folder is still there, else the key metrics kept in the index.
            summary = load_summary(run_dir) if (run_dir / SUMMARY).exists() else unflatten(e.get("summary", {}))
            label = " ".join(e.get("overrides") or []) or e["run_dir"]
            runs.append(RunSummary(label, str(run_dir), summary, list(e.get("overrides") or [])))
        return runs
    run_dirs = _run_dirs_under(path)
    if not run_dirs:
        raise FileNotFoundError(f"no {SUMMARY} or {SWEEP_INDEX} in or under '{path}'")
    return [RunSummary(" ".join(ov) or d.relative_to(path).as_posix(), str(d), load_summary(d), ov)
            for d in run_dirs for ov in [_hydra_overrides(d)]]


def pull_wandb(project: str, group: str, entity: str | None = None) -> list[RunSummary]:
    """The runs of a W&B group, online (needs a key; we never handle it, wandb finds it)."""
    from .wandb_log import has_api_key

    if not has_api_key():
        raise RuntimeError("pulling runs from W&B needs an API key: export WANDB_API_KEY or run `wandb login`")
    import wandb

    api = wandb.Api()
    runs = api.runs(f"{entity}/{project}" if entity else project, filters={"group": group})
    out = [RunSummary(r.name, r.url, unflatten({k: v for k, v in dict(r.summary).items() if not k.startswith("_")}))
           for r in runs]
    if not out:
        raise LookupError(f"no W&B runs in project '{project}' with group '{group}'")
    return out


# ------------------------------------------------------------------------------------------ output

def _letter(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metric_rows(runs: Sequence[RunSummary]) -> list[tuple[str, str]]:
    flats = [r.flat for r in runs]
    kv = [(label, key) for label, key in KV_METRICS if any(key in f for f in flats)]
    ft = [(label, key) for label, key in FT_METRICS if any(key in f for f in flats)]
    return KEY_METRICS + kv + ft


def render_table(runs: Sequence[RunSummary]) -> str:
    flats = [r.flat for r in runs]
    letters = [_letter(i) for i in range(len(runs))]
    rows = [[label, *(_fmt(f.get(key)) for f in flats)] for label, key in metric_rows(runs)]
    rows.append([DIGEST, *((f.get(DIGEST) or "-")[:12] for f in flats)])
    header = ["metric", *letters]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    legend = [f"{l} = {r.label}" + (f"  ({r.source})" if r.source != r.label else "") for l, r in zip(letters, runs)]
    return "\n".join([*legend, "", line(header), line(["-" * w for w in widths]), *map(line, rows)])


def digest_groups(runs: Sequence[RunSummary]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for i, r in enumerate(runs):
        d = r.summary.get(DIGEST)
        if d:
            groups.setdefault(d, []).append(_letter(i))
    return groups


def digest_report(runs: Sequence[RunSummary]) -> tuple[bool | None, str]:
    groups = digest_groups(runs)
    missing = [_letter(i) for i, r in enumerate(runs) if not r.summary.get(DIGEST)]
    note = f" (no digest: {', '.join(missing)})" if missing else ""
    if sum(len(g) for g in groups.values()) < 2:
        return None, f"{DIGEST}: fewer than two runs to compare{note}"
    if len(groups) == 1:
        d, letters = next(iter(groups.items()))
        return True, f"{DIGEST}: IDENTICAL across {', '.join(letters)} ({d[:16]}...){note}"
    parts = "; ".join(f"{', '.join(ls)} = {d[:16]}..." for d, ls in groups.items())
    return False, f"{DIGEST}: DIFFER — {parts}{note}"


def write_plots(runs: Sequence[RunSummary], out: Path) -> list[Path]:
    """One bar chart per metric that any run has a number for."""
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    flats = [r.flat for r in runs]
    letters = [_letter(i) for i in range(len(runs))]
    paths = []
    for label, key in metric_rows(runs):
        vals = [f.get(key) for f in flats]
        if not any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            continue
        fig = Figure(figsize=(max(4.0, 0.9 * len(runs) + 2), 3.2), layout="constrained")
        ax = fig.subplots()
        nums = [float(v) if isinstance(v, (int, float)) else 0.0 for v in vals]
        bars = ax.bar(letters, nums, color="tab:blue")
        ax.bar_label(bars, labels=[_fmt(v) for v in vals], fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("run (see the table's legend)")
        ax.grid(axis="y", alpha=0.3)
        path = out / f"compare_{re.sub(r'[^A-Za-z0-9]+', '_', key).strip('_')}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    (out / "legend.txt").write_text("".join(f"{l} = {r.label}  ({r.source})\n" for l, r in zip(letters, runs)))
    return paths


def compare(paths: Sequence[str | Path] = (), *, out: str | Path | None = None, wandb_group: str | None = None,
            wandb_project: str | None = None, wandb_entity: str | None = None,
            stream=None) -> CompareResult:
    """Load every run of ``paths`` (and of a W&B group, online), print the table and the digest verdict to
    ``stream`` (stdout by default; None output with ``stream=False``), and write plots into ``out``."""
    runs: list[RunSummary] = []
    for p in paths:
        runs.extend(load_runs(p))
    if wandb_group:
        if not wandb_project:
            raise ValueError("--wandb-group needs --wandb-project")
        runs.extend(pull_wandb(wandb_project, wandb_group, wandb_entity))
    if not runs:
        raise ValueError("nothing to compare: give run or sweep folders, or --wandb-group with --wandb-project")
    table = render_table(runs)
    same, verdict = digest_report(runs)
    plots = write_plots(runs, Path(out)) if out is not None else []
    if stream is not False:
        stream = stream or sys.stdout
        stream.write(f"{table}\n\n{verdict}\n")
        if plots:
            stream.write(f"plots: {Path(out)}/ ({len(plots)} charts)\n")
    return CompareResult(runs, table, same, digest_groups(runs), plots)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dejavu compare",
                                 description="Compare runs side by side and check whether their outputs match.")
    ap.add_argument("paths", nargs="*", metavar="RUN_OR_SWEEP_DIR")
    ap.add_argument("--out", help="folder for the comparison plots (default: PATH/compare for one path, "
                                  "./compare otherwise)")
    ap.add_argument("--no-plots", action="store_true", help="print the table only")
    ap.add_argument("--wandb-group", help="also pull the runs of this W&B group (online; needs a key)")
    ap.add_argument("--wandb-project", help="W&B project of --wandb-group")
    ap.add_argument("--wandb-entity", help="W&B entity (user or team); default: the key's own")
    ap.add_argument("--expect-same", action="store_true",
                    help="exit with status 1 unless every run's outputs_sha256 is the same")
    args = ap.parse_args(argv)
    if not args.paths and not args.wandb_group:
        ap.error("give at least one RUN_OR_SWEEP_DIR, or --wandb-group with --wandb-project")
    out = None if args.no_plots else (args.out or (Path(args.paths[0]) / "compare" if len(args.paths) == 1
                                                   else Path("compare")))
    try:
        result = compare(args.paths, out=out, wandb_group=args.wandb_group, wandb_project=args.wandb_project,
                         wandb_entity=args.wandb_entity)
    except (FileNotFoundError, ValueError, RuntimeError, LookupError) as e:
        print(f"dejavu compare: error: {e}", file=sys.stderr)
        return 2
    return 1 if args.expect_same and result.same_outputs is False else 0


if __name__ == "__main__":
    sys.exit(main())
