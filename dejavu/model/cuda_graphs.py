"""A stage's decode step, and its short prefills, captured as CUDA graphs: one launch instead of hundreds.

A decode step of a 1B model is ~300 kernels of a few microseconds each; launched from Python that is
several milliseconds of CPU time for ~1 ms of GPU work. The step is captured once with static shapes
(``StageModel.forward(..., static=True)``: attention reads the cache up to each slot's own position, with
no host reads) and replayed with new inputs copied into its static buffers.

A graph is bound to one cache buffer (its device address): a worker that swaps microbatches in and out
captures one graph per resident buffer, or swaps through one buffer. The returned output tensor is the
graph's own and is overwritten by the next replay: consume it (or copy it) first.

Prefill has the same problem at small batch: an OPT-1.3B prompt of 512 tokens at batch 1 is ~3 ms of
GPU work behind ~13 ms of host-side launches (cuBLAS alone spends ~40 us of CPU per projection). So
:class:`PrefillGraphs` captures prefills of up to ``max_tokens`` tokens (slots x length), one graph per
(slots, length rounded up to a power of two, at least ``bucket``): prompts are right-padded to it, which
the cache layout already allows (a slot's positions past its prompt hold garbage that decode overwrites
before reading). Padding costs GPU time, which is cheap exactly where graphs are used: those prefills are
launch-bound. Bigger prefills keep the GPU busy from eager launches and run eagerly.
"""

from __future__ import annotations

import torch

from . import switches
from .kv_cache import KVCache

# Slots x padded length at most; past it the eager launches keep up with the GPU. DEJAVU_PREFILL_GRAPH_TOKENS
# overrides it (0: no prefill graphs), for A/B measurements.
PREFILL_GRAPH_TOKENS = switches.get("DEJAVU_PREFILL_GRAPH_TOKENS")
PREFILL_BUCKET = 64  # the shortest padded length; longer prompts are padded to the next power of two


def input_buffer(stage, batch: int, length: int) -> torch.Tensor:
    """A zeroed input for ``stage``: token ids [batch, length] on the first stage, else hidden states."""
    if stage.is_first:
        return torch.zeros(batch, length, dtype=torch.long, device=stage.device)
    return torch.zeros(batch, length, stage.cfg.hidden_size, dtype=stage.dtype, device=stage.device)


def _capture(run, device, warmup: int, pool=None, mode: str = "global"):
    """(graph, output) of ``run()``, after ``warmup`` real runs on a side stream (they compile the Triton
    kernels and create cuBLAS handles, so the capture sees only launches)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
        out = run()
    return graph, out


class DecodeGraph:
    def __init__(self, stage, cache: KVCache, warmup: int = 2) -> None:
        if stage.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a stage on a CUDA device, not {stage.device}")
        if cache.data.device.type != "cuda" or stage.device.index not in (None, cache.data.device.index):
            raise ValueError(f"the cache is on {cache.data.device} but the stage on {stage.device}")
        self.stage, self.cache = stage, cache
        b, dev = cache.shape.batch, stage.device
        self.x = input_buffer(stage, b, 1)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        index = torch.zeros(b, dtype=torch.long, device=dev) if stage.is_last else None

        def step():
            return stage.forward(self.x, self.positions, cache, index, static=True)

        # The warm-up runs write keys/values at position 0 of every slot: keep what was there.
        saved = cache.data[:, :, :, :, 0].clone()
        self.graph, self.out = _capture(step, dev, warmup)
        cache.data[:, :, :, :, 0].copy_(saved)
        cache.step = None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step: x [b, 1] ids (first stage) or [b, 1, hidden]; positions [b, 1].

        ``b`` may be below the graph's batch (a microbatch in part of a pooled buffer): its rows go into
        the first ``b`` slots, the others step on what they last held, and ``out[:b]`` is the answer.
        """
        b = x.shape[0]
        if b > self.x.shape[0] or positions.shape[0] != b:
            raise ValueError(f"a decode step of {b} rows (positions {tuple(positions.shape)}) does not fit a graph "
                             f"captured for {self.x.shape[0]}")
        if x.data_ptr() != self.x.data_ptr():
            self.x[:b].copy_(x, non_blocking=True)
        if positions.data_ptr() != self.positions.data_ptr():
            self.positions[:b].copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.out


class PrefillGraph:
    """A prefill from position 0 of every slot of ``cache``, ``length`` tokens per slot (right-padded)."""

    def __init__(self, stage, cache: KVCache, length: int, pool, warmup: int = 1) -> None:
        b, dev = cache.shape.batch, stage.device
        self.x = input_buffer(stage, b, length)
        host = torch.arange(length).expand(b, length)
        self.positions = host.contiguous().to(dev)
        self.index = torch.zeros(b, dtype=torch.long, device=dev) if stage.is_last else None
        self.length, self.cache = length, cache

        def run():
            return stage.forward(self.x, self.positions, cache, self.index, host_positions=host)

        # The warm-up runs write positions [0, length) of every slot: the caller is about to prefill exactly
        # these. thread_local: a worker's other threads (control plane, KV streaming) may use CUDA meanwhile.
        self.graph, self.out = _capture(run, dev, warmup, pool, "thread_local")
        cache.step = None

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """x: [b, t] ids or [b, t, hidden] with b <= slots and t <= length; index: [b] (last stage).
        Returns the first ``b`` rows of the output (the graph's own tensor)."""
        b, t = x.shape[:2]
        if x.data_ptr() != self.x.data_ptr():
            # The padding (positions past t, slots past b) keeps what the last prefill left there: valid
            # ids or finite states. Padded positions are seen only by padded positions (causal attention)
            # and their cache rows are never read; spare slots are not the caller's.
            self.x[:b, :t].copy_(x, non_blocking=True)
        if self.index is not None:
            self.index[:b].copy_(index, non_blocking=True)
        self.graph.replay()
        return self.out[:b] if self.index is not None else self.out[:b, :t]


class PrefillGraphs:
    """The prefill graphs of one stage over one KV buffer (all its slots, or its first ``b``), keyed by
    (slots, padded length) and captured on first use. Graphs of one collection share a memory pool (they
    never run at once); an output is valid until the next replay of any of them."""

    def __init__(self, stage, max_tokens: int = PREFILL_GRAPH_TOKENS, bucket: int = PREFILL_BUCKET,
                 pool=None) -> None:
        self.stage, self.max_tokens, self.bucket = stage, max_tokens, bucket
        self.graphs: dict[tuple[int, int], PrefillGraph] = {}
        self.pool = pool  # a graph memory pool to share (made at the first capture when None)
        self.replays = 0  # prefills run through a graph (tests and benches read it)

    def padded(self, length: int, max_seq: int) -> int:
        return min(max(self.bucket, 1 << (length - 1).bit_length()), max_seq)

    def lengths(self, cache: KVCache) -> list[int]:
        """Every padded length that fits a graph over all of ``cache``'s slots (what a warm-up captures)."""
        out, n = [], self.bucket
        while cache.shape.batch * n <= self.max_tokens and n <= cache.shape.max_seq:
            out.append(n)
            n *= 2
        return out

    def fits(self, cache: KVCache, length: int) -> bool:
        """Whether a prefill of ``length`` tokens into every slot of ``cache`` runs through a graph."""
        return (self.stage.comm.size == 1 and cache.data.is_cuda
                and cache.shape.batch * self.padded(length, cache.shape.max_seq) <= self.max_tokens)

    def __call__(self, x: torch.Tensor, cache: KVCache, index: torch.Tensor | None) -> torch.Tensor:
        """Prefill ``x`` ([b, t] or [b, t, hidden]) into the first ``b`` slots of ``cache`` from position 0
        (a graph over all its slots: the others prefill padding); the stage's output ([b, vocab] logits for
        ``index`` on the last stage, else [b, t, hidden])."""
        key = (cache.shape.batch, self.padded(x.shape[1], cache.shape.max_seq))
        graph = self.graphs.get(key)
        if graph is None or graph.cache.data.data_ptr() != cache.data.data_ptr():
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = self.graphs[key] = PrefillGraph(self.stage, cache, key[1], self.pool)
        self.replays += 1
        return graph(x, index)
