"""KV buffers of a stage, reused from one microbatch to the next, with their decode CUDA graphs.

Allocating a cache per microbatch costs an allocation (and, on a GPU, a capture of the decode graph,
which is bound to the buffer's address) every time a microbatch enters. The pool keeps buffers of
``batch`` slots (the worker's ``--ubatch_size``) and a length rounded up to ``round_to`` positions, hands
a free one to each entering microbatch, and takes it back when the microbatch is released.

A microbatch with fewer requests than the buffer has slots uses the first ``b`` slots:

- prefill, hand-over and eager decode see :attr:`Lease.cache`, a view of those slots (no padded rows
  are computed);
- a graph-replayed decode step runs all ``batch`` slots (the graph's shapes are static); the spare slots
  step on whatever ids and positions they last held, inside the buffer, and their outputs are not read.

Decode attention reads each slot only up to its own position, so a buffer longer than a microbatch
needs costs memory, not time.

:func:`make_pool` picks the pool a stage's :class:`KVPoolOptions` ask for: this one (one buffer per
microbatch in flight), or, with swapping, :class:`~dejavu.worker.swap.SwappingPool` (``resident``
buffers on the device, every other microbatch's cache in host memory). Both check at start-up
(:meth:`CachePool.plan`) that the caches of the microbatches in flight fit the KV memory the stage has,
and report what they used (:meth:`CachePool.report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.cuda_graphs import PrefillGraphs, input_buffer
from ..model.kv_cache import KVCache
from ..model.stage import StageModel


@dataclass
class Buffer:
    cache: KVCache  # all slots, max_seq positions
    graph: object | None = None  # DecodeGraph, captured at the buffer's first decode step
    prefill: PrefillGraphs | None = None  # short prefills into this buffer, captured on first use


@dataclass
class Lease:
    """One microbatch's hold on a buffer.

    With swapping the buffer changes from turn to turn (:meth:`rebind`); ``cache`` stays the same
    object and follows it, so a caller may keep ``lease.cache`` (or a ``Ubatch.cache`` taken from it), but
    must read it only while the pool has the microbatch resident (during its turn, or after
    :meth:`CachePool.make_resident`).
    """

    buffer: Buffer
    slots: int
    ubatch: int = -1
    own_cache: bool = False  # cache is a view object of its own, even over all the slots (swapping)
    cache: KVCache = field(init=False)  # the microbatch's slots only

    def __post_init__(self) -> None:
        full = self.buffer.cache
        if self.slots == full.shape.batch and not self.own_cache:
            self.cache = full
        else:
            self.cache = KVCache.from_tensor(full.data[:, :, : self.slots])

    def rebind(self, buffer: Buffer) -> None:
        """Hold ``buffer`` from now on (swapping: the resident buffer this microbatch got for its turn)."""
        if buffer is self.buffer:
            return
        self.buffer = buffer
        self.cache.data = buffer.cache.data[:, :, : self.slots]
        self.cache.step = None


@dataclass
class KVPoolOptions:
    """How a stage that decodes keeps its microbatches' KV caches (worker flags ``--swapping``,
    ``--resident_buffers``, ``--inflight_ubatches``, ``--kv_memory_gb``; ``topology.*`` in dejavu-run)."""

    swapping: bool = False
    resident: int = 2  # with swapping: device buffers (the microbatch running and the one after it)
    inflight: int | None = None  # microbatches the pipeline keeps in flight; None: one per stage
    budget_bytes: int | None = None  # device memory for KV buffers; None: free device memory (GPU), unchecked (CPU)
    max_seq: int | None = None  # positions every buffer is planned for (the workload's longest request)


def buffer_positions(max_seq: int, max_positions: int, round_to: int = 256) -> int:
    """Positions of the buffer the pool allocates for a microbatch writing positions below ``max_seq``."""
    return max(min(-(-max_seq // round_to) * round_to, max_positions), max_seq)


def make_pool(model: StageModel, batch: int, *, cuda_graphs: bool = False, options: KVPoolOptions | None = None,
              stats=None) -> "CachePool":
    """The stage's KV pool: swapping (``options.swapping``) or one buffer per microbatch in flight.
    ``stats``: the worker's StreamStats; swaps are tallied there under the path "swap"."""
    if options is not None and options.swapping:
        from .swap import SwappingPool

        return SwappingPool(model, batch, cuda_graphs=cuda_graphs, options=options, stats=stats)
    return CachePool(model, batch, cuda_graphs=cuda_graphs, options=options)


class CachePool:
    swapping = False

    def __init__(self, model: StageModel, batch: int, *, cuda_graphs: bool = False, round_to: int = 256,
                 options: KVPoolOptions | None = None) -> None:
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this stage runs on {model.device}")
        self.model, self.batch, self.cuda_graphs, self.round_to = model, batch, cuda_graphs, round_to
        self.options = options or KVPoolOptions()
        self.inflight = self.options.inflight  # the leader admits this many microbatches (None: one per stage)
        self.free: list[Buffer] = []
        self.leases: dict[int, Lease] = {}
        self.allocated = 0  # buffers made so far (a test and the logs read it)
        self.device_bytes = 0  # KV buffers held on the device now, and at most
        self.peak_device_bytes = 0
        # One memory pool for every buffer's prefill graphs: a stage runs one prefill at a time.
        self.graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def check_lease(self, ubatch: int, slots: int) -> None:
        """What every pool refuses: a second lease for a microbatch, or more requests than a buffer's slots."""
        if ubatch in self.leases:
            raise ValueError(f"microbatch {ubatch} already holds a KV buffer")
        if not 1 <= slots <= self.batch:
            raise ValueError(f"microbatch {ubatch} has {slots} requests; the KV buffers hold 1..{self.batch} "
                             f"(--ubatch_size)")

    def acquire(self, ubatch: int, slots: int, max_seq: int) -> Lease:
        """A buffer for microbatch ``ubatch`` of ``slots`` requests writing positions below ``max_seq``."""
        self.check_lease(ubatch, slots)
        fits = [b for b in self.free if b.cache.shape.max_seq >= max_seq]
        if fits:
            buf = min(fits, key=lambda b: b.cache.shape.max_seq)
            self.free.remove(buf)
        else:
            if self.free:  # too short for this microbatch: make room for a longer one instead
                self.device_bytes -= self.free.pop(0).cache.nbytes()
            length = buffer_positions(max_seq, self.model.cfg.max_positions, self.round_to)
            buf = Buffer(self.model.new_cache(self.batch, length))
            self.allocated += 1
            self.device_bytes += buf.cache.nbytes()
            self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        lease = Lease(buf, slots, ubatch)
        self.leases[ubatch] = lease
        return lease

    def release(self, ubatch: int) -> None:
        lease = self.leases.pop(ubatch, None)
        if lease is not None:
            self.free.append(lease.buffer)

    # ---- memory: the start-up check, where a cache lives, the report ----------------------------------
    def warm_buffers(self, stages: int) -> int:
        """How many buffers a GPU warm-up allocates and captures: one per microbatch in flight."""
        return self.inflight or stages

    def plan(self, max_seq: int, names: dict[str, str] | None = None, who: str = "this stage") -> None:
        """Before serving: check that the KV buffers of the microbatches in flight (with swapping: the
        resident ones, and the host copies of the rest) fit the memory there is, for requests writing
        positions below ``max_seq``; a ValueError says what is needed, what there is and what to change.
        ``names``: what to call the options in the message (worker flags by default)."""
        from .swap import budget_of, check_kv, kv_need

        need = kv_need(self.model.cache_shape(self.batch, 1), self.model.dtype, ubatch=self.batch,
                       max_seq=max_seq, max_positions=self.model.cfg.max_positions, round_to=self.round_to,
                       inflight=self.inflight or 1, swapping=self.swapping, resident=self.options.resident)
        budget, source = budget_of(self.options.budget_bytes, self.model.device, names)
        problems = check_kv(need, budget, source, names=names, who=who)
        if problems:
            raise ValueError("; ".join(problems))
        self.planned = need

    def cache_of(self, ubatch: int) -> torch.Tensor:
        """The whole KV buffer ``[layers, 2, batch, heads, positions, head_dim]`` holding ``ubatch``'s cache
        (its first ``slots`` slots), wherever it lives (here: always its device buffer)."""
        return self.leases[ubatch].buffer.cache.data

    def make_resident(self, ubatch: int) -> Lease:
        """``ubatch``'s lease with its cache in a device buffer (always so without swapping)."""
        return self.leases[ubatch]

    def report(self) -> dict:
        """What the pool used, for the worker's Stats (summary.json: workers.N.kv_pool)."""
        return {"swapping": False, "inflight": self.inflight, "buffers": self.allocated,
                "peak_device_kv_bytes": self.peak_device_bytes, "peak_host_swap_bytes": 0}

    @torch.no_grad()
    def prefill(self, lease: Lease, x: torch.Tensor, logits_index: torch.Tensor | None) -> torch.Tensor:
        """The prompts of the leased slots from position 0: x [b, t] ids or [b, t, hidden]. A short prefill
        replays a graph (see PrefillGraphs) whose output is its own tensor, like decode's."""
        b, t = x.shape[:2]
        x = x.to(self.model.device)
        if self.cuda_graphs:
            # A graph over the whole buffer: a microbatch of fewer requests leaves the spare slots to padding.
            graphs, full = self.prefill_graphs(lease.buffer), lease.buffer.cache
            if graphs.fits(full, t):
                return graphs(x, full, logits_index)
        # Positions on the CPU: the stage plans the step from them without a device sync.
        return self.model(x, torch.arange(t).expand(b, t), lease.cache, logits_index)

    def prefill_graphs(self, buf: Buffer) -> PrefillGraphs:
        if buf.prefill is None:
            buf.prefill = PrefillGraphs(self.model, pool=self.graph_pool)
        return buf.prefill

    @torch.no_grad()
    def warm_prefill(self, lease: Lease) -> None:
        """Capture now the prefill graphs of every padded length that fits the leased buffer."""
        full = lease.buffer.cache
        graphs = self.prefill_graphs(lease.buffer)
        for n in graphs.lengths(full):
            graphs(input_buffer(self.model, self.batch, n), full,
                   torch.zeros(self.batch, dtype=torch.long) if self.model.is_last else None)

    def positions_on_device(self, lease: Lease) -> torch.Tensor | None:
        """The device tensor ``[slots, 1]`` that the lease's last decode step, a graph replay, read its
        positions from (replication snapshots them there, with no host work), or None where steps run
        eagerly. The same tensor object every step of a full buffer."""
        graph = lease.buffer.graph
        if graph is None:
            return None
        return graph.positions if lease.slots == graph.positions.shape[0] else graph.positions[: lease.slots]

    @torch.no_grad()
    def decode(self, lease: Lease, x: torch.Tensor, positions: torch.Tensor,
               logits_index: torch.Tensor | None) -> torch.Tensor:
        """One token step of the leased slots: x [b, 1] ids or [b, 1, hidden], positions [b, 1] (CPU)."""
        if not self.cuda_graphs:
            return self.model(x.to(self.model.device), positions, lease.cache, logits_index)
        buf = lease.buffer
        if buf.graph is None:
            buf.graph = self.model.capture_decode(buf.cache)
        # The output is the graph's own tensor, overwritten by the next replay of this buffer's graph.
        return buf.graph(x, positions)[: lease.slots]
