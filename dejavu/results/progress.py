"""A one-line terminal progress display for the controller: requests done / total, tokens/s, elapsed.

Call ``token()`` / ``request_done()`` as things arrive; the line is redrawn at most ``max_hz`` times a
second, so calling per token costs a clock read. It draws only on a terminal, unless forced (or
``DEJAVU_PROGRESS=1``), so logs and captured output stay clean. Thread-safe: the controller may call it
from its receiving thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from ..model import switches


class Progress:
    def __init__(self, total: int, *, stream: TextIO | None = None, force: bool | None = None,
                 max_hz: float = 4.0, clock: Callable[[], float] = time.monotonic, label: str = "dejavu"):
        self.total, self.done, self.failed, self.tokens = total, 0, 0, 0
        self.stream = stream if stream is not None else sys.stdout
        if force is None:
            force = switches.get("DEJAVU_PROGRESS")
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(force or (isatty is not None and isatty()))
        self._interval = 1.0 / max_hz
        self._clock, self._label = clock, label
        self._start = clock()
        self._last_draw = float("-inf")
        self._width = 0
        self._lock = threading.Lock()

    def token(self, n: int = 1) -> None:
        with self._lock:
            self.tokens += n
            self._maybe_draw()

    def request_done(self, n: int = 1, *, failed: bool = False) -> None:
        with self._lock:
            self.done += n
            self.failed += n if failed else 0
            self._maybe_draw()

    def update(self, *, done: int | None = None, tokens: int | None = None) -> None:
        """Set absolute counts (for callers that keep their own)."""
        with self._lock:
            self.done = self.done if done is None else done
            self.tokens = self.tokens if tokens is None else tokens
            self._maybe_draw()

    status = ""  # e.g. "RECOVERING from failure 1": shown while set (fault tolerance)

    def set_status(self, text: str) -> None:
        """A word on what the run is doing now (a failure detected, serving resumed); drawn at once."""
        with self._lock:
            self.status = text
            if self.enabled:
                self._draw()

    def line(self) -> str:
        elapsed = self._clock() - self._start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        m, s = divmod(int(elapsed), 60)
        failed = f" ({self.failed} failed)" if self.failed else ""
        status = f" | {self.status}" if self.status else ""
        return (f"[{self._label}] {self.done}/{self.total} requests{failed} | {self.tokens} tokens | "
                f"{rate:.1f} tok/s | {m:02d}:{s:02d} elapsed{status}")

    def close(self) -> None:
        """Draw the final state and end the line."""
        with self._lock:
            if self.enabled:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
                self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _maybe_draw(self) -> None:
        if self.enabled and self._clock() - self._last_draw >= self._interval:
            self._draw()

    def _draw(self) -> None:
        text = self.line()
        # Pad over the previous, possibly longer, line instead of relying on terminal escape codes.
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
        self._last_draw = self._clock()
