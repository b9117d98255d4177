"""PNG plots of one run: latency CDFs, throughput over time, per-worker busy/bubble bars.

Built on ``matplotlib.figure.Figure`` directly (no pyplot): it renders with the Agg canvas, touches no
global backend state and so is safe inside the controller or a Hydra job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..records import RequestRecord
from .metrics import BUSY_KINDS, as_records, per_request

_KIND_COLORS = {"prefill": "tab:orange", "decode": "tab:blue", "send": "tab:green", "recv": "tab:olive",
                "stream": "tab:purple"}


def _cdf(ax, values: Sequence[float], label: str) -> None:
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size:
        # Start at (first value, 0) so the curve visibly rises from zero.
        ax.step(np.concatenate([v[:1], v]), np.arange(v.size + 1) / v.size, where="post", label=label)


def latency_cdf(records: Sequence[RequestRecord], path: Path) -> Path:
    derived = [per_request(r) for r in records]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    panels = (("latency_s", "end-to-end latency (s)"), ("ttft_s", "time to first token (s)"),
              ("normalized_latency_s", "normalized latency (s / token)"))
    for ax, (key, title) in zip(fig.subplots(1, 3), panels):
        vals = [d[key] for d in derived if d[key] is not None]
        _cdf(ax, vals, key)
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if not vals:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=100)
    return path


def throughput_over_time(records: Sequence[RequestRecord], path: Path, bins: int = 40) -> Path:
    """Completed requests (cumulative) and output tokens/s per time bin.

    Records carry first- and last-token times only, so a request's tokens after the first are spread
    evenly over [first_token_s, finish_s] — exact in total, approximate in shape.
    """
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_req, ax_tok = fig.subplots(1, 2)
    ends = [r.finish_s for r in records if r.finish_s is not None] + \
           [r.first_token_s for r in records if r.first_token_s is not None]
    start = min((r.arrival_s for r in records), default=0.0)
    end = max(ends, default=start)
    if end > start:
        done = np.sort([r.finish_s for r in records if r.status == "ok" and r.finish_s is not None])
        ax_req.step(np.concatenate([[start], done]), np.arange(done.size + 1), where="post")
        edges = np.linspace(start, end, bins + 1)
        tokens = np.zeros(bins)
        for r in records:
            n = len(r.output_ids)
            if n == 0 or r.first_token_s is None:
                continue
            tokens[min(np.searchsorted(edges, r.first_token_s, side="right") - 1, bins - 1)] += 1
            if n > 1 and r.finish_s is not None and r.finish_s > r.first_token_s:
                lo = np.clip(edges[:-1], r.first_token_s, r.finish_s)
                hi = np.clip(edges[1:], r.first_token_s, r.finish_s)
                tokens += (n - 1) * (hi - lo) / (r.finish_s - r.first_token_s)
        width = edges[1] - edges[0]
        ax_tok.bar(edges[:-1], tokens / width, width=width, align="edge")
    ax_req.set(xlabel="time (s)", ylabel="completed requests", title="requests completed")
    ax_tok.set(xlabel="time (s)", ylabel="output tokens / s", title="token throughput")
    for ax in (ax_req, ax_tok):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def stage_timeline(workers: Mapping[str, Mapping[str, Any]], span_s: float, path: Path) -> Path:
    """One horizontal bar per worker: seconds of each busy kind as fractions of the span, then the bubble."""
    names = sorted(workers, key=int)
    fig = Figure(figsize=(9, 1.2 + 0.45 * max(len(names), 1)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    if names and span_s > 0:
        # The kinds may overlap in time (transfers under compute), so they are drawn scaled into the
        # busy fraction — the bar's busy part is exact, its split across kinds proportional.
        left = np.zeros(len(names))
        total = np.array([sum(workers[w]["seconds_by_kind"].get(k, 0.0) for k in BUSY_KINDS) for w in names])
        busy = np.array([workers[w]["busy_fraction"] for w in names])
        for kind in BUSY_KINDS:
            raw = np.array([workers[w]["seconds_by_kind"].get(kind, 0.0) for w in names])
            part = np.divide(raw, total, out=np.zeros_like(raw), where=total > 0) * busy
            if part.any():  # only kinds that occur get a legend entry
                ax.barh(y, part, left=left, color=_KIND_COLORS[kind], label=kind)
            left += part
        ax.barh(y, [workers[w]["bubble_fraction"] for w in names], left=left, color="lightgrey",
                label="bubble", hatch="//", edgecolor="grey")
        for yi, w in zip(y, names):
            ax.text(1.01, yi, f"{workers[w]['bubble_fraction']:.0%} idle", va="center", fontsize=8)
    ax.set_yticks(y, [f"w{w} {workers[w]['stage']} tp{workers[w]['tp_rank']}" for w in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(f"fraction of the run's span ({span_s:.3g} s)")
    ax.set_title("per-worker busy time and bubbles")
    if names:
        fig.legend(loc="outside lower center", fontsize=8, ncols=len(BUSY_KINDS) + 1)
    fig.savefig(path, dpi=100)
    return path


def latency_vs_arrival(records: Sequence[RequestRecord], failures: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Each request's end-to-end latency against its arrival, failures marked (the paper's Figures 10/11)."""
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    done = [r for r in records if r.finish_s is not None]
    ax.scatter([r.arrival_s for r in done], [r.finish_s - r.arrival_s for r in done], s=12, label="request")
    for i, f in enumerate(failures):
        at = f.get("injected_s") if f.get("injected_s") is not None else f.get("detected_s")
        if at is not None:
            ax.axvline(at, color="tab:red", ls="--", lw=1, label="failure" if i == 0 else None)
        if f.get("resumed_s") is not None:
            ax.axvline(f["resumed_s"], color="tab:green", ls=":", lw=1, label="serving resumes" if i == 0 else None)
    ax.set(xlabel="arrival (s)", ylabel="latency (s)", title="latency by arrival" + (f", {len(failures)} failure(s)"
                                                                                     if failures else ""))
    ax.grid(alpha=0.3)
    if done or failures:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def write_plots(plot_dir: str | Path, records: Iterable[RequestRecord | Mapping[str, Any]],
                summary: Mapping[str, Any]) -> list[Path]:
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    recs = as_records(records)
    span = summary["span_s"]["end"] - summary["span_s"]["start"]
    return [latency_cdf(recs, plot_dir / "latency_cdf.png"),
            throughput_over_time(recs, plot_dir / "throughput.png"),
            stage_timeline(summary["workers"], span, plot_dir / "stage_timeline.png"),
            latency_vs_arrival(recs, [f for f in summary.get("failures") or [] if isinstance(f, Mapping)]
                               if isinstance(summary.get("failures"), list) else [],
                               plot_dir / "latency_vs_arrival.png")]
