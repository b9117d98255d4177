"""A stage's pre-norm blocks run as one pass that carries each sub-block's output to the next norm.

A pre-norm block computes ``h += attn(norm1(h)); h += mlp(norm2(h))``. Run block by block, every
residual add, output bias and norm is its own kernel. Here the pass carries ``(h, delta, bias)`` and
lets the next norm do ``h += delta + bias`` as it normalises (one fused kernel on the GPU), so a layer
costs two such kernels instead of four to twelve. For decode-sized rows on the GPU the add + norm goes
one step further, into the prologue of the projection that reads it (``norm_linear``: qkv, the MLP's
first projection, the LM head), so that a layer launches no separate norm kernel at all. The arithmetic
is the blocks' own: on the CPU the same PyTorch ops run in the same order, so the tokens are the plain
path's.

Blocks it knows: Llama, OPT with pre-LayerNorm, GPT-2. Anything else (post-norm OPT, BLOOM) runs
through the blocks' own ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .kv_cache import KVCache, StepPlan
from .layers import Attention, GatedMLP, add_norm, linear


def block_parts(block: nn.Module) -> tuple | None:
    """(norm1, attention, norm2, mlp) of a pre-norm block this pass can run, else None."""
    family = type(block).__module__.rsplit(".", 1)[-1]
    if family == "llama" or (family == "opt" and block.pre_norm):
        return block.attn_norm, block.attn, block.mlp_norm, block.mlp
    if family == "gpt2":
        return block.ln_1, block.attn, block.ln_2, block.mlp
    return None


def head_parts(head: nn.Module) -> tuple | None:
    """(final norm, modules after it) of a last-stage head this pass can run, else None."""
    family = type(head).__module__.rsplit(".", 1)[-1]
    if family == "llama":
        return head.norm, [head.lm_head]
    if family == "opt" and head.norm is not None:
        return head.norm, [m for m in (head.project_out, head.lm_head) if m is not None]
    if family == "gpt2":
        return head.ln_f, [head.lm_head]
    return None


def supports(stage) -> bool:
    if any(block_parts(b) is None for b in stage.layers):
        return False
    return stage.head is None or head_parts(stage.head) is not None


def forward(stage, x: torch.Tensor, plan: StepPlan, cache: KVCache, logits_index: torch.Tensor | None,
            on_layer_done=None) -> torch.Tensor:
    h = stage.embed(x, plan.positions) if stage.embed is not None else x.to(stage.dtype)
    delta = bias = None
    for i, block in enumerate(stage.layers):
        norm1, attn, norm2, mlp = block_parts(block)
        h, qkv = norm_linear(h, delta, bias, norm1, attn.qkv)
        delta, bias = attention_after_qkv(attn, qkv, plan, cache, i), attn.out_bias
        first, act = mlp_input(mlp)
        h, a = norm_linear(h, delta, bias, norm2, first, act)
        delta, bias = mlp_after_input(mlp, a, act), getattr(mlp, "fc_out_bias", None)
        if on_layer_done is not None:
            on_layer_done(i)
    if stage.head is None:
        if delta is None:
            return h
        return h + (delta + bias if bias is not None else delta)
    if logits_index is not None:
        h, delta = _pick(h, logits_index), _pick(delta, logits_index) if delta is not None else None
    norm, rest = head_parts(stage.head)
    if len(rest) == 1 and isinstance(rest[0], nn.Linear):
        return norm_linear(h, delta, bias, norm, rest[0], keep_h=False)[1]
    _, y = add_norm(h, delta, bias, norm)
    for module in rest:
        y = linear(y, module) if isinstance(module, nn.Linear) else module(y)
    return y


def norm_linear(h: torch.Tensor, delta: torch.Tensor | None, bias: torch.Tensor | None, norm: nn.Module,
                lin: nn.Linear, act: str | None = None, keep_h: bool = True) -> tuple:
    """(new h, ``linear(norm(new h), lin, act)``) with new h = h + (delta + bias).

    One kernel for decode-sized rows on the GPU (``fused.norm_skinny_mm``; keep_h=False: the new h is
    not needed, and not written). Elsewhere add_norm then linear, as before: more rows than
    ``fused.NORM_MM_MAX_ROWS`` (prefill), the CPU, fp32, DEJAVU_NORM_MATMUL=0.
    """
    n_out = lin.weight.shape[0] // (2 if act == "silu_mul" else 1)
    if fused.norm_mm_enabled(h, n_out):
        return fused.norm_skinny_mm(h, delta, bias, norm, lin.weight, lin.bias, _EPILOGUE[act], keep_h=keep_h)
    h, xn = add_norm(h, delta, bias, norm)
    return h, linear(xn, lin, act)


_EPILOGUE = {None: 0, "relu": 1, "silu_mul": 2}  # linear's activations, as the matmul kernel's ACT


# The sub-blocks split at their input projection (which norm_linear runs with the norm). These are
# Attention.core and (Gated)MLP.core after their first line; keep them in step.

def attention_after_qkv(attn: Attention, qkv: torch.Tensor, plan: StepPlan, cache: KVCache,
                        layer: int) -> torch.Tensor:
    """``attn.core`` from its fused q/k/v projection on: attention, output projection, all-reduce."""
    b, t, _ = qkv.shape
    if attn.alibi_slopes is None and fused.enabled(qkv):
        o = attn._attend_fused(qkv, plan, cache, layer)
    else:
        o = attn._attend_torch(qkv, plan, cache, layer)
    o = linear(o.reshape(b, t, attn.heads * attn.head_dim), attn.out)
    return attn.comm.all_reduce_(o)


def mlp_input(mlp: nn.Module) -> tuple[nn.Linear, str | None]:
    """The MLP's first projection and the activation ``linear`` can apply with it (else None)."""
    if isinstance(mlp, GatedMLP):
        return mlp.gate_up, "silu_mul" if mlp.act is F.silu else None
    return mlp.fc_in, "relu" if mlp.act is F.relu else None


def mlp_after_input(mlp: nn.Module, a: torch.Tensor, act: str | None) -> torch.Tensor:
    """``mlp.core`` from the first projection's output ``a`` (activated when ``act`` is set) on."""
    if isinstance(mlp, GatedMLP):
        if act is None:
            gate, up = a.split(mlp.inner, dim=-1)
            a = mlp.act(gate) * up
        return mlp.comm.all_reduce_(linear(a, mlp.down))
    if act is None:
        a = mlp.act(a)
    return mlp.comm.all_reduce_(linear(a, mlp.fc_out))


def _pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row ``index[b]`` of every slot's tokens: [b, T, ...] -> [b, ...]."""
    if t.shape[1] == 1:
        return t[:, 0]  # decode: no gather, and no host-side index in a captured graph
    return t[torch.arange(t.shape[0], device=t.device), index.to(t.device)]
