"""BLOOM family: ALiBi attention biases, LayerNorm on the embeddings, fused per-head QKV, GELU-tanh FFN.

Two things go wrong easily under tensor parallelism, and both are handled here:

- ALiBi gives every head its own slope. A shard runs heads ``[rank * n / tp, (rank + 1) * n / tp)``, so it
  must take exactly those slopes of the full list — not the first ``n / tp`` of them, and not the slopes
  of a model with ``n / tp`` heads.
- ``query_key_value`` is stored head-major: its output rows are ``[head, (q, k, v), head_dim]``. A shard's
  heads are one contiguous row block, which is read as-is and then regrouped into the ``[q; k; v]`` order
  our fused projection expects.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .layers import Attention, embedding, layer_norm, MLP
from . import gpt2
from .loading import column, load, load_layer_norm, row


def prefix(src) -> str:
    # BloomForCausalLM.save_pretrained writes "transformer.h.0...", the bigscience hub files "h.0...".
    name = "word_embeddings.weight"
    return "" if src.has(name) and not src.has("transformer." + name) else "transformer."


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Every head's slope, as transformers computes them (fp32), including non-power-of-two head counts."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        # The remaining heads interleave into the slopes of a model with twice as many heads.
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def shard_slopes(num_heads: int, rank: int, size: int) -> torch.Tensor:
    per = num_heads // size
    return alibi_slopes(num_heads)[rank * per:(rank + 1) * per].clone()


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    # BLOOM's own tanh approximation, with its rounded constant, so fp64 runs match the reference exactly.
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _regroup_qkv(heads: int, head_dim: int):
    """Rows [head, (q, k, v), head_dim] of one shard -> [q of all its heads; k ...; v ...]."""

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != heads * 3 * head_dim:
            return t  # wrong size: let load() report the shape against the parameter's
        rest = t.shape[1:]
        return t.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * heads * head_dim, *rest)

    return transform


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        self.tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = layer_norm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tokens(ids))

    def load(self, src) -> None:
        p = prefix(src)
        load(self.tokens.weight, src, p + "word_embeddings.weight")
        load_layer_norm(self.norm, src, p + "word_embeddings_layernorm")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = layer_norm(h, cfg.norm_eps)
        # Placeholder slopes on the meta device; make_buffers() puts this shard's real ones in.
        self.attn = Attention(h, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=True, out_bias=True,
                              comm=comm, alibi_slopes=torch.empty(cfg.num_heads // comm.size))
        self.post_attention_layernorm = layer_norm(h, cfg.norm_eps)
        self.mlp = MLP(h, cfg.intermediate_size, comm, "gelu_pytorch_tanh", bias=True)
        self.mlp.act = bloom_gelu
        self.post_ln_residual = cfg.extra.get("apply_residual_connection_post_layernorm", False)
        self.comm = comm

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        x = self.input_layernorm(h)
        # apply_residual_connection_post_layernorm: the residual branch carries the normalised input.
        h = (x if self.post_ln_residual else h) + self.attn(x, positions, cache, layer)
        x = self.post_attention_layernorm(h)
        return (x if self.post_ln_residual else h) + self.mlp(x)

    def load(self, src, i: int) -> None:
        p, c = f"{prefix(src)}h.{i}.", self.comm
        regroup = _regroup_qkv(self.attn.heads, self.attn.head_dim)
        load_layer_norm(self.input_layernorm, src, p + "input_layernorm")
        load(self.attn.qkv.weight, src, p + "self_attention.query_key_value.weight", column(c), regroup)
        load(self.attn.qkv.bias, src, p + "self_attention.query_key_value.bias", column(c), regroup)
        load(self.attn.out.weight, src, p + "self_attention.dense.weight", row(c))
        load(self.attn.out_bias, src, p + "self_attention.dense.bias")
        load_layer_norm(self.post_attention_layernorm, src, p + "post_attention_layernorm")
        load(self.mlp.fc_in.weight, src, p + "mlp.dense_h_to_4h.weight", column(c))
        load(self.mlp.fc_in.bias, src, p + "mlp.dense_h_to_4h.bias", column(c))
        load(self.mlp.fc_out.weight, src, p + "mlp.dense_4h_to_h.weight", row(c))
        load(self.mlp.fc_out_bias, src, p + "mlp.dense_4h_to_h.bias")


class Head(gpt2.Head):
    embedding_name = "word_embeddings.weight"

    def prefix(self, src) -> str:
        return prefix(src)


def make_block(cfg: ModelConfig, comm, shared: dict) -> Block:
    return Block(cfg, comm)


def make_buffers(stage, device) -> None:
    """This shard's ALiBi slopes, in fp32 whatever the model's dtype (the reference builds them in fp32
    and rounds only the final bias)."""
    slopes = shard_slopes(stage.cfg.num_heads, stage.comm.rank, stage.comm.size).to(device)
    for block in stage.layers:
        block.attn.alibi_slopes = slopes
