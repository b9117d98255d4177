"""Every split of D machines over a range of arrival rates (``dejavu simulate --sweep``; paper App. B).

For each split (the baseline on D machines, and M prompt + D-M token machines for every M) and each
Poisson rate, one simulation; the table and the PNG show throughput, p50 normalized latency and the cost
of a request (machine-seconds, or money with a price per machine-hour) against the rate, with the
planner's pick marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .costs import Costs
from .engine import SimRequest, SimSetup, simulate


@dataclass(frozen=True)
class Split:
    prompt: int
    token: int

    @property
    def label(self) -> str:
        return f"baseline {self.token}" if self.prompt == 0 else f"disagg {self.prompt}+{self.token}"


@dataclass
class SweepPoint:
    split: Split
    rate: float
    requests_per_s: float | None
    tokens_per_s: float | None
    latency_p50_s: float | None
    normalized_p50_s: float | None
    ttft_p50_s: float | None
    cost_per_request: float | None  # machine-seconds (or money) per request


def all_splits(machines: int, num_layers: int) -> list[Split]:
    out = [Split(0, machines)] if machines <= num_layers else []
    out += [Split(m, machines - m) for m in range(1, machines) if m <= num_layers and machines - m <= num_layers]
    return out


def run_sweep(splits: Sequence[Split], rates: Sequence[float], requests_at: Callable[[float], list[SimRequest]],
              costs_for: Callable[[Split], Costs], ubatch_size: int, *, price_per_hour: float | None = None,
              setup_kw: dict | None = None, log: Callable[[str], None] | None = None) -> list[SweepPoint]:
    points = []
    for rate in rates:
        reqs = requests_at(rate)
        for sp in splits:
            r = simulate(reqs, SimSetup(sp.prompt, sp.token, ubatch_size, costs_for(sp), trace=False, **(setup_kw or {})))
            s = r.summary
            rps = s["throughput"]["requests_per_s"]
            machines = sp.prompt + sp.token
            per_req = machines / rps if rps else None  # machine-seconds per request
            cost = per_req * price_per_hour / 3600 if per_req is not None and price_per_hour else per_req
            points.append(SweepPoint(sp, rate, rps, s["throughput"]["output_tokens_per_s"], s["latency_s"]["p50"],
                                     s["normalized_latency_s"]["p50"], s["ttft_s"]["p50"], cost))
            if log:
                log(f"  rate {rate:g}/s {sp.label:<14} {rps or 0:8.3f} req/s  p50 latency {s['latency_s']['p50'] or 0:.3g} s")
    return points


def sweep_table(points: Sequence[SweepPoint], pick: Split | None, price_per_hour: float | None) -> str:
    cost_name = "cost/1k req" if price_per_hour else "machine-s/req"
    lines = [f"{'rate/s':>8}  {'split':<16} {'req/s':>9} {'tok/s':>10} {'p50 lat s':>10} {'p50 norm':>10} "
             f"{'p50 TTFT':>9} {cost_name:>13}"]
    for p in points:
        mark = " *" if pick is not None and p.split == pick else ""
        cost = p.cost_per_request * (1000 if price_per_hour else 1) if p.cost_per_request is not None else None
        lines.append(f"{p.rate:>8.3g}  {p.split.label + mark:<16} {_n(p.requests_per_s):>9} {_n(p.tokens_per_s):>10} "
                     f"{_n(p.latency_p50_s):>10} {_n(p.normalized_p50_s):>10} {_n(p.ttft_p50_s):>9} {_n(cost):>13}")
    if pick is not None:
        lines.append(f"* the planner's pick ({pick.label})")
    return "\n".join(lines)


def _n(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def plot_sweep(points: Sequence[SweepPoint], path: Path, *, pick: Split | None, title: str,
               price_per_hour: float | None) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    splits = list(dict.fromkeys(p.split for p in points))
    panels = (("requests_per_s", "throughput (requests/s)"), ("normalized_p50_s", "p50 normalized latency (s/token)"),
              ("cost_per_request", "cost per 1k requests" if price_per_hour else "machine-seconds per request"))
    for ax, (key, label) in zip(axes, panels):
        for sp in splits:
            pts = [p for p in points if p.split == sp and getattr(p, key) is not None]
            ys = [getattr(p, key) * (1000 if key == "cost_per_request" and price_per_hour else 1) for p in pts]
            chosen = pick is not None and sp == pick
            ax.plot([p.rate for p in pts], ys, marker="*" if chosen else "o", linewidth=3 if chosen else 1.2,
                    markersize=11 if chosen else 4, linestyle="-" if sp.prompt else "--",
                    label=sp.label + (" (planner)" if chosen else ""), zorder=3 if chosen else 2)
        ax.set_xlabel("arrival rate (requests/s, Poisson)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "normalized_p50_s":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return path
