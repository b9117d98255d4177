"""Prompt -> token KV-cache hand-over between pipelines whose stages split the layers differently.

Each prompt stage ships every layer of a microbatch's cache, as soon as the prefill has written it, to
the token stage that owns that layer (same tensor-parallel rank on both sides: both pipelines shard the
KV heads the same way). A chunk is one layer's keys and values for the prompt's positions,
``[2, slots, kv_heads, prompt_len, head_dim]``. The receiving stage takes its layers, in layer order,
from whichever prompt stages hold them; chunks of one microbatch arrive after those of the previous one
because both sides walk microbatches in the same (prefill) order.

This is the plain torch.distributed / MPI version behind two small classes; the streaming library's
planner can replace it without the pipeline noticing.
"""

from __future__ import annotations

from collections import deque

import torch

from ..model.kv_cache import KVCache
from .dataplane import KV, DataPlane, Pending
from .topology import Role, Topology


def owner(ranges: list[tuple[int, int]], layer: int) -> int:
    for i, (a, b) in enumerate(ranges):
        if a <= layer < b:
            return i
    raise ValueError(f"layer {layer} is in no stage range {ranges}")


class KVSender:
    """Prompt-stage side. ``window`` bounds how many microbatches' sends may be outstanding: past it, the
    stage waits for the oldest to be taken, which is how a busy token pipeline slows the prompt side."""

    def __init__(self, dp: DataPlane, topo: Topology, role: Role, window: int = 2) -> None:
        self.dp, self.topo, self.role, self.window = dp, topo, role, window
        self.token_ranges = topo.layer_ranges("token")
        self.outstanding: deque[list[Pending]] = deque()
        self._current: list[Pending] = []

    def layer_done(self, cache: KVCache, local_layer: int, prompt_len: int) -> None:
        layer = self.role.layers[0] + local_layer
        dst = self.topo.rank_of("token", owner(self.token_ranges, layer), self.role.tp_rank)
        chunk = cache.data[local_layer, :, :, :, :prompt_len]
        self._current.append(self.dp.isend(dst, chunk, KV))

    def ubatch_done(self) -> None:
        self.outstanding.append(self._current)
        self._current = []
        while len(self.outstanding) > self.window:
            for p in self.outstanding.popleft():
                p.wait()

    def flush(self) -> None:
        while self.outstanding:
            for p in self.outstanding.popleft():
                p.wait()


class KVReceiver:
    """Token-stage side: fill a fresh cache's first ``prompt_len`` positions for this stage's layers."""

    def __init__(self, dp: DataPlane, topo: Topology, role: Role) -> None:
        self.dp, self.topo, self.role = dp, topo, role
        self.prompt_ranges = topo.layer_ranges("prompt")

    def receive(self, cache: KVCache, prompt_len: int) -> None:
        _, _, slots, heads, _, head_dim = cache.data.shape
        staging = torch.empty((2, slots, heads, prompt_len, head_dim), dtype=cache.dtype, device=cache.device)
        for local, layer in enumerate(range(*self.role.layers)):
            src = self.topo.rank_of("prompt", owner(self.prompt_ranges, layer), self.role.tp_rank)
            self.dp.recv_into(src, staging, KV)
            cache.data[local, :, :, :, :prompt_len].copy_(staging)
