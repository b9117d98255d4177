"""Llama family: RoPE, grouped-query attention, RMSNorm, SwiGLU (SmolLM2, Llama 2/3, Mistral, Qwen2)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .layers import Attention, embedding, GatedMLP, RMSNorm, Rotary
from .loading import column, load, row


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        self.tokens = embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids)

    def load(self, src) -> None:
        load(self.tokens.weight, src, "model.embed_tokens.weight")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, comm, rotary: Rotary) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, comm=comm, rotary=rotary)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, comm, cfg.activation)
        self.comm = comm

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), positions, cache, layer)
        return h + self.mlp(self.mlp_norm(h))

    def load(self, src, i: int) -> None:
        p, c = f"model.layers.{i}.", self.comm
        load(self.attn_norm.weight, src, p + "input_layernorm.weight")
        qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        load(self.attn.qkv.weight, src, qkv, column(c))
        if self.attn.qkv.bias is not None:
            load(self.attn.qkv.bias, src, [p + f"self_attn.{n}_proj.bias" for n in "qkv"], column(c))
        load(self.attn.out.weight, src, p + "self_attn.o_proj.weight", row(c))
        if self.attn.out_bias is not None:
            load(self.attn.out_bias, src, p + "self_attn.o_proj.bias")
        load(self.mlp_norm.weight, src, p + "post_attention_layernorm.weight")
        load(self.mlp.gate_up.weight, src, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], column(c))
        load(self.mlp.down.weight, src, p + "mlp.down_proj.weight", row(c))


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig, comm) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = cfg.tie_word_embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def load(self, src) -> None:
        load(self.norm.weight, src, "model.norm.weight")
        # Tied checkpoints usually omit lm_head; the last stage then reads the embedding matrix itself.
        name = "lm_head.weight" if src.has("lm_head.weight") and not self.tied else "model.embed_tokens.weight"
        load(self.lm_head.weight, src, name)


def make_rotary(cfg: ModelConfig) -> Rotary:
    return Rotary(cfg.head_dim, cfg.max_positions, cfg.rope_theta, cfg.rope_scaling)


def make_block(cfg: ModelConfig, comm, shared: dict) -> Block:
    if "rotary" not in shared:
        shared["rotary"] = make_rotary(cfg)
    return Block(cfg, comm, shared["rotary"])
