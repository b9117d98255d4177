"""Bytes and seconds moved, per streaming path ("prompt->token", "replication", "swap", ...) and transport.

One :class:`StreamStats` per worker; every stream/swap/replication handle adds to it when it completes,
and the worker exports ``as_dict()`` with its metrics. Seconds are wall time from the first transfer
of an operation being issued to the last one landing (for layer-by-layer streaming that span overlaps
the stage's compute, so it is not all added latency).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Tally:
    bytes: int = 0
    seconds: float = 0.0
    count: int = 0  # operations (a whole handover, one swap, one step's replication)

    def as_dict(self) -> dict:
        gbps = self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return {"bytes": self.bytes, "seconds": self.seconds, "count": self.count, "GBps": gbps}


class StreamStats:
    def __init__(self) -> None:
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._lock = threading.Lock()

    def add(self, path: str, transport: str, nbytes: int, seconds: float, count: int = 1) -> None:
        with self._lock:
            t = self._tallies.setdefault((path, transport), Tally())
            t.bytes += nbytes
            t.seconds += seconds
            t.count += count

    def get(self, path: str, transport: str) -> Tally:
        with self._lock:
            t = self._tallies.get((path, transport), Tally())
            return Tally(t.bytes, t.seconds, t.count)

    def as_dict(self) -> dict[str, dict[str, dict]]:
        """``{path: {transport: {bytes, seconds, count, GBps}}}``, ready for JSON."""
        out: dict[str, dict[str, dict]] = {}
        with self._lock:
            for (path, transport), t in sorted(self._tallies.items()):
                out.setdefault(path, {})[transport] = t.as_dict()
        return out

    def reset(self) -> None:
        with self._lock:
            self._tallies.clear()
