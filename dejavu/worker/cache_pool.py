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
    """One microbatch's hold on a buffer."""

    buffer: Buffer
    slots: int
    cache: KVCache = field(init=False)  # the microbatch's slots only

    def __post_init__(self) -> None:
        full = self.buffer.cache
        if self.slots == full.shape.batch:
            self.cache = full
        else:
            self.cache = KVCache.from_tensor(full.data[:, :, : self.slots])


class CachePool:
    def __init__(self, model: StageModel, batch: int, *, cuda_graphs: bool = False, round_to: int = 256) -> None:
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this stage runs on {model.device}")
        self.model, self.batch, self.cuda_graphs, self.round_to = model, batch, cuda_graphs, round_to
        self.free: list[Buffer] = []
        self.leases: dict[int, Lease] = {}
        self.allocated = 0  # buffers made so far (a test and the logs read it)
        # One memory pool for every buffer's prefill graphs: a stage runs one prefill at a time.
        self.graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def acquire(self, ubatch: int, slots: int, max_seq: int) -> Lease:
        """A buffer for microbatch ``ubatch`` of ``slots`` requests writing positions below ``max_seq``."""
        if ubatch in self.leases:
            raise ValueError(f"microbatch {ubatch} already holds a KV buffer")
        if not 1 <= slots <= self.batch:
            raise ValueError(f"microbatch {ubatch} has {slots} requests; the KV buffers hold 1..{self.batch} "
                             f"(--ubatch_size)")
        fits = [b for b in self.free if b.cache.shape.max_seq >= max_seq]
        if fits:
            buf = min(fits, key=lambda b: b.cache.shape.max_seq)
            self.free.remove(buf)
        else:
            if self.free:  # too short for this microbatch: make room for a longer one instead
                self.free.pop(0)
            length = min(-(-max_seq // self.round_to) * self.round_to, self.model.cfg.max_positions)
            buf = Buffer(self.model.new_cache(self.batch, max(length, max_seq)))
            self.allocated += 1
        lease = Lease(buf, slots)
        self.leases[ubatch] = lease
        return lease

    def release(self, ubatch: int) -> None:
        lease = self.leases.pop(ubatch, None)
        if lease is not None:
            self.free.append(lease.buffer)

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
