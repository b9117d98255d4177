"""Building blocks shared by the model families: norms, rotary embedding, attention over the KV cache.

Tensor parallelism is Megatron-style: the fused QKV and the FFN's first projection are split by output
columns (heads / FFN units), the output projections by input rows, and their partial sums meet in one
all-reduce per sub-block through the injected communicator. Biases of row-split projections are added
once, after the all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .kv_cache import KVCache, StepPlan
from .tp import Communicator


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x):
            return fused.add_norm(x, None, None, self)[1]
        # Normalise in fp32 and cast back before the scale, as Llama's reference does.
        xf = x.float() if x.dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def linear(x: torch.Tensor, lin: nn.Linear, act: str | None = None, deferred: bool = False):
    """``lin(x)`` then the activation ``act`` ("relu", "silu_mul" = SwiGLU on [gate | up], or None).

    Decode-sized inputs on the GPU go through a Triton kernel that streams the weight at close to full
    bandwidth and applies bias and activation in its epilogue (cuBLAS under-fills the GPU there).
    ``deferred``: the caller hands the output straight to an add+norm (no all-reduce between), so a
    projection that splits K (``kernel_tuning.SPLIT``) may return its partial sums (``fused.SplitSum``)
    for that kernel to add up.
    """
    if deferred and act is None and lin.bias is None:
        config = fused.split_config(x, lin.weight)
        if config is not None:
            return fused.skinny_mm_split(x, lin.weight, config, static_weight=True)
    if fused.skinny_enabled(x):
        n = lin.weight.shape[0] // (2 if act == "silu_mul" else 1)
        if fused.use_skinny(x.numel() // x.shape[-1], n, x.shape[-1]):
            return fused.skinny_mm(x, lin.weight, lin.bias, {None: 0, "relu": 1, "silu_mul": 2}[act],
                                   static_weight=True)
    y = lin(x)
    if act == "relu":
        return F.relu(y)
    if act == "silu_mul":
        if fused.enabled(y):
            return fused.silu_mul(y)
        gate, up = y.split(y.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up
    return y


def add_norm(h: torch.Tensor, delta, bias: torch.Tensor | None, norm: nn.Module):
    """``h + (delta + bias)`` and its normalisation, as one kernel on the GPU: (new h, norm(new h)).
    ``delta``: a tensor, a ``fused.SplitSum`` (see ``linear``), or None."""
    if fused.enabled(h):
        return fused.add_norm(h, delta, bias, norm)
    if isinstance(delta, fused.SplitSum):
        delta = delta.resolve()
    if delta is not None:
        h = h + (delta + bias if bias is not None else delta)
    return h, norm(h)


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table with no random init: its weights always come from the checkpoint, and random
    init of a meta tensor would import torch._dynamo (about 2 s in every worker process)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def layer_norm(dim: int, eps: float, affine: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


# ---- rotary position embedding ----------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    # float32 throughout, as the reference computes it: the tables must match it bit for bit. Always on
    # the CPU (also inside a stage's meta-device construction: meta arithmetic imports torch._dynamo).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3")


class Rotary(nn.Module):
    """cos/sin tables for every position, indexed by each token's absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, memo: dict | None = None):
        # q, k: [batch, heads, T, head_dim]; positions: [batch, T]. ``memo`` (the step plan's) shares the
        # gathered tables between the layers of one forward.
        tables = memo.get(("rope", id(self), q.dtype)) if memo is not None else None
        if tables is None:
            tables = self.cos[positions].unsqueeze(1).to(q.dtype), self.sin[positions].unsqueeze(1).to(q.dtype)
            if memo is not None:
                memo[("rope", id(self), q.dtype)] = tables
        cos, sin = tables
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# ---- attention --------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head / grouped-query attention of one TP shard, reading and writing the stage's cache."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 out_bias: bool, comm: Communicator, rotary: Rotary | None = None,
                 alibi_slopes: torch.Tensor | None = None) -> None:
        super().__init__()
        tp = comm.size
        self.heads, self.kv_heads, self.head_dim = heads // tp, kv_heads // tp, head_dim
        self.qkv = nn.Linear(hidden, (self.heads + 2 * self.kv_heads) * head_dim, bias=qkv_bias)
        self.out = nn.Linear(self.heads * head_dim, hidden, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(hidden)) if out_bias else None
        self.comm, self.rotary = comm, rotary
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        else:
            self.alibi_slopes = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        o = self.core(x, cache.plan_for(positions), cache, layer)
        return o + self.out_bias if self.out_bias is not None else o

    def core(self, x: torch.Tensor, plan: StepPlan, cache: KVCache, layer: int, deferred: bool = False):
        """Attention and output projection, all-reduced; the output bias is left to the caller (so that
        a fused kernel can add it together with the residual). ``deferred``: see ``linear``."""
        b, t, _ = x.shape
        qkv = linear(x, self.qkv)
        if self.alibi_slopes is None and fused.enabled(qkv):
            o = self._attend_fused(qkv, plan, cache, layer)
        else:
            o = self._attend_torch(qkv, plan, cache, layer)
        o = linear(o.reshape(b, t, self.heads * self.head_dim), self.out, deferred=deferred)
        return self.comm.all_reduce_(o)

    def _attend_fused(self, qkv: torch.Tensor, plan: StepPlan, cache: KVCache, layer: int) -> torch.Tensor:
        b, t, _ = qkv.shape
        rot = self.rotary
        cos, sin = (rot.cos, rot.sin) if rot is not None else (None, None)
        if t == 1 and fused.attention_writes_cache():
            # Decode: one kernel rotates q and k, stores k and v, and attends keys 0..pos of each slot.
            return fused.decode_attention_new(qkv, plan.positions, cos, sin, cache.data[layer], self.heads,
                                              self.head_dim)
        q = fused.rope_write(qkv, plan.positions, cos, sin, cache.data[layer], self.heads, self.kv_heads,
                             self.head_dim)
        keys, values = cache.layer(layer)
        if t == 1:
            # Decode: reads keys 0..pos of each slot, whatever the span (static shapes for CUDA graphs).
            return fused.decode_attention(q.view(b, self.heads, self.head_dim), keys, values, plan.positions)
        keys, values = keys[:, :, :plan.span], values[:, :, :plan.span]
        return self._sdpa(q.transpose(1, 2), keys, values, plan).transpose(1, 2)

    def _attend_torch(self, qkv: torch.Tensor, plan: StepPlan, cache: KVCache, layer: int) -> torch.Tensor:
        b, t, _ = qkv.shape
        qkv = qkv.view(b, t, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        if self.rotary is not None:
            q, k = self.rotary(q, k, plan.positions, plan.memo)
        cache.write(layer, k, v, plan.positions, plan)
        if plan.from_start and self.alibi_slopes is None:
            keys, values = k, v  # exactly what was just stored at 0..T-1
        else:
            keys, values = cache.layer(layer)
            keys, values = keys[:, :, :plan.span], values[:, :, :plan.span]
        return self._sdpa(q, keys, values, plan).transpose(1, 2)

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """q [b, H, T, d] over keys/values [b, KV, span, d] -> [b, H, T, d]."""
        b, _, t, _ = q.shape
        group = self.heads // self.kv_heads
        if plan.from_start and self.alibi_slopes is None:
            # Prefill from an empty cache: causal alone is right, and lets SDPA pick flash attention.
            return _sdpa_gqa(q, keys, values, group, is_causal=True)
        visible = plan.visible()
        if self.alibi_slopes is not None:
            key_pos = torch.arange(plan.span, device=q.device)
            bias = self.alibi_slopes.view(1, -1, 1, 1) * key_pos.view(1, 1, 1, plan.span).to(self.alibi_slopes.dtype)
            mask = bias.to(q.dtype).masked_fill(~visible, float("-inf"))
        else:
            mask = visible
        if group > 1 and t == 1 and self.alibi_slopes is None:
            # One query per slot: fold the query group into the query axis, so each KV head is read once
            # (no repeat_interleave copy of the cache) and the [b, 1, 1, span] mask still broadcasts.
            o = _attention(q.reshape(b, self.kv_heads, group, -1), keys, values, attn_mask=mask)
            return o.view(b, self.heads, 1, -1)
        return _sdpa_gqa(q, keys, values, group, attn_mask=mask)


def _sdpa_gqa(q, keys, values, group: int, **kw) -> torch.Tensor:
    if group > 1:
        if _HAS_GQA:
            return _attention(q, keys, values, enable_gqa=True, **kw)
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    return _attention(q, keys, values, **kw)


try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Not cuDNN's attention: it builds an execution plan for every new shape (tens of milliseconds), and
    # a serving prefill meets a new prompt length almost every time. Flash / memory-efficient kernels
    # have no per-shape set-up; the math kernel is the fallback for what they refuse.
    _GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # torch < 2.3
    sdpa_kernel = None


def _attention(q, keys, values, **kw) -> torch.Tensor:
    if q.is_cuda and sdpa_kernel is not None:
        with sdpa_kernel(_GPU_BACKENDS):
            return F.scaled_dot_product_attention(q, keys, values, **kw)
    return F.scaled_dot_product_attention(q, keys, values, **kw)


def _probe_gqa() -> bool:
    # enable_gqa arrived in torch 2.5; the package supports 2.4.
    try:
        x = torch.zeros(1, 2, 1, 4)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


_HAS_GQA = _probe_gqa()


class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), gate and up fused into one column-split projection."""

    def __init__(self, hidden: int, inner: int, comm: Communicator, act: str = "silu") -> None:
        super().__init__()
        self.inner = inner // comm.size
        self.gate_up = nn.Linear(hidden, 2 * self.inner, bias=False)
        self.down = nn.Linear(self.inner, hidden, bias=False)
        self.act, self.comm = activation(act), comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)

    def core(self, x: torch.Tensor, deferred: bool = False):
        if self.act is F.silu:
            a = linear(x, self.gate_up, "silu_mul")
        else:
            gate, up = self.gate_up(x).split(self.inner, dim=-1)
            a = self.act(gate) * up
        return self.comm.all_reduce_(linear(a, self.down, deferred=deferred))


class MLP(nn.Module):
    """Two-layer FFN (OPT, GPT-2, BLOOM): fc_in column-split, fc_out row-split."""

    def __init__(self, hidden: int, inner: int, comm: Communicator, act: str, bias: bool = True) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden, inner // comm.size, bias=bias)
        self.fc_out = nn.Linear(inner // comm.size, hidden, bias=False)
        self.fc_out_bias = nn.Parameter(torch.zeros(hidden)) if bias else None
        self.act, self.comm = activation(act), comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.core(x)
        return o + self.fc_out_bias if self.fc_out_bias is not None else o

    def core(self, x: torch.Tensor, deferred: bool = False):
        """The FFN all-reduced, without the output bias (a fused kernel adds it with the residual).
        ``deferred``: see ``linear``."""
        if self.act is F.relu:
            h = linear(x, self.fc_in, "relu")
        else:
            h = self.act(linear(x, self.fc_in))
        return self.comm.all_reduce_(linear(h, self.fc_out, deferred=deferred))


def activation(name: str):
    table = {
        "silu": F.silu,
        "swish": F.silu,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(table)}")
    return table[name]
