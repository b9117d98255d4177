"""OPT family: learned positions (offset 2), pre- or post-LayerNorm, ReLU FFN, optional embedding projection."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .layers import Attention, embedding, layer_norm, MLP
from .loading import column, load, load_layer_norm, row

# OPT's learned position table starts two rows in (a fairseq legacy the checkpoints keep).
POSITION_OFFSET = 2
P = "model.decoder."


def _affine(cfg: ModelConfig) -> bool:
    return cfg.extra.get("layer_norm_elementwise_affine", True)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        proj = cfg.word_embed_proj_dim or cfg.hidden_size
        self.tokens = embedding(cfg.vocab_size, proj)
        self.project_in = nn.Linear(proj, cfg.hidden_size, bias=False) if cfg.word_embed_proj_dim else None
        self.positions = embedding(cfg.max_positions + POSITION_OFFSET, cfg.hidden_size)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids)
        if self.project_in is not None:
            h = self.project_in(h)
        return h + self.positions(positions + POSITION_OFFSET)

    def load(self, src) -> None:
        load(self.tokens.weight, src, P + "embed_tokens.weight")
        load(self.positions.weight, src, P + "embed_positions.weight")
        if self.project_in is not None:
            load(self.project_in.weight, src, P + "project_in.weight")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.pre_norm = cfg.pre_layer_norm
        self.attn_norm = layer_norm(h, cfg.norm_eps, _affine(cfg))
        self.attn = Attention(h, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias,
                              out_bias=cfg.out_bias, comm=comm)
        self.mlp_norm = layer_norm(h, cfg.norm_eps, _affine(cfg))
        self.mlp = MLP(h, cfg.intermediate_size, comm, cfg.activation, bias=cfg.qkv_bias)
        self.comm = comm

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        if self.pre_norm:
            h = h + self.attn(self.attn_norm(h), positions, cache, layer)
            return h + self.mlp(self.mlp_norm(h))
        # OPT-350m style: normalise after each residual sum.
        h = self.attn_norm(h + self.attn(h, positions, cache, layer))
        return self.mlp_norm(h + self.mlp(h))

    def load(self, src, i: int) -> None:
        p, c = f"{P}layers.{i}.", self.comm
        load_layer_norm(self.attn_norm, src, p + "self_attn_layer_norm")
        load(self.attn.qkv.weight, src, [p + f"self_attn.{n}_proj.weight" for n in "qkv"], column(c))
        load(self.attn.out.weight, src, p + "self_attn.out_proj.weight", row(c))
        if self.attn.qkv.bias is not None:
            load(self.attn.qkv.bias, src, [p + f"self_attn.{n}_proj.bias" for n in "qkv"], column(c))
            load(self.attn.out_bias, src, p + "self_attn.out_proj.bias")
        load_layer_norm(self.mlp_norm, src, p + "final_layer_norm")
        load(self.mlp.fc_in.weight, src, p + "fc1.weight", column(c))
        load(self.mlp.fc_out.weight, src, p + "fc2.weight", row(c))
        if self.mlp.fc_in.bias is not None:
            load(self.mlp.fc_in.bias, src, p + "fc1.bias", column(c))
            load(self.mlp.fc_out_bias, src, p + "fc2.bias")


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        proj = cfg.word_embed_proj_dim or cfg.hidden_size
        # Post-LN OPT has no final layer norm (each block already ends normalised).
        self.norm = layer_norm(cfg.hidden_size, cfg.norm_eps, _affine(cfg)) if cfg.pre_layer_norm else None
        self.project_out = nn.Linear(cfg.hidden_size, proj, bias=False) if cfg.word_embed_proj_dim else None
        self.lm_head = nn.Linear(proj, cfg.vocab_size, bias=False)
        self.tied = cfg.tie_word_embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)

    def load(self, src) -> None:
        if self.norm is not None:
            load_layer_norm(self.norm, src, P + "final_layer_norm")
        if self.project_out is not None:
            load(self.project_out.weight, src, P + "project_out.weight")
        name = "lm_head.weight" if src.has("lm_head.weight") and not self.tied else P + "embed_tokens.weight"
        load(self.lm_head.weight, src, name)


def make_block(cfg: ModelConfig, comm, shared: dict) -> Block:
    return Block(cfg, comm)
