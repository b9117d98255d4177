"""A stage's pre-norm blocks run as one pass that carries each sub-block's output to the next norm.

A pre-norm block computes ``h += attn(norm1(h)); h += mlp(norm2(h))``. Run block by block, every
residual add, output bias and norm is its own kernel. Here the pass carries ``(h, delta, bias)`` and
lets the next norm do ``h += delta + bias`` as it normalises (one fused kernel on the GPU), so a layer
costs two such kernels instead of four to twelve. The arithmetic is the blocks' own: on the CPU the
same PyTorch ops run in the same order, so the tokens are the plain path's.

Blocks it knows: Llama, OPT with pre-LayerNorm, GPT-2. Anything else (post-norm OPT, BLOOM) runs
through the blocks' own ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from .kv_cache import KVCache, StepPlan
from .layers import add_norm, linear


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
    # Deferred: a projection may leave split-K partial sums for the next add+norm to add up. Not with tensor
    # parallelism (the partial sums would have to be all-reduced first), and not for the last layer's MLP,
    # whose output goes to the head (or out of the stage) as a plain tensor.
    deferred = stage.comm.size == 1
    last = len(stage.layers) - 1
    for i, block in enumerate(stage.layers):
        norm1, attn, norm2, mlp = block_parts(block)
        h, xn = add_norm(h, delta, bias, norm1)
        delta, bias = attn.core(xn, plan, cache, i, deferred=deferred), attn.out_bias
        h, xn = add_norm(h, delta, bias, norm2)
        delta, bias = mlp.core(xn, deferred=deferred and i < last), getattr(mlp, "fc_out_bias", None)
        if on_layer_done is not None:
            on_layer_done(i)
    if stage.head is None:
        if delta is None:
            return h
        return h + (delta + bias if bias is not None else delta)
    if logits_index is not None:
        h, delta = _pick(h, logits_index), _pick(delta, logits_index) if delta is not None else None
    norm, rest = head_parts(stage.head)
    _, y = add_norm(h, delta, bias, norm)
    for module in rest:
        y = linear(y, module) if isinstance(module, nn.Linear) else module(y)
    return y


def _pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row ``index[b]`` of every slot's tokens: [b, T, ...] -> [b, ...]."""
    if t.shape[1] == 1:
        return t[:, 0]  # decode: no gather, and no host-side index in a captured graph
    return t[torch.arange(t.shape[0], device=t.device), index.to(t.device)]
