"""Turning request records, stage events and worker stats into the numbers of ``summary.json``.

Times are seconds after the run starts (the controller's clock). Definitions:

- makespan: first arrival to last finish over all requests;
- throughput: completed requests / makespan, and output tokens (of every request, partial ones
  included: they were generated) / makespan;
- TTFT = first_token_s - arrival_s; end-to-end latency = finish_s - arrival_s; TPOT = (finish_s -
  first_token_s) / (generated - 1); normalized latency = latency / generated tokens (the paper's);
  latencies are over completed (``ok``) requests, TTFT over every request that got a first token;
- busy fraction of a worker = length of the union of its prefill/decode/send/recv/stream intervals,
  clipped to the run's span, over the span; bubble fraction = 1 - busy. The span runs from the earliest
  arrival or event to the latest finish or event, the same for every worker.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..records import RequestRecord, StageEvent

# What counts as a stage doing work. A blocking send or recv is mostly a wait on a neighbour stage (gloo's
# send returns only once the busy receiver takes it), so it is a bubble, as in the paper; the trace still
# shows those intervals. Streaming copies are real work of this stage.
BUSY_KINDS = ("prefill", "decode", "stream")
PERCENTILES = (50, 95, 99)
SUMMARY_FORMAT = "dejavu-summary/1"


@dataclass
class WorkerStats:
    """What a worker reports about itself at the end of a run (sent as a msgpack map)."""

    worker: int  # global rank
    stage: str = ""
    tp_rank: int = 0
    peak_memory_bytes: int | None = None  # peak device memory (torch.cuda.max_memory_allocated, or RSS on CPU)
    kv_bytes: dict[str, int] = field(default_factory=dict)  # streaming path -> bytes moved, e.g. "prompt->token"
    kv_seconds: dict[str, float] = field(default_factory=dict)  # streaming path -> seconds spent moving them
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WorkerStats":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and k != "extra"},
                   extra={**d.get("extra", {}), **{k: v for k, v in d.items() if k not in known}})


# ------------------------------------------------------------------------------------ coercion helpers

def as_records(records: Iterable[RequestRecord | Mapping[str, Any]]) -> list[RequestRecord]:
    out = [r if isinstance(r, RequestRecord) else RequestRecord.from_dict(r) for r in records]
    return sorted(out, key=lambda r: r.id)


def as_events(events: Iterable[StageEvent | Mapping[str, Any]]) -> list[StageEvent]:
    return [e if isinstance(e, StageEvent) else StageEvent.from_dict(e) for e in events]


def as_worker_stats(stats: Iterable[WorkerStats | Mapping[str, Any]] | Mapping[Any, Any] | None) -> list[WorkerStats]:
    """A list of stats, or a mapping worker -> stats (the worker key fills in a missing ``worker``)."""
    if stats is None:
        return []
    if isinstance(stats, Mapping):
        stats = [s if isinstance(s, WorkerStats) else {"worker": int(w), **s} for w, s in stats.items()]
    return sorted((s if isinstance(s, WorkerStats) else WorkerStats.from_dict(s) for s in stats),
                  key=lambda s: s.worker)


# ----------------------------------------------------------------------------------------- digest

def outputs_sha256(records: Iterable[RequestRecord | Mapping[str, Any]] | Mapping[int, Sequence[int]]) -> str:
    """SHA-256 over every request's generated token ids, in id order.

    Canonical bytes: for each request in increasing id order, its id, then the number of output tokens
    n, then the n token ids — all as signed 64-bit little-endian integers (``struct`` format ``<q``).
    Failed and unfinished requests take part with whatever tokens they have. The length prefix keeps
    ``[1, 2] + [3]`` and ``[1] + [2, 3]`` apart. Accepts records or a mapping ``{id: output_ids}``.
    """
    if isinstance(records, Mapping):
        items = sorted((int(i), list(ids)) for i, ids in records.items())
    else:
        items = [(r.id, r.output_ids) for r in as_records(records)]
    h = hashlib.sha256()
    for rid, ids in items:
        h.update(struct.pack(f"<qq{len(ids)}q", rid, len(ids), *ids))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- latency

def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, p50, p95, p99, max (numpy's linear percentiles); None when there are no values."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "mean": None, "min": None, **{f"p{q}": None for q in PERCENTILES}, "max": None}
    return {"count": int(arr.size), "mean": float(arr.mean()), "min": float(arr.min()),
            **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}, "max": float(arr.max())}


def per_request(r: RequestRecord) -> dict[str, float | None]:
    """The derived timings of one request (None where they do not apply)."""
    n = len(r.output_ids)
    ttft = r.first_token_s - r.arrival_s if r.first_token_s is not None else None
    done = r.status == "ok" and r.finish_s is not None
    latency = r.finish_s - r.arrival_s if done else None
    tpot = (r.finish_s - r.first_token_s) / (n - 1) if done and r.first_token_s is not None and n >= 2 else None
    norm = latency / n if latency is not None and n >= 1 else None
    return {"ttft_s": ttft, "latency_s": latency, "tpot_s": tpot, "normalized_latency_s": norm}


def span_of(records: Sequence[RequestRecord], events: Sequence[StageEvent]) -> tuple[float, float]:
    starts = [r.arrival_s for r in records] + [e.start_s for e in events]
    ends = ([t for r in records for t in (r.first_token_s, r.finish_s) if t is not None]
            + [e.end_s for e in events])
    if not starts:
        return 0.0, 0.0
    start = min(starts)
    return start, max([start, *ends])


# ------------------------------------------------------------------------------------ busy / bubble

def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    return sum(b - a for a, b in merge_intervals(intervals))


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering the same points (empty and inverted ones dropped)."""
    merged: list[list[float]] = []
    for a, b in sorted((a, b) for a, b in intervals if b > a):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def idle_gaps(busy: list[tuple[float, float]], span: tuple[float, float]) -> list[tuple[float, float]]:
    """The parts of ``span`` that no merged busy interval covers: the bubbles."""
    gaps, t = [], span[0]
    for a, b in busy:
        if a > t:
            gaps.append((t, min(a, span[1])))
        t = max(t, b)
    if t < span[1]:
        gaps.append((t, span[1]))
    return [(a, b) for a, b in gaps if b > a]


def busy_intervals(events: Iterable[StageEvent], span: tuple[float, float]) -> list[tuple[float, float]]:
    clipped = ((max(e.start_s, span[0]), min(e.end_s, span[1])) for e in events if e.kind in BUSY_KINDS)
    return merge_intervals(clipped)


def utilization(events: Sequence[StageEvent], span: tuple[float, float],
                workers: Iterable[WorkerStats] = ()) -> dict[str, dict[str, Any]]:
    """Per worker (keyed by str(rank)): stage, tp_rank, busy/bubble fractions and seconds per event kind."""
    length = span[1] - span[0]
    info: dict[int, dict[str, Any]] = {}
    for w in workers:
        info[w.worker] = {"stage": w.stage, "tp_rank": w.tp_rank}
    by_worker: dict[int, list[StageEvent]] = {}
    for e in events:
        by_worker.setdefault(e.worker, []).append(e)
        info.setdefault(e.worker, {"stage": e.stage, "tp_rank": e.tp_rank})
        info[e.worker]["stage"] = info[e.worker]["stage"] or e.stage
    out = {}
    for w in sorted(info):
        evs = by_worker.get(w, [])
        busy = union_length(busy_intervals(evs, span))
        frac = busy / length if length > 0 else 0.0
        kinds: dict[str, float] = {}
        for e in evs:
            kinds[e.kind] = kinds.get(e.kind, 0.0) + max(0.0, min(e.end_s, span[1]) - max(e.start_s, span[0]))
        out[str(w)] = {**info[w], "busy_s": busy, "busy_fraction": frac, "bubble_fraction": 1.0 - frac,
                       "seconds_by_kind": dict(sorted(kinds.items()))}
    return out


def stage_utilization(workers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage name: the mean busy/bubble fraction over its workers (its TP ranks)."""
    groups: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    for w, u in workers.items():
        groups.setdefault(u["stage"] or f"worker{w}", []).append((int(w), u))
    return {s: {"workers": [w for w, _ in g],
                "busy_fraction": float(np.mean([u["busy_fraction"] for _, u in g])),
                "bubble_fraction": float(np.mean([u["bubble_fraction"] for _, u in g]))}
            for s, g in sorted(groups.items())}


def kv_memory(workers: Sequence[WorkerStats]) -> dict[str, Any] | None:
    """Peak KV memory per worker that decodes (device buffers, and host swap space with swapping), and
    with swapping the swaps: how many, bytes, seconds, the share of them hidden behind compute (1 - the
    seconds the compute waited for a swap / the swaps' seconds) and the ratio of a swap (one microbatch
    out, the next in) to a decode step, per worker and at worst (above 1 the compute waits: swapping loses)."""
    pools = {str(w.worker): w.extra["kv_pool"] for w in workers if w.extra.get("kv_pool")}
    if not pools:
        return None
    out: dict[str, Any] = {
        "peak_device_kv_bytes": {w: p.get("peak_device_kv_bytes") for w, p in pools.items()},
        "peak_host_swap_bytes": {w: p.get("peak_host_swap_bytes", 0) for w, p in pools.items()},
        "peak_device_kv_bytes_max": max(p.get("peak_device_kv_bytes") or 0 for p in pools.values()),
    }
    swapping = [p for p in pools.values() if p.get("swapping")]
    if swapping:
        total = lambda k: sum(p.get(k) or 0 for p in swapping)  # noqa: E731
        seconds, exposed = total("swap_s"), total("exposed_s")
        ratios = {w: p.get("swap_to_step") for w, p in pools.items() if p.get("swapping")}
        out["swap"] = {
            "count": total("swaps_out") + total("swaps_in"), "swaps_out": total("swaps_out"),
            "swaps_in": total("swaps_in"), "bytes": total("swap_out_bytes") + total("swap_in_bytes"),
            "seconds": seconds, "exposed_s": exposed,
            "hidden_share": min(1.0, max(0.0, 1.0 - exposed / seconds)) if seconds > 0 else None,
            "swap_to_step": {w: r for w, r in ratios.items()},
            "swap_to_step_max": max((r for r in ratios.values() if r is not None), default=None),
            "peak_host_swap_bytes_total": total("peak_host_swap_bytes"),
        }
    return out


def kv_streams(workers: Sequence[WorkerStats]) -> dict[str, dict[str, float]]:
    """Per streaming path: bytes and seconds summed over workers, and the resulting rate."""
    paths: dict[str, dict[str, float]] = {}
    for w in workers:
        for path in sorted(set(w.kv_bytes) | set(w.kv_seconds)):
            p = paths.setdefault(path, {"bytes": 0, "seconds": 0.0})
            p["bytes"] += int(w.kv_bytes.get(path, 0))
            p["seconds"] += float(w.kv_seconds.get(path, 0.0))
    for p in paths.values():
        p["gb_per_s"] = p["bytes"] / p["seconds"] / 1e9 if p["seconds"] > 0 else None
    return dict(sorted(paths.items()))


# ---------------------------------------------------------------------------------------- summary

def summarize(records: Iterable[RequestRecord | Mapping[str, Any]],
              events: Iterable[StageEvent | Mapping[str, Any]] = (),
              worker_stats: Any = None, extra: Mapping[str, Any] | None = None,
              span: tuple[float, float] | None = None) -> dict[str, Any]:
    """The content of ``summary.json`` (see the module docstring for definitions)."""
    recs, evs, ws = as_records(records), as_events(events), as_worker_stats(worker_stats)
    span = span or span_of(recs, evs)
    derived = [per_request(r) for r in recs]
    ok = [r for r in recs if r.status == "ok"]
    finishes = [r.finish_s for r in recs if r.finish_s is not None]
    makespan = max(finishes) - min(r.arrival_s for r in recs) if finishes else 0.0
    out_tokens = sum(len(r.output_ids) for r in recs)
    workers = utilization(evs, span, ws)
    for w in ws:
        workers[str(w.worker)]["peak_memory_bytes"] = w.peak_memory_bytes
        if w.extra.get("kv_pool"):
            workers[str(w.worker)]["kv_pool"] = w.extra["kv_pool"]
        if w.kv_bytes or w.kv_seconds:
            workers[str(w.worker)]["kv"] = {p: {"bytes": w.kv_bytes.get(p, 0), "seconds": w.kv_seconds.get(p, 0.0)}
                                            for p in sorted(set(w.kv_bytes) | set(w.kv_seconds))}
    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "counts": {"total": len(recs), "completed": len(ok),
                   "failed": sum(r.status == "failed" for r in recs),
                   "unfinished": sum(r.status not in ("ok", "failed") for r in recs)},
        "span_s": {"start": span[0], "end": span[1]},
        "makespan_s": makespan,
        "throughput": {"requests_per_s": len(ok) / makespan if makespan > 0 else None,
                       "output_tokens_per_s": out_tokens / makespan if makespan > 0 else None,
                       "output_tokens": out_tokens,
                       "prompt_tokens": sum(len(r.prompt_ids) for r in recs)},
        "ttft_s": stats([d["ttft_s"] for d in derived if d["ttft_s"] is not None]),
        "tpot_s": stats([d["tpot_s"] for d in derived if d["tpot_s"] is not None]),
        "latency_s": stats([d["latency_s"] for d in derived if d["latency_s"] is not None]),
        "normalized_latency_s": stats([d["normalized_latency_s"] for d in derived
                                       if d["normalized_latency_s"] is not None]),
        "bubble_fraction_mean": (float(np.mean([u["bubble_fraction"] for u in workers.values()]))
                                 if workers else None),
        "workers": workers,
        "stages": stage_utilization(workers),
        "peak_memory_bytes": {str(w.worker): w.peak_memory_bytes for w in ws if w.peak_memory_bytes is not None},
        "kv_streams": kv_streams(ws),
        "outputs_sha256": outputs_sha256(recs),
    }
    kv = kv_memory(ws)
    if kv is not None:
        summary["kv_memory"] = kv
    for k, v in (extra or {}).items():
        if k in summary:
            raise ValueError(f"extra summary key {k!r} collides with a computed one; rename it")
        summary[k] = v
    return summary


# Flat views, for tables and W&B ------------------------------------------------------------------

def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def unflatten(d: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        node = out
        *parents, leaf = k.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # a scalar and a subtree under one name: keep the scalar
                break
        else:
            node[leaf] = v
    return out
