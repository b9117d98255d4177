"""Prompt -> token KV-cache hand-over, through the streaming library (``dejavu.streaming``).

Both pipelines cover all layers but may split them differently (and shard KV heads by TP rank); the
library's planner intersects every prompt partition with every token partition, so each token stage
receives exactly its layers and heads of a microbatch's prompt positions ``[0, prompt_len)``. The prompt
stage issues each layer's chunk as soon as its forward has written it (layer-by-layer streaming); the
token stage posts the receives when its leader admits the microbatch. Both sides walk microbatches in
prefill order, so one plan's messages (tagged by their index in the plan) can be reused for every one.
"""

from __future__ import annotations

import functools
from collections import deque

from ..model.kv_cache import KVCache
from ..streaming import LayerwiseStreamer, StagingPool, StreamStats, make_plan, pipeline, stream_in
from .dataplane import DataPlane
from .topology import Role, Topology

PATH = "prompt->token"


class _Handover:
    def __init__(self, dp: DataPlane, topo: Topology, role: Role, stats: StreamStats) -> None:
        self.dp, self.topo, self.role, self.stats = dp, topo, role, stats
        self.transport = dp.kv_transport()
        self.prompt_ranks = [topo.rank_of("prompt", s, t) for s in range(topo.prompt_stages) for t in range(topo.tp)]
        self.token_ranks = [topo.rank_of("token", s, t) for s in range(topo.token_stages) for t in range(topo.tp)]

    @functools.lru_cache(maxsize=64)
    def plan(self, slots: int, prompt_len: int):
        kv = self.topo_kv_heads
        senders = pipeline(self.topo.layer_ranges("prompt"), num_kv_heads=kv, tp_size=self.topo.tp, slots=(0, slots))
        receivers = pipeline(self.topo.layer_ranges("token"), num_kv_heads=kv, tp_size=self.topo.tp, slots=(0, slots))
        return make_plan(senders, receivers, (0, prompt_len))

    @property
    def index(self) -> int:
        """This rank's partition in its pipeline's list (stage-major, TP rank minor)."""
        return self.role.stage * self.topo.tp + self.role.tp_rank


class KVSender(_Handover):
    """Prompt-stage side. ``window`` bounds how many microbatches' hand-overs may be outstanding: past it,
    the stage waits for the oldest to land, which is how a busy token pipeline slows the prompt side."""

    def __init__(self, dp: DataPlane, topo: Topology, role: Role, stats: StreamStats, *, num_kv_heads: int,
                 window: int = 2) -> None:
        super().__init__(dp, topo, role, stats)
        self.topo_kv_heads, self.window = num_kv_heads, window
        self.outstanding: deque = deque()
        self.streamer: LayerwiseStreamer | None = None

    def start(self, cache: KVCache, prompt_len: int):
        """Begin a microbatch; returns the ``on_layer_done`` callback for the stage's forward."""
        plan = self.plan(cache.shape.batch, prompt_len)
        self.streamer = LayerwiseStreamer(cache.data, plan, self.index, self.transport, prefix="kv",
                                          peers=self.token_ranks, stats=self.stats, path=PATH)
        return self.streamer.on_layer_done

    def ubatch_done(self) -> None:
        self.outstanding.append(self.streamer.finish(wait=False))
        self.streamer = None
        while len(self.outstanding) > self.window:
            self.outstanding.popleft().wait()

    def flush(self) -> None:
        while self.outstanding:
            self.outstanding.popleft().wait()


class KVReceiver(_Handover):
    """Token-stage side: fill a fresh cache's first ``prompt_len`` positions for this stage's layers."""

    def __init__(self, dp: DataPlane, topo: Topology, role: Role, stats: StreamStats, *, num_kv_heads: int) -> None:
        super().__init__(dp, topo, role, stats)
        self.topo_kv_heads = num_kv_heads
        # The token cache is longer than the prompt, so each message is scattered from a staging buffer;
        # one pool for the worker's life, so a hand-over never allocates (each receive waits for its own).
        self.staging: StagingPool | None = None

    def receive(self, cache: KVCache, prompt_len: int) -> None:
        plan = self.plan(cache.shape.batch, prompt_len)
        if self.staging is None:
            self.staging = StagingPool(cache.device)
        stream_in(cache.data, plan, self.index, self.transport, prefix="kv", peers=self.prompt_ranks,
                  stats=self.stats, path=PATH, staging=self.staging).wait()
