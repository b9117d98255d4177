"""Stage timelines as a Chrome trace-event file (open in chrome://tracing or https://ui.perfetto.dev).

One process per worker, named by its stage and TP rank. Inside it, one thread for compute (prefill,
decode) and one for transfers (send, recv, stream): transfers overlap compute when streaming is
layer-by-layer, and complete events on one thread must nest, so they get their own row. The bubbles
are explicit: every gap in the union of a worker's busy intervals over the run's span is an ``idle``
event on the compute row. Event kinds we do not know (e.g. ``idle`` reported by the worker itself) go
on a row of their own. Timestamps are microseconds after the run starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..records import StageEvent
from .metrics import as_events, busy_intervals, idle_gaps

COMPUTE_KINDS = ("prefill", "decode")
TRANSFER_KINDS = ("send", "recv", "stream")
_TID = {"compute": 0, "transfer": 1}


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def chrome_trace(events: Iterable[StageEvent | Mapping[str, Any]], span: tuple[float, float],
                 metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    evs = as_events(events)
    by_worker: dict[int, list[StageEvent]] = {}
    for e in evs:
        by_worker.setdefault(e.worker, []).append(e)
    out: list[dict[str, Any]] = []
    for w in sorted(by_worker):
        wev = by_worker[w]
        first = wev[0]
        out.append({"ph": "M", "name": "process_name", "pid": w, "tid": 0,
                    "args": {"name": f"worker {w}: {first.stage} tp{first.tp_rank}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": w, "tid": 0, "args": {"sort_index": w}})
        tids = dict(_TID)
        for e in sorted(wev, key=lambda e: (e.start_s, e.end_s)):
            row = "compute" if e.kind in COMPUTE_KINDS else "transfer" if e.kind in TRANSFER_KINDS else e.kind
            tid = tids.setdefault(row, len(tids))
            out.append({"ph": "X", "name": e.kind, "cat": row, "pid": w, "tid": tid, "ts": _us(e.start_s),
                        "dur": _us(max(0.0, e.end_s - e.start_s)),
                        "args": {"ubatch": e.ubatch, "stage": e.stage, "tp_rank": e.tp_rank}})
        for a, b in idle_gaps(busy_intervals(wev, span), span):
            out.append({"ph": "X", "name": "idle", "cat": "bubble", "pid": w, "tid": _TID["compute"],
                        "ts": _us(a), "dur": _us(b - a), "args": {"ubatch": -1}, "cname": "grey"})
        for row, tid in tids.items():
            out.append({"ph": "M", "name": "thread_name", "pid": w, "tid": tid, "args": {"name": row}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": w, "tid": tid, "args": {"sort_index": tid}})
    failures = (metadata or {}).get("failures")
    for f in failures if isinstance(failures, list) else []:  # failures and recoveries: instants on the trace
        if not isinstance(f, dict):
            continue
        ranks = ", ".join(map(str, f.get("ranks", [])))
        for name, key in ((f"failure of worker {ranks} detected", "detected_s"), ("serving resumes", "resumed_s"),
                          (f"failure of worker {ranks} injected", "injected_s")):
            if f.get(key) is not None:
                out.append({"ph": "i", "s": "g", "name": name, "cat": "failure", "pid": 0, "tid": 0,
                            "ts": _us(f[key]), "args": {k: v for k, v in f.items() if not isinstance(v, (list, dict))}})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"span_s": list(span), **{k: v for k, v in (metadata or {}).items() if k != "failures"}}}


def write_trace(path: str | Path, events: Iterable[StageEvent | Mapping[str, Any]], span: tuple[float, float],
                metadata: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(events, span, metadata)))
    return path
