"""StepReplicator: the per-token-step replication fast path (one object per cache buffer and store).

:func:`~dejavu.streaming.stream.replicate_step` works out everything again on every call (the step
slice, an index tensor, a fresh output tensor, a store entry, an event, a handle). A token stage
replicates the same cache every step, so this object works out all of it once. On a GPU a step is::

    (compute stream) copy the step's positions into the ring slot's staging tail   [device positions]
                     record the slot's "ready" event
    (side stream)    wait for it; [host positions: copy them in from the slot's pinned buffer]
                     replay one CUDA graph: gather into the slot's staging buffer, copy it to host memory
                     record the slot's "done" event

Each graph bakes its addresses, so there is one per *landing buffer*: the pinned host buffers reserved
up front (:meth:`reserve`) are the stored replicas themselves (adopted by the :class:`LocalTransport`
under the step's key, handed back when the key is dropped or replaced), and landing buffer ``j`` is
tied to staging slot ``j % depth``. No host memcpy, no allocation, five host calls a step (with device
positions, four of them CUDA driver calls on raw handles: :mod:`~dejavu.streaming.driver`). A step that
finds none of its slot's landing buffers free copies eagerly (gather, then copy) into another free one,
or, past what was reserved, into a buffer the transport pins (which may synchronize the device: reserve
enough). On the CPU the same bookkeeping runs with plain copies.

Positions may be a device tensor (e.g. the CUDA-graph decode's ``positions`` buffer, shape ``[b, 1]``):
they are snapshotted on the caller's stream, so the caller may overwrite them right after, and the host
never waits for the device. Or a host list/tensor: checked against the cache on the host, staged
through the slot's pinned positions buffer.

The gathered bytes are ``[slots, layers, kv, heads, head_dim]`` (the layout of
:class:`~dejavu.streaming.staging.StepSlice`) followed, at byte ``positions_at``, by the slots'
positions as int64: with device positions the host never knows them at issue time, so they travel with
the data. :func:`~dejavu.streaming.stream.restore` reads them from there.

A ring of ``depth`` slots bounds the steps in flight: reusing a slot first waits (on the host) for the
step that last used it, ``depth`` steps ago. The compute stream never waits for a copy.

:meth:`StepReplicator.box` sends a box of the same cache (e.g. one layer of the prompt, one per decode
step) through a ring of its own (``box_depth`` staging buffers, sized by :meth:`reserve`).

Nothing on the issue path may make the host wait for queued compute: no device or pinned allocation
(reserve up front), no event query, and no first launch of a kernel (CUDA loads kernels lazily, and
loading one waits for the device's queue to drain): the constructor launches every kernel a step or box
uses once, before anything is timed.

One thread per replicator; :meth:`StepReplicator.wait` before fetching, restoring or dropping its keys,
and before dropping the replicator.
"""

from __future__ import annotations

import functools
import operator
import time
from typing import Callable, Sequence

import torch

from ..model.config import dtype_name
from . import driver
from .plan import Box, Partition
from .staging import StagingPool, region
from .stats import StreamStats
from .transports.base import nbytes, side_stream
from .transports.local import LocalTransport

# The current stream's raw handle, without building a Stream object (absent from CPU-only builds).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_ALIGN = 64  # bytes: step buffers are carved from one host block; keep each one (and its tail) aligned
_INTEGER = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def _landed_already() -> None:
    pass


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


class _Ring:
    """``depth`` slots of side-stream work: busy flags, bytes, and (GPU) ready/done timing events."""

    def __init__(self, depth: int, on_gpu: bool) -> None:
        self.depth, self.next = depth, 0
        self.busy = [False] * depth
        self.bytes = [0] * depth
        if on_gpu:
            self.ready = [torch.cuda.Event(enable_timing=True) for _ in range(depth)]
            self.done = [torch.cuda.Event(enable_timing=True) for _ in range(depth)]


class StepReplicator:
    """Replicates one cache buffer's token steps (and boxes) into a :class:`LocalTransport`.

    ``cache``: the stage's buffer ``[layers, 2, slots, heads, max_seq, head_dim]`` holding ``part``.
    ``slots``: the global slots each step covers (consecutive; default all of ``part``'s).
    ``prefix``: default keys are ``f"{prefix}t{n}"`` for the n-th step.
    ``depth``: steps in flight at most; ``box_depth``: boxes in flight at most.
    ``reserve``: host buffers (and, on a GPU, their CUDA graphs) for this many steps now: see :meth:`reserve`.
    ``graphs``: on a GPU, replay a captured graph per step (False: issue the gather and copy eagerly).
    """

    def __init__(self, cache: torch.Tensor, part: Partition, transport: LocalTransport, *, prefix: str = "",
                 slots: Sequence[int] | None = None, depth: int = 8, box_depth: int = 2, reserve: int = 0,
                 graphs: bool = True, stats: StreamStats | None = None, path: str = "replication") -> None:
        if not hasattr(transport, "adopt"):
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
        if depth < 1 or box_depth < 1:
            raise ValueError(f"depth={depth}, box_depth={box_depth}: a ring needs at least one slot")

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

        if self.on_gpu:
            # The gather: out[b, l, kv, h, 0, :] = cache[l, kv, s0 + b, h, positions[b], :], with the
            # positions as an expanded (stride 0) index: no index arithmetic tensor per step.
            wide = _wide(cache)
            self._src = wide[:, :, s0:s0 + n].permute(2, 0, 1, 3, 4, 5)  # [n, layers, kv, heads, max_seq, row]
            out_shape = (n, layers, 2, heads, 1, wide.shape[-1])
            self._staging, self._tails, self._index, self._out = [], [], [], []
            for _ in range(depth):
                buf = torch.zeros(self.step_bytes, dtype=torch.uint8, device=self.device)
                tail = buf[self.positions_at:self.positions_at + 8 * n].view(torch.int64)
                self._staging.append(buf)
                self._tails.append(tail)
                self._index.append(tail.view(n, 1, 1, 1, 1, 1).expand(out_shape))
                self._out.append(buf[:self.data_bytes].view(wide.dtype).view(out_shape))
            # Host-side positions: written on the host, then copied to the slot's tail (pinned: async).
            self._host_pos = [torch.zeros(n, dtype=torch.int64, pin_memory=True) for _ in range(depth)]
            self._host_np = [t.numpy() for t in self._host_pos]
        else:
            # No staging on the CPU: a step copies its slots' rows straight into its host buffer.
            self._slots_view = cache[:, :, s0:s0 + n]  # [layers, kv, n, heads, max_seq, head_dim]

        # Landing buffers (reserved host buffers, each a future stored step): free ones per staging slot,
        # the call that hands one back to its slot's free list, and (GPU) the graph that fills it.
        self._landing: list[torch.Tensor] = []
        self._free: list[list[int]] = [[] for _ in range(depth)]
        self._give_back: list[Callable[[], None]] = []
        self._graphs: list = []
        self.graph_replays = 0  # steps issued as one graph replay (GPU)
        self.driver_issues = 0  # of which issued by direct driver calls (driver.py)
        self.overflow_steps = 0  # steps that found no reserved buffer free (the transport gave one)
        self.graph_error: str | None = None  # why capturing failed, where it did (steps then run eagerly)

        self._ring, self._box_ring = _Ring(depth, self.on_gpu), _Ring(box_depth, self.on_gpu)
        self._in_flight = 0
        self.steps = 0
        self._last_slot = 0  # the step ring's slot of the step issued last (landed())
        self._checked = self._checked_flat = None  # the device positions tensor last checked, and its flat view
        self._compute = self._compute_raw = None  # the caller's stream, cached (see _compute_stream)
        if self.on_gpu:
            self._side = side_stream(self.device)
            self._box_staging = StagingPool(self.device)  # taken on the side stream: its blocks are its own
            self._use_graphs = graphs
            self._graph_pool = None
            self._load_kernels()
            # Raw handles for the driver issue path (driver.py): the side stream, the step ring's events
            # (created by _load_kernels), one graph exec per landing buffer (None: replayed by PyTorch).
            self._driver = driver.load() if _raw_stream is not None else None
            self._side_raw = self._side.cuda_stream
            self._ready_raw = [e.cuda_event for e in self._ring.ready]
            self._done_raw = [e.cuda_event for e in self._ring.done]
            self._tail_ptr = [t.data_ptr() for t in self._tails]
            self._execs: list[int | None] = []
            self._checked_ptr = None  # the checked device positions' address, where int64 and contiguous
        if reserve:
            self.reserve(steps=reserve)

    # ---- setup -------------------------------------------------------------------------------------
    def reserve(self, steps: int = 0, boxes: Sequence[Box] = ()) -> None:
        """Set up, now, everything ``steps`` more steps and one of each of ``boxes`` will use: host
        buffers for the steps (rounded up to a multiple of ``depth``; pinned on a GPU, with one captured
        CUDA graph each), pinned host buffers for the boxes, and the box ring's staging buffers.

        Call it while setting up (it allocates, may synchronize the device, and captures graphs)."""
        if steps > 0:
            count = _round_up(steps, self.depth)
            first = len(self._landing)
            self._landing += self.transport.buffers(self.step_bytes, count)
            for j in range(first, first + count):
                free = self._free[j % self.depth]
                self._give_back.append(functools.partial(free.append, j))
                if self.on_gpu:
                    graph = self._capture(j)
                    if graph is not None:  # a graph's first launch uploads it: do that now, not in a step
                        with torch.cuda.stream(self._side):
                            graph.replay()  # into staging and landing buffer j, both unused yet
                    self._graphs.append(graph)
                    self._execs.append(graph.raw_cuda_graph_exec() if graph is not None and self._driver else None)
                free.append(j)
        if not boxes:
            return
        sizes: dict[int, int] = {}
        for b in boxes:
            size = b.count() * self.cache.shape[-1] * self.cache.element_size()
            sizes[size] = sizes.get(size, 0) + 1
        for size, count in sizes.items():
            self.transport.reserve(size, count)
        if self.on_gpu:  # box staging: each ring slot as large as the largest box, allocated now
            biggest = max(boxes, key=lambda b: b.count())
            shape = biggest.shape(self.cache.shape[-1])
            with torch.cuda.stream(self._side):
                for k in range(self._box_ring.depth):
                    self._box_staging.take(k, shape, self.cache.dtype)

    def _load_kernels(self) -> None:
        """Launch once, at setup, every kernel a step or a box uses (the gather; the copies that snapshot
        int32 or strided device positions; the strided copy that gathers a box), on the side stream, into
        scratch (the ring's tails are the compute stream's to write). CUDA loads a kernel on its first
        launch, and loading waits for every queued kernel to finish: the first step must not be it."""
        n = len(self.slots)
        # The staging buffers were zeroed on the compute stream: the side stream reads them after that,
        # and the allocator keeps their memory until the side stream is done with it.
        self._side.wait_stream(torch.cuda.current_stream())
        for buf in self._staging:
            buf.record_stream(self._side)
        with torch.cuda.stream(self._side):
            torch.gather(self._src, 4, self._index[0], out=self._out[0])  # tails are zeros: valid positions
            snapshot = torch.empty(n, dtype=torch.int64, device=self.device)
            snapshot.copy_(torch.zeros(n, dtype=torch.int32, device=self.device))
            snapshot.copy_(torch.zeros(n, 2, dtype=torch.int64, device=self.device)[:, 0])  # strided positions
            strided = self.cache[:1, :, :1, :1, :2]
            torch.empty(strided.shape, dtype=strided.dtype, device=self.device).copy_(strided)
            for ring in (self._ring, self._box_ring):  # an event's first record creates it: do that now too
                for event in ring.ready + ring.done:
                    event.record(self._side)

    def _capture(self, j: int):
        """The graph that fills landing buffer ``j`` through staging slot ``j % depth``: the gather,
        then one copy of the staging buffer (slice and positions) into ``j``. None where not captured."""
        if not self._use_graphs or self.graph_error is not None:
            return None
        s = j % self.depth
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream(device=self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(self._capture_stream):
                # thread_local: another thread of the worker may allocate meanwhile; nothing here does.
                graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
                try:
                    torch.gather(self._src, 4, self._index[s], out=self._out[s])
                    self._landing[j].copy_(self._staging[s], non_blocking=True)
                finally:
                    graph.capture_end()
        except Exception as e:  # keep working (eagerly) and say why; tests and the bench check this
            self.graph_error = f"{type(e).__name__}: {e}"
            return None
        return graph

    # ---- per step ------------------------------------------------------------------------------------
    def step(self, positions, key: str | None = None) -> int:
        """Replicate this step's slice (slot ``slots[i]`` wrote position ``positions[i]``) under ``key``
        (default ``f"{prefix}t{n}"``); returns n, the step's number. Nothing waits for the copy.

        ``positions``: a device tensor of ``len(slots)`` integers (any shape, e.g. ``[b, 1]``; not
        checked against the cache: that would need a device sync), or host integers (checked).
        """
        n = self.steps
        if key is None:
            key = f"{self.prefix}t{n}"
        if positions is self._checked:  # a decode loop passes the same (graph's) tensor every step
            host = None
        elif isinstance(positions, torch.Tensor) and positions.device.type != "cpu":
            self._check_device_positions(positions)
            self._checked, self._checked_flat = positions, positions.reshape(-1)
            flat = self._checked_flat
            self._checked_ptr = flat.data_ptr() if self.on_gpu and flat.dtype == torch.int64 and \
                flat.is_contiguous() else None
            host = None
        else:
            host = self._host_positions(positions)
        if self.on_gpu:
            self._step_on_gpu(key, positions, host)
        else:
            self._step_on_cpu(key, host)
        self.steps = n + 1
        return n

    def landed(self) -> Callable[[], None]:
        """For the step just issued: a call that returns once its bytes are in its host buffer. Another
        thread may make it (a transport's I/O thread that forwards the step to a peer). On a GPU it waits
        for the ring slot's "done" event; if that slot was reused meanwhile, for the later step, which the
        side stream finishes after this one."""
        if not self.on_gpu:
            return _landed_already
        return self._ring.done[self._last_slot].synchronize

    def _step_on_gpu(self, key: str, positions, host: list[int] | None) -> None:
        self._check_current_device()
        if self._in_flight and self.transport.holds(key):
            self.wait()  # a re-sent key reuses (or frees) its host buffer: let every copy land first
        ring = self._ring
        s = self._last_slot = self._slot(ring)
        j, buf = self._destination(key, s)
        own = j is not None and j % self.depth == s  # landing buffer j has a graph through slot s
        if own and host is None and self._checked_ptr is not None and self._driver is not None \
                and self._execs[j] is not None and self._issue_by_driver(s, j):
            return
        if host is None:  # the snapshot, on the caller's stream: the caller may overwrite its tensor next
            self._tails[s].copy_(self._checked_flat, non_blocking=True)
        else:
            self._host_np[s][:] = host  # slot s is retired: its last copy from this buffer has run
        compute = self._enter(ring, s)
        try:
            if host is not None:
                self._tails[s].copy_(self._host_pos[s], non_blocking=True)  # pinned: async
            graph = self._graphs[j] if own else None
            if graph is not None:
                graph.replay()
                self.graph_replays += 1
            else:
                self._gather_into(s, buf)
        finally:
            self._leave(ring, s, compute, self.data_bytes)

    def _issue_by_driver(self, s: int, j: int) -> bool:
        """The step of ``_step_on_gpu`` (device positions, landing buffer ``j``'s graph) as four driver
        calls; False, with nothing queued, where this thread has no current CUDA context."""
        drv, compute, side = self._driver, _raw_stream(self.device.index), self._side_raw
        try:
            drv.copy(self._tail_ptr[s], self._checked_ptr, 8 * len(self.slots), compute)
        except driver.CudaError as e:
            if e.code not in driver.Driver.NO_CONTEXT:
                raise
            self._driver = None  # this thread never made the device current: PyTorch's calls do
            return False
        drv.record(self._ready_raw[s], compute)
        drv.wait(side, self._ready_raw[s])
        drv.launch(self._execs[j], side)
        drv.record(self._done_raw[s], side)
        self._mark_in_flight(self._ring, s, self.data_bytes)
        self.graph_replays += 1
        self.driver_issues += 1
        return True

    def _step_on_cpu(self, key: str, host: list[int]) -> None:
        s = self._slot(self._ring)
        _, buf = self._destination(key, s)
        start = time.perf_counter()
        # Straight into the host buffer, one strided copy per slot: on the CPU that beats the gather
        # kernel several times over (each slot's rows are contiguous runs of head_dim).
        out = buf[:self.data_bytes].view(self.cache.dtype).view(self.step_shape)
        for i, p in enumerate(host):
            out[i].copy_(self._slots_view[:, :, i, :, p])
        buf[self.positions_at:self.positions_at + 8 * len(host)].view(torch.int64).copy_(torch.tensor(host))
        self._landed(self.data_bytes, time.perf_counter() - start)

    def _destination(self, key: str, s: int) -> tuple[int | None, torch.Tensor]:
        """Where step slot ``s`` lands, stored under ``key``: a free landing buffer of slot ``s`` (its graph
        fills it), else any free landing buffer (filled eagerly), else one from the transport."""
        if self.transport.holds(key):  # re-sent (its copy has landed): its buffer may go back to a slot
            self.transport.discard(key)
        free = self._free[s]
        j = free.pop() if free else next((f.pop() for f in self._free if f), None)
        if j is None:
            self.overflow_steps += 1
            return None, self.transport.claim(key, self.step_bytes, self.meta, pinned=self.on_gpu)
        self.transport.adopt(key, self._landing[j], self.meta, self._give_back[j])
        return j, self._landing[j]

    def _gather_into(self, s: int, buf: torch.Tensor) -> None:
        torch.gather(self._src, 4, self._index[s], out=self._out[s])
        buf.copy_(self._staging[s], non_blocking=True)  # the slice and its positions, one copy

    def box(self, box: Box, key: str) -> None:
        """Replicate ``box`` of the cache (e.g. one layer of the prompt's positions) under ``key``, through
        the box ring; :func:`~dejavu.streaming.stream.restore` puts it back like a replicate_box chunk."""
        view = region(self.cache, self.part, box)  # checks the box is inside the partition
        size = nbytes(view)
        meta = {"box": box.to_meta(), "dtype": dtype_name(view.dtype), "shape": list(view.shape)}
        if not self.on_gpu:
            host = self.transport.claim(key, size, meta, pinned=False).view(view.dtype).view(view.shape)
            start = time.perf_counter()
            host.copy_(view)
            self._landed(size, time.perf_counter() - start)
            return
        self._check_current_device()
        if self._in_flight and self.transport.holds(key):
            self.wait()
        ring = self._box_ring
        k = self._slot(ring)
        host = self.transport.claim(key, size, meta, pinned=True).view(view.dtype).view(view.shape)
        compute = self._enter(ring, k)
        try:
            src = view
            if not view.is_contiguous():
                # Gathered into the slot's staging buffer, taken on the side stream (sized by reserve();
                # a larger box grows it: an allocation, on the side stream, in its order).
                src = self._box_staging.take(k, tuple(view.shape), view.dtype)
                src.copy_(view, non_blocking=True)
            host.copy_(src, non_blocking=True)
        finally:
            self._leave(ring, k, compute, size)

    def wait(self) -> None:
        """Block until every step and box issued so far has landed in host memory (and count them)."""
        for ring in (self._ring, self._box_ring):
            for d in range(ring.depth):
                i = (ring.next + d) % ring.depth  # oldest first
                if ring.busy[i]:
                    self._retire(ring, i)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def reserved_steps(self) -> int:
        """Landing buffers reserved (stored steps they hold included)."""
        return len(self._landing)

    # ---- internals ------------------------------------------------------------------------------------
    def _check_device_positions(self, positions: torch.Tensor) -> None:
        if positions.dtype not in _INTEGER:
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

    def _compute_stream(self) -> "torch.cuda.Stream":
        """The caller's current stream. ``torch.cuda.current_stream()`` costs ~7 us of Python on the issue
        path; the raw handle is one C call, so the Stream object is looked up only when it changes."""
        if _raw_stream is None:
            return torch.cuda.current_stream(self.device)
        raw = _raw_stream(self.device.index)
        if raw != self._compute_raw:
            self._compute, self._compute_raw = torch.cuda.current_stream(self.device), raw
        return self._compute

    def _check_current_device(self) -> None:
        if torch.cuda.current_device() != self.device.index:
            raise RuntimeError(f"the current CUDA device is cuda:{torch.cuda.current_device()} but the cache is on "
                               f"{self.device}; replicate under torch.cuda.device({self.device.index})")

    def _slot(self, ring: _Ring) -> int:
        """The ring's next slot, once the work that last used it (``depth`` issues ago) has landed."""
        i = ring.next
        ring.next = (i + 1) % ring.depth
        if ring.busy[i]:
            self._retire(ring, i)
        return i

    def _enter(self, ring: _Ring, i: int):
        """Switch to the side stream, after the compute stream's queued work; returns the compute stream."""
        compute = self._compute_stream()
        ring.ready[i].record(compute)
        ring.ready[i].wait(self._side)
        torch.cuda.set_stream(self._side)
        return compute

    def _leave(self, ring: _Ring, i: int, compute, size: int) -> None:
        try:
            ring.done[i].record(self._side)
        finally:
            torch.cuda.set_stream(compute)
        self._mark_in_flight(ring, i, size)

    def _mark_in_flight(self, ring: _Ring, i: int, size: int) -> None:
        """Slot ``i`` holds ``size`` bytes of side-stream work whose "done" event is recorded."""
        ring.busy[i], ring.bytes[i] = True, size
        self._in_flight += 1

    def _retire(self, ring: _Ring, i: int) -> None:
        ring.done[i].synchronize()
        seconds = ring.ready[i].elapsed_time(ring.done[i]) / 1e3  # issue -> landed, on the device clock
        ring.busy[i] = False
        self._in_flight -= 1
        self._landed(ring.bytes[i], seconds)

    def _landed(self, size: int, seconds: float) -> None:
        if self.stats is not None:
            self.stats.add(self.path, self.transport.name, size, seconds)
