"""Local host memory: chunks copied device -> (pinned) host and back, keyed in a dict.

This is the swap space of a token stage and the in-process replica store. On a GPU each copy is
issued on the caller's current stream and signalled by an event; the streaming functions (stream.py)
call it from a side stream that first waits for the compute stream, so the copies overlap later
compute. On the CPU they are plain copies. Buffers are kept per key and reused when the same key is flushed again with the
same size (a microbatch swapped out every round lands in the same pinned buffer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...model.config import dtype_name
from .base import DONE, Blob, ChunkError, Pending, Transport, nbytes


@dataclass
class _Entry:
    buf: torch.Tensor  # flat uint8 host buffer
    meta: dict
    view: tuple | None = None  # (dtype, shape, typed view of buf), kept: a swap reuses it every round
    on_release: Callable[[], None] | None = None  # buf belongs to a caller (adopt): hand it back to them

    def typed(self, dtype: torch.dtype, shape) -> torch.Tensor:
        if self.view is None or self.view[0] != dtype or self.view[1] != shape:
            self.view = (dtype, shape, self.buf.view(dtype).view(shape))
        return self.view[2]


class LocalTransport(Transport):
    name = "local"

    def __init__(self, pin_memory: bool = True, pinned_batch_bytes: int = 64 << 20) -> None:
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._store: dict[str, _Entry] = {}
        # Pinned buffers by size. Pinning is slow (a cudaHostAlloc per call, ~ms), and replication
        # keeps one buffer per token step, so buffers are carved out of larger pinned blocks, and
        # dropped ones are reused.
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_pageable: dict[int, list[torch.Tensor]] = {}  # reused too: fresh memory costs page faults
        self.pinned_batch_bytes = pinned_batch_bytes
        self.pinned_allocs = 0  # cudaHostAlloc calls so far (a benchmark checks none happen while timed)

    def reserve(self, size: int, count: int) -> None:
        """Pin ``count`` buffers of ``size`` bytes now (e.g. one per step a replica will hold)."""
        if not self.pin_memory or count < 1:
            return
        block = torch.empty(size * count, dtype=torch.uint8, pin_memory=True)
        self.pinned_allocs += 1
        self._free.setdefault(size, []).extend(block[i * size:(i + 1) * size] for i in range(count))

    def buffers(self, size: int, count: int) -> list[torch.Tensor]:
        """``count`` host buffers of ``size`` bytes carved from one new block (pinned where this transport
        pins), for a caller that keeps them and stores into them with :meth:`adopt` (StepReplicator: its
        CUDA graphs copy into fixed addresses). Counted in ``pinned_allocs``."""
        pinned = self.pin_memory and count > 0
        block = torch.empty(size * count, dtype=torch.uint8, pin_memory=pinned)
        self.pinned_allocs += pinned
        return [block[i * size:(i + 1) * size] for i in range(count)]

    def _buffer(self, size: int, pinned: bool) -> torch.Tensor:
        if not pinned:
            free = self._free_pageable.get(size)
            return free.pop() if free else torch.empty(size, dtype=torch.uint8)
        free = self._free.get(size)
        if not free:
            self.reserve(size, max(1, self.pinned_batch_bytes // max(size, 1)))
            free = self._free[size]
        return free.pop()

    def _release(self, entry: _Entry) -> None:
        if entry.on_release is not None:
            entry.on_release()
        else:
            free = self._free if entry.buf.is_pinned() else self._free_pageable
            free.setdefault(entry.buf.numel(), []).append(entry.buf)

    def _entry(self, key: str, size: int, pinned: bool) -> _Entry:
        entry = self._store.get(key)
        if entry is None or entry.buf.numel() != size:
            if entry is not None:
                self._release(entry)
            entry = _Entry(self._buffer(size, pinned), {})
            self._store[key] = entry
        return entry

    def claim(self, key: str, size: int, meta: dict, *, pinned: bool) -> torch.Tensor:
        """The flat uint8 host buffer of ``size`` bytes stored under ``key`` (from the reserved pinned
        buffers when ``pinned``), for a caller that fills it itself with an async device copy (see
        replicator.py); ``meta`` is stored as given and must name the ``dtype``. Until the caller's copy
        has landed, the chunk must not be fetched, and ``key`` must not be flushed or dropped."""
        entry = self._entry(key, size, pinned and self.pin_memory)
        entry.meta = meta
        return entry.buf

    def adopt(self, key: str, buf: torch.Tensor, meta: dict, on_release: Callable[[], None]) -> None:
        """Store the caller's flat uint8 host buffer ``buf`` under ``key`` (replacing what was there), for a
        caller that fills it itself with an async device copy, like :meth:`claim`; when the chunk is dropped
        or replaced, ``on_release()`` is called instead of reusing ``buf`` here (it goes back to its owner)."""
        old = self._store.get(key)
        if old is not None:
            self._release(old)
        self._store[key] = _Entry(buf, meta, on_release=on_release)

    def holds(self, key: str) -> bool:
        return key in self._store

    def stored(self, key: str) -> Blob:
        """The chunk under ``key`` as it is stored (its own host buffer, not a copy)."""
        entry = self._store.get(key)
        if entry is None:
            raise ChunkError(f"chunk {key!r} is not in local host memory (was it flushed, or dropped?)")
        return Blob(key, entry.meta, entry.buf)

    def flush(self, key: str, src: torch.Tensor, *, peer: int = -1, tag: int = 0,
              meta: dict | None = None) -> Pending:
        entry = self._entry(key, nbytes(src), self.pin_memory and src.is_cuda)
        entry.meta = dict(meta or {}, dtype=dtype_name(src.dtype), shape=list(src.shape))
        host = entry.typed(src.dtype, src.shape)
        if not src.is_cuda:
            host.copy_(src)
            return DONE
        host.copy_(src, non_blocking=True)  # on the caller's (side) stream; see stream.py
        event = torch.cuda.Event()
        event.record()
        return Pending(event.synchronize, keep=(src,))

    def fetch(self, key: str, out: torch.Tensor, *, peer: int = -1, tag: int = 0) -> Pending:
        entry = self._store.get(key)
        if entry is None:
            raise ChunkError(f"chunk {key!r} is not in local host memory (was it flushed, or dropped?)")
        if entry.buf.numel() != nbytes(out):
            raise ChunkError(f"chunk {key!r} holds {entry.buf.numel()} bytes but the destination needs {nbytes(out)}")
        host = entry.typed(out.dtype, out.shape)
        if not out.is_cuda:
            out.copy_(host)
            return DONE
        out.copy_(host, non_blocking=entry.buf.is_pinned())
        event = torch.cuda.Event()
        event.record()
        return Pending(event.synchronize, keep=(entry.buf,))

    def fetch_all(self, prefix: str, *, peer: int = -1) -> list[Blob]:
        return [Blob(k, e.meta, e.buf) for k, e in self._store.items() if k.startswith(prefix)]

    def drop(self, prefix: str, *, peer: int = -1) -> int:
        keys = [k for k in self._store if k.startswith(prefix)]
        for k in keys:
            self._release(self._store.pop(k))
        return len(keys)

    def discard(self, key: str) -> bool:
        """Forget the one chunk stored under exactly ``key`` (``drop`` takes a prefix); whether there was one."""
        entry = self._store.pop(key, None)
        if entry is not None:
            self._release(entry)
        return entry is not None

    def keys(self) -> list[str]:
        return list(self._store)

    def nbytes(self) -> int:
        return sum(e.buf.numel() for e in self._store.values())
