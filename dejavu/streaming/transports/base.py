"""The one interface every transport implements: flush a contiguous chunk under a key, fetch it back.

``flush(key, src)`` ships the bytes of ``src``; ``fetch(key, out)`` fills ``out`` (same dtype and
number of elements) with the bytes flushed under ``key``. Both return a :class:`Pending`: the transfer
may still be running, ``src`` must not change and ``out`` must not be read until ``wait()`` returns.
GPU work is issued on the caller's current CUDA stream; stream.py picks that stream (a side stream
that waits for the compute), so a transport never juggles streams per chunk.

- Stores (local host memory, disk, a peer's replica store) keep what was flushed until dropped; keys
  name the chunk, and ``meta`` (a small msgpack-able dict) is stored beside it.
- Point-to-point transports (torch.distributed, MPI) deliver to ``peer``, which must post a matching
  fetch; messages match on (peer, tag), and ``key`` serves only to name the chunk in errors.

Bytes are moved as raw uint8, whatever the dtype (bf16 included); nothing is ever pickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class ChunkError(RuntimeError):
    """A chunk is missing, torn or corrupt; the message names the chunk."""


class Pending:
    """A transfer in flight. ``wait()`` blocks until it is complete, then runs its follow-up once."""

    __slots__ = ("_wait", "_then", "_keep", "_done")

    def __init__(self, wait: Callable[[], Any] | None = None, then: Callable[[], Any] | None = None,
                 keep: tuple = ()) -> None:
        self._wait, self._then, self._keep = wait, then, keep  # keep: buffers that must outlive the transfer
        self._done = wait is None and then is None

    def wait(self) -> None:
        if self._done:
            return
        if self._wait is not None:
            self._wait()
        if self._then is not None:
            self._then()
        self._done, self._wait, self._then, self._keep = True, None, None, ()

    @property
    def done(self) -> bool:
        return self._done


DONE = Pending()


@dataclass
class Blob:
    """One stored chunk as fetched in bulk from a store (recovery)."""

    key: str
    meta: dict
    data: torch.Tensor = field(repr=False)  # flat uint8, on the host


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor, as a flat uint8 view (no copy)."""
    if not t.is_contiguous():
        raise ValueError("as_bytes needs a contiguous tensor; gather it first")
    return t.reshape(-1).view(torch.uint8)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one side stream per GPU that streaming gathers and copies run on (creating streams costs).

    Work put on it must first wait for the compute stream (``wait_stream``), so it sees the cache rows
    the compute just wrote; the compute stream itself never waits for it.
    """
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def host_copy(src: torch.Tensor) -> tuple[torch.Tensor, Pending]:
    """A contiguous host copy of ``src``: itself on the CPU, else an async copy into pinned memory."""
    if src.device.type == "cpu":
        return src.contiguous(), DONE
    host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    host.copy_(src, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, Pending(event.synchronize, keep=(src,))


class Transport(ABC):
    name: str = "transport"

    @abstractmethod
    def flush(self, key: str, src: torch.Tensor, *, peer: int = -1, tag: int = 0,
              meta: dict | None = None) -> Pending: ...

    @abstractmethod
    def fetch(self, key: str, out: torch.Tensor, *, peer: int = -1, tag: int = 0) -> Pending: ...

    def fetch_all(self, prefix: str, *, peer: int = -1) -> list[Blob]:
        """Every stored chunk whose key starts with ``prefix`` (stores only)."""
        raise NotImplementedError(f"the {self.name} transport does not store chunks; it cannot list {prefix!r}")

    def drop(self, prefix: str, *, peer: int = -1) -> int:
        """Forget every stored chunk whose key starts with ``prefix``; returns how many (stores only)."""
        raise NotImplementedError(f"the {self.name} transport does not store chunks")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
