"""One decode step of a stage captured as a CUDA graph, so a step costs one launch instead of hundreds.

A decode step of a 1B model is ~300 kernels of a few microseconds each; launched from Python that is
several milliseconds of CPU time for ~1 ms of GPU work. The step is captured once with static shapes
(``StageModel.forward(..., static=True)``: attention reads the cache up to each slot's own position, with
no host reads) and replayed with new inputs copied into its static buffers.

A graph is bound to one cache buffer (its device address): a worker that swaps microbatches in and out
captures one graph per resident buffer, or swaps through one buffer. The returned output tensor is the
graph's own and is overwritten by the next replay: consume it (or copy it) first.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class DecodeGraph:
    def __init__(self, stage, cache: KVCache, warmup: int = 2) -> None:
        if stage.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a stage on a CUDA device, not {stage.device}")
        if cache.data.device.type != "cuda" or stage.device.index not in (None, cache.data.device.index):
            raise ValueError(f"the cache is on {cache.data.device} but the stage on {stage.device}")
        self.stage, self.cache = stage, cache
        b, dev = cache.shape.batch, stage.device
        if stage.is_first:
            self.x = torch.zeros(b, 1, dtype=torch.long, device=dev)
        else:
            self.x = torch.zeros(b, 1, stage.cfg.hidden_size, dtype=stage.dtype, device=dev)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        index = torch.zeros(b, dtype=torch.long, device=dev) if stage.is_last else None

        def step():
            return stage.forward(self.x, self.positions, cache, index, static=True)

        # Warm-up runs really execute (compiling the Triton kernels, creating cuBLAS handles) and write
        # keys/values at position 0 of every slot: keep what was there.
        saved = cache.data[:, :, :, :, 0].clone()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step()
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
