"""GPT-2 family: learned positions, pre-LayerNorm, GELU-tanh FFN, tied LM head.

GPT-2 checkpoints store their projections as ``Conv1D`` weights, ``[in, out]`` — the transpose of
``nn.Linear``'s ``[out, in]`` — so every matrix is transposed on load, and a tensor-parallel split by
output columns reads dim 1 of the stored tensor (dim 0 for a split by input rows). The fused ``c_attn``
holds ``[q | k | v]`` side by side; each shard takes its own heads' columns of each of the three.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .layers import Attention, embedding, layer_norm, MLP
from .loading import load, load_layer_norm
from .weights import CheckpointError, Shard


def prefix(src) -> str:
    # GPT2LMHeadModel.save_pretrained writes "transformer.h.0...", the original hub checkpoints "h.0...".
    return "" if src.has("wte.weight") and not src.has("transformer.wte.weight") else "transformer."


def _conv1d_layout(param: torch.Tensor, shard: Shard | None):
    """Transpose a stored Conv1D slice [in, out] to Linear's [out, in], checking it in the stored layout.

    The check comes before the transpose so that the error quotes the shapes a user sees in the file.
    """
    want = (param.shape[1], param.shape[0])

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != want:
            where = f" (slice {shard.rank} of {shard.size} along dim {shard.dim})" if shard and shard.size > 1 else ""
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}{where} but the model expects "
                                  f"{want} (GPT-2 Conv1D layout [in, out])")
        return t.t()

    return transform


def _conv1d(param: torch.Tensor, src, name: str, shard: Shard | None) -> None:
    """A Conv1D weight [in, out] into a Linear weight [out, in]; ``shard`` indexes the stored layout."""
    load(param, src, name, shard, transform=_conv1d_layout(param, shard))


def _qkv_parts(param: torch.Tensor, src, name: str, dim: int, comm) -> None:
    """Fill a shard's fused [q_local; k_local; v_local] from a stored [.., q | k | v] tensor.

    The stored tensor is 3 * tp equal slices along ``dim``: q's tp slices, then k's, then v's. This shard
    reads slices rank, tp + rank and 2 * tp + rank — only its own part of the checkpoint.
    """
    tp, rank = comm.size, comm.rank
    n = param.shape[0] // 3
    for j in range(3):
        part, shard = param.detach()[j * n:(j + 1) * n], Shard(dim, j * tp + rank, 3 * tp)
        if dim == 1:  # a weight, stored [in, 3 * hidden]
            _conv1d(part, src, name, shard)
        else:
            load(part, src, name, shard)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        self.tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.positions = embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(positions)

    def load(self, src) -> None:
        p = prefix(src)
        load(self.tokens.weight, src, p + "wte.weight")
        load(self.positions.weight, src, p + "wpe.weight")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.ln_1 = layer_norm(h, cfg.norm_eps)
        self.attn = Attention(h, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=True, out_bias=True,
                              comm=comm)
        self.ln_2 = layer_norm(h, cfg.norm_eps)
        self.mlp = MLP(h, cfg.intermediate_size, comm, cfg.activation, bias=True)
        self.comm = comm

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), positions, cache, layer)
        return h + self.mlp(self.ln_2(h))

    def load(self, src, i: int) -> None:
        p, c = f"{prefix(src)}h.{i}.", self.comm
        col, row = Shard(1, c.rank, c.size), Shard(0, c.rank, c.size)  # in the stored [in, out] layout
        load_layer_norm(self.ln_1, src, p + "ln_1")
        _qkv_parts(self.attn.qkv.weight, src, p + "attn.c_attn.weight", 1, c)
        _qkv_parts(self.attn.qkv.bias, src, p + "attn.c_attn.bias", 0, c)
        _conv1d(self.attn.out.weight, src, p + "attn.c_proj.weight", row)
        load(self.attn.out_bias, src, p + "attn.c_proj.bias")
        load_layer_norm(self.ln_2, src, p + "ln_2")
        _conv1d(self.mlp.fc_in.weight, src, p + "mlp.c_fc.weight", col)
        load(self.mlp.fc_in.bias, src, p + "mlp.c_fc.bias", Shard(0, c.rank, c.size))
        _conv1d(self.mlp.fc_out.weight, src, p + "mlp.c_proj.weight", row)
        load(self.mlp.fc_out_bias, src, p + "mlp.c_proj.bias")


class Head(nn.Module):
    """ln_f then the LM head; BLOOM's head is this one with its own tensor names."""

    embedding_name = "wte.weight"

    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        self.ln_f = layer_norm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = cfg.tie_word_embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(h))

    def prefix(self, src) -> str:
        return prefix(src)

    def load(self, src) -> None:
        p = self.prefix(src)
        load_layer_norm(self.ln_f, src, p + "ln_f")
        # Tied (every released GPT-2 and BLOOM): the last stage reads the token embedding matrix itself.
        tied = self.tied or not src.has("lm_head.weight")
        load(self.lm_head.weight, src, p + self.embedding_name if tied else "lm_head.weight")


def make_block(cfg: ModelConfig, comm, shared: dict) -> Block:
    return Block(cfg, comm)
