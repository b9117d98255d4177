"""A pipeline stage: the layers ``[first, last)`` of one model and one tensor-parallel shard of them.

The first stage also owns the embeddings; the last owns the final norm and the LM head. A stage is
built with empty weights and then reads only its own tensors from a checkpoint, so a worker never
holds (or even reads) layers it does not run.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from . import fused_blocks
from .config import ModelConfig, parse_dtype
from .kv_cache import CacheShape, KVCache
from .tp import Communicator, SingleProcess

# family name -> module with Embedding, Head, make_block(cfg, comm, shared); GPT-2 and BLOOM register here.
FAMILY_MODULES = {
    "llama": "dejavu.model.llama",
    "opt": "dejavu.model.opt",
    "gpt2": "dejavu.model.gpt2",
    "bloom": "dejavu.model.bloom",
}


def family_module(family: str):
    if family not in FAMILY_MODULES:
        raise ValueError(f"model family {family!r} has no implementation; known: {sorted(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[family])


class StageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, first: int = 0, last: int | None = None, *,
                 comm: Communicator | None = None, dtype: str | torch.dtype = "fp32",
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        last = cfg.num_layers if last is None else last
        cfg.check_layer_range(first, last)
        comm = comm or SingleProcess()
        cfg.check_tensor_parallel(comm.size)
        self.cfg, self.first, self.last, self.comm = cfg, first, last, comm
        self.dtype, self.device = parse_dtype(dtype), torch.device(device)
        fam = family_module(cfg.family)
        shared: dict = {}
        # Build on the meta device so nothing is allocated twice; real storage comes in to_empty().
        with torch.device("meta"):
            self.embed = fam.Embedding(cfg, comm) if self.is_first else None
            self.layers = nn.ModuleList(fam.make_block(cfg, comm, shared) for _ in range(first, last))
            self.head = fam.Head(cfg, comm) if self.is_last else None
        self.to_empty(device=self.device)
        self.to(self.dtype)
        self._init_buffers(shared)
        # Pre-norm families run as one fused pass (dejavu/model/fused_blocks.py); same arithmetic on the
        # CPU, fewer kernels on the GPU. Set False to run the blocks one by one.
        self.fused = fused_blocks.supports(self)

    def _init_buffers(self, shared: dict) -> None:
        # Non-persistent buffers (RoPE tables, ALiBi slopes) were lost on meta; rebuild them for real.
        fam = family_module(self.cfg.family)
        if hasattr(fam, "make_buffers"):
            fam.make_buffers(self, self.device)
        elif "rotary" in shared:
            real = fam.make_rotary(self.cfg).to(self.device)
            for block in self.layers:
                block.attn.rotary = real

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.last == self.cfg.num_layers

    @property
    def num_layers(self) -> int:
        return self.last - self.first

    def cache_shape(self, batch: int, max_seq: int) -> CacheShape:
        return CacheShape(self.num_layers, batch, self.cfg.num_kv_heads // self.comm.size, max_seq,
                          self.cfg.head_dim)

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        if max_seq > self.cfg.max_positions:
            raise ValueError(f"a sequence of {max_seq} positions exceeds the model's "
                             f"max_position_embeddings={self.cfg.max_positions}")
        return KVCache(self.cache_shape(batch, max_seq), self.dtype, self.device)

    @torch.no_grad()
    def load_weights(self, src) -> "StageModel":
        if self.embed is not None:
            self.embed.load(src)
        for local, block in enumerate(self.layers):
            block.load(src, self.first + local)
        if self.head is not None:
            self.head.load(src)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                logits_index: torch.Tensor | None = None, on_layer_done=None, *, static: bool = False,
                host_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stage.

        x: token ids [batch, T] on the first stage, hidden states [batch, T, hidden] after it.
        positions: absolute position of every token, [batch, T]; keys/values are stored there. Pass them
            on the CPU where you have them there: the stage then plans the step without a device sync.
        logits_index: on the last stage, which of the T tokens of each slot to return logits for
            ([batch]); returns [batch, vocab]. Other stages return hidden states [batch, T, hidden].
        on_layer_done: called with the local layer index after each layer's cache is written, so the
            streaming library can ship that layer while the next one computes.
        static: static shapes and no host reads (attention over the whole cache, masked by position), so
            that the call can be captured in a CUDA graph (see ``dejavu.model.cuda_graphs``).
        host_positions: the CPU copy of device ``positions``, where the caller has one (a captured prefill).
        """
        host = positions if positions.device.type == "cpu" else host_positions
        positions = positions.to(self.device, non_blocking=True)
        plan = cache.begin(positions, host, static=static)
        if self.fused:
            return fused_blocks.forward(self, x, plan, cache, logits_index, on_layer_done)
        h = self.embed(x, positions) if self.embed is not None else x.to(self.dtype)
        for i, block in enumerate(self.layers):
            h = block(h, positions, cache, i)
            if on_layer_done is not None:
                on_layer_done(i)
        if self.head is None:
            return h
        if logits_index is not None:
            h = fused_blocks._pick(h, logits_index)
        return self.head(h)

    def capture_decode(self, cache: KVCache):
        """A CUDA graph of one decode step of this stage over ``cache`` (see DecodeGraph)."""
        from .cuda_graphs import DecodeGraph

        return DecodeGraph(self, cache)
