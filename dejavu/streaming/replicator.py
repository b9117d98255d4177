"""StepReplicator: the per-token-step replication fast path (one object per cache buffer and store).

:func:`~dejavu.streaming.stream.replicate_step` works out everything again on every call (the step
slice, an index tensor, a fresh output tensor, a store entry, an event, a handle): 155-170 µs a step
on an H100 for ~45 µs of GPU work. A token stage replicates the same cache every step, so this object
works out all of it once and leaves each step with::

    (compute stream) copy the step's positions into the ring slot's staging tail   [device positions]
    (side stream)    wait for the compute stream; one gather kernel into the slot's staging buffer;
                     one async copy of the staging buffer into a reserved pinned host buffer; one event

and nothing allocated. Positions may be a device tensor (e.g. the CUDA-graph decode's ``positions``
buffer, shape ``[b, 1]``): they are snapshotted on the caller's stream, so the caller may overwrite them
right after, and the host never waits for the device. Or a host list/tensor: checked against the cache
on the host, staged through the slot's pinned positions buffer.

The gathered bytes are ``[slots, layers, kv, heads, head_dim]`` (the layout of
:class:`~dejavu.streaming.staging.StepSlice`) followed, at byte ``positions_at``, by the slots'
positions as int64: with device positions the host never knows them at issue time, so they travel with
the data. :func:`~dejavu.streaming.stream.restore` reads them from there.

A ring of ``depth`` slots bounds the steps in flight: reusing a slot first waits (on the host) for the
step that last used it. The compute stream never waits for a copy. Every step's host buffer is its own
(stored under its key until dropped), so a slot's reuse never touches an earlier step's data.

:meth:`StepReplicator.box` sends a box of the same cache (e.g. one layer of the prompt, one per decode
step) through the same ring.

One thread per replicator; :meth:`StepReplicator.wait` before fetching, restoring or dropping its keys.
"""

from __future__ import annotations

import operator
import time
from typing import Sequence

import torch

from .plan import Box, Partition
from .staging import region
from .stats import StreamStats
from .transports.base import dtype_name, nbytes, side_stream
from .transports.local import LocalTransport

_ALIGN = 64  # bytes: step buffers are carved from one pinned block; keep each one (and its tail) aligned


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _wide(cache: torch.Tensor) -> torch.Tensor:
    """The cache viewed with the widest integer element that tiles a head_dim row: the gather only
    moves bits, and 4x fewer elements (bf16 -> int64) is 4x less index arithmetic."""
    row = cache.shape[-1] * cache.element_size()
    for wide in (torch.int64, torch.int32, torch.int16):
        if wide.itemsize > cache.element_size() and row % wide.itemsize == 0:
            try:
                return cache.view(wide)
            except RuntimeError:  # strides that do not allow it: keep the cache's own element
                break
    return cache


class StepReplicator:
    """Replicates one cache buffer's token steps (and boxes) into a :class:`LocalTransport`.

    ``cache``: the stage's buffer ``[layers, 2, slots, heads, max_seq, head_dim]`` holding ``part``.
    ``slots``: the global slots each step covers (consecutive; default all of ``part``'s).
    ``prefix``: default keys are ``f"{prefix}t{n}"`` for the n-th step.
    ``depth``: steps (and boxes) in flight at most. ``reserve``: pin host buffers for this many steps
    now, so no step pins memory (a cudaHostAlloc, milliseconds, may synchronize the device).
    """

    def __init__(self, cache: torch.Tensor, part: Partition, transport: LocalTransport, *, prefix: str = "",
                 slots: Sequence[int] | None = None, depth: int = 8, reserve: int = 0,
                 stats: StreamStats | None = None, path: str = "replication") -> None:
        if not hasattr(transport, "claim"):
            raise TypeError(f"StepReplicator copies straight into a host store (LocalTransport), not the "
                            f"{transport.name} transport; use replicate_step for that one")
        if cache.dim() != 6 or cache.shape[1] != 2:
            raise ValueError(f"expected a cache buffer [layers, 2, slots, heads, max_seq, head_dim], got "
                             f"{tuple(cache.shape)}")
        want = tuple(hi - lo for lo, hi in (part.layers, part.slots, part.heads))
        have = (cache.shape[0], cache.shape[2], cache.shape[3])
        if have != want:
            raise ValueError(f"cache holds (layers, slots, heads) = {have} but partition {part} has {want}")
        slots = list(range(*part.slots)) if slots is None else [operator.index(s) for s in slots]
        if not slots or slots != list(range(slots[0], slots[0] + len(slots))) or \
                not (part.slots[0] <= slots[0] and slots[-1] < part.slots[1]):
            raise ValueError(f"slots {slots} must be consecutive slots of partition {part}")
        if depth < 1:
            raise ValueError(f"depth={depth}: the ring needs at least one slot")

        self.cache, self.part, self.transport = cache, part, transport
        self.prefix, self.depth, self.stats, self.path = prefix, depth, stats, path
        self.slots = tuple(slots)
        self.device = cache.device
        self.on_gpu = cache.is_cuda
        self.max_seq = cache.shape[4]
        n, s0 = len(slots), slots[0] - part.slots[0]
        layers, heads, head_dim = cache.shape[0], cache.shape[3], cache.shape[5]

        # Bytes of one step: the slice, then (8-aligned) the positions as int64, rounded up.
        self.step_shape = (n, layers, 2, heads, head_dim)
        self.data_bytes = n * layers * 2 * heads * head_dim * cache.element_size()
        self.positions_at = _round_up(self.data_bytes, 8)
        self.step_bytes = _round_up(self.positions_at + 8 * n, _ALIGN)
        self.meta = {  # shared by every step's entry: never mutated
            "step": {"layers": part.layers, "heads": part.heads, "slots": list(slots)},
            "positions_at": self.positions_at, "dtype": dtype_name(cache.dtype), "shape": list(self.step_shape)}

        # The gather: out[b, l, kv, h, 0, :] = cache[l, kv, s0 + b, h, positions[b], :], with the
        # positions as an expanded (stride 0) index: no index arithmetic tensor per step.
        wide = _wide(cache)
        src = wide[:, :, s0:s0 + n].permute(2, 0, 1, 3, 4, 5)  # [n, layers, kv, heads, max_seq, row]
        self._src = src
        out_shape = (n, layers, 2, heads, 1, wide.shape[-1])
        self._staging, self._tails, self._index, self._out = [], [], [], []
        for _ in range(depth):
            buf = torch.zeros(self.step_bytes, dtype=torch.uint8, device=self.device)
            tail = buf[self.positions_at:self.positions_at + 8 * n].view(torch.int64)
            self._staging.append(buf)
            self._tails.append(tail)
            self._index.append(tail.view(n, 1, 1, 1, 1, 1).expand(out_shape))
            self._out.append(buf[:self.data_bytes].view(wide.dtype).view(out_shape))
        # Host-side positions: written on the host, then copied to the slot's tail (pinned on a GPU so
        # the copy is async); on the CPU the staging tail is host memory already.
        if self.on_gpu:
            self._host_pos = [torch.zeros(n, dtype=torch.int64, pin_memory=True) for _ in range(depth)]
        else:
            self._host_pos = self._tails
        self._host_np = [t.numpy() for t in self._host_pos]

        # Ring state per slot: busy, what to keep alive until landed, bytes, and (GPU) timing events.
        self._busy = [False] * depth
        self._keep: list = [None] * depth
        self._bytes = [0] * depth
        self._in_flight = 0
        self._next = 0
        self.steps = 0
        if self.on_gpu:
            self._side = side_stream(self.device)
            self._ready = [torch.cuda.Event(enable_timing=True) for _ in range(depth)]
            self._done = [torch.cuda.Event(enable_timing=True) for _ in range(depth)]
        if reserve:
            self.reserve(steps=reserve)

    # ---- setup -------------------------------------------------------------------------------------
    def reserve(self, steps: int = 0, boxes: Sequence[Box] = ()) -> None:
        """Pin host buffers now for ``steps`` more steps and one of each box (no-op on the CPU)."""
        if not self.on_gpu:
            return
        if steps:
            self.transport.reserve(self.step_bytes, steps)
        sizes: dict[int, int] = {}
        for b in boxes:
            size = b.count() * self.cache.shape[-1] * self.cache.element_size()
            sizes[size] = sizes.get(size, 0) + 1
        for size, count in sizes.items():
            self.transport.reserve(size, count)

    # ---- per step ------------------------------------------------------------------------------------
    def step(self, positions, key: str | None = None) -> int:
        """Replicate this step's slice (slot ``slots[i]`` wrote position ``positions[i]``) under ``key``
        (default ``f"{prefix}t{n}"``); returns n, the step's number. Nothing waits for the copy.

        ``positions``: a device tensor of ``len(slots)`` integers (any shape, e.g. ``[b, 1]``; not
        checked against the cache: that would need a device sync), or host integers (checked).
        """
        n = self.steps
        key = f"{self.prefix}t{n}" if key is None else key
        on_device = isinstance(positions, torch.Tensor) and positions.device.type != "cpu"
        if on_device:
            self._check_device_positions(positions)
        else:
            positions = self._host_positions(positions)
        self._check_current_device()
        i = self._take(key)
        buf = self.transport.claim(key, self.step_bytes, self.meta, pinned=self.on_gpu)
        if on_device:  # the snapshot, on the caller's stream: the caller may overwrite its tensor next
            self._tails[i].copy_(positions.reshape(-1), non_blocking=True)
        else:
            self._host_np[i][:] = positions
        start = self._enter(i)
        try:
            if self.on_gpu and not on_device:
                self._tails[i].copy_(self._host_pos[i], non_blocking=True)  # pinned: async
            torch.gather(self._src, 4, self._index[i], out=self._out[i])
            buf.copy_(self._staging[i], non_blocking=True)  # the slice and its positions, one copy
        finally:
            self._leave(i, start, self.data_bytes)
        self.steps = n + 1
        return n

    def box(self, box: Box, key: str) -> None:
        """Replicate ``box`` of the cache (e.g. one layer of the prompt's positions) under ``key``, through
        the same ring; :func:`~dejavu.streaming.stream.restore` puts it back like a replicate_box chunk."""
        view = region(self.cache, self.part, box)  # checks the box is inside the partition
        self._check_current_device()
        size = nbytes(view)
        i = self._take(key)
        meta = {"box": box.to_meta(), "dtype": dtype_name(view.dtype), "shape": list(view.shape)}
        host = self.transport.claim(key, size, meta, pinned=self.on_gpu).view(view.dtype).view(view.shape)
        start = self._enter(i)
        try:
            # A strided box is gathered on the side stream into a temporary (the allocator reuses its
            # memory in that stream's order), kept until the copy has landed.
            src = view if view.is_contiguous() or not self.on_gpu else view.contiguous()
            host.copy_(src, non_blocking=True)
            if self.on_gpu:
                self._keep[i] = src
        finally:
            self._leave(i, start, size)

    def wait(self) -> None:
        """Block until every step and box issued so far has landed in host memory (and count them)."""
        for k in range(self.depth):
            i = (self._next + k) % self.depth  # oldest first
            if self._busy[i]:
                self._retire(i)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ---- internals ------------------------------------------------------------------------------------
    def _check_device_positions(self, positions: torch.Tensor) -> None:
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"positions must be integers, got a {positions.dtype} tensor")
        if positions.numel() != len(self.slots):
            raise ValueError(f"got {positions.numel()} positions for {len(self.slots)} slots {list(self.slots)}")
        if positions.device != self.device:
            raise ValueError(f"positions are on {positions.device} but the cache is on {self.device}")

    def _host_positions(self, positions) -> list[int]:
        if isinstance(positions, torch.Tensor):
            if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
                raise TypeError(f"positions must be integers, got a {positions.dtype} tensor")
            positions = positions.reshape(-1).tolist()
        try:
            positions = [operator.index(p) for p in positions]
        except TypeError:
            raise TypeError(f"positions must be integers, got {positions!r}") from None
        if len(positions) != len(self.slots):
            raise ValueError(f"got {len(positions)} positions for {len(self.slots)} slots {list(self.slots)}")
        if min(positions) < 0 or max(positions) >= self.max_seq:
            raise ValueError(f"positions {positions} are outside the cache's {self.max_seq} positions")
        return positions

    def _check_current_device(self) -> None:
        if self.on_gpu and torch.cuda.current_device() != self.device.index:
            raise RuntimeError(f"the current CUDA device is cuda:{torch.cuda.current_device()} but the cache is on "
                               f"{self.device}; replicate under torch.cuda.device({self.device.index})")

    def _enter(self, i: int):
        """Start slot ``i``'s work: on a GPU, switch to the side stream after the compute stream's queued
        work (returns the compute stream); on the CPU, returns the start time."""
        if not self.on_gpu:
            return time.perf_counter()
        compute = torch.cuda.current_stream()
        self._ready[i].record(compute)
        self._side.wait_event(self._ready[i])
        torch.cuda.set_stream(self._side)
        return compute

    def _leave(self, i: int, start, size: int) -> None:
        if not self.on_gpu:
            self._landed(size, time.perf_counter() - start)
            return
        try:
            self._done[i].record(self._side)
        finally:
            torch.cuda.set_stream(start)
        self._busy[i], self._bytes[i] = True, size
        self._in_flight += 1

    def _take(self, key: str) -> int:
        """The next ring slot, once the step that last used it has landed."""
        if self._in_flight and self.transport.holds(key):
            # A re-sent key reuses (or frees) its host buffer: let every copy in flight land first.
            self.wait()
        i = self._next
        self._next = (i + 1) % self.depth
        if self._busy[i]:
            self._retire(i)
        return i

    def _retire(self, i: int) -> None:
        self._done[i].synchronize()
        seconds = self._ready[i].elapsed_time(self._done[i]) / 1e3  # issue -> landed, on the device clock
        self._busy[i], self._keep[i] = False, None
        self._in_flight -= 1
        self._landed(self._bytes[i], seconds)

    def _landed(self, size: int, seconds: float) -> None:
        if self.stats is not None:
            self.stats.add(self.path, self.transport.name, size, seconds)
