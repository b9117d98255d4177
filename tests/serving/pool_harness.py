"""Drive a worker's KV buffer pool in-process the way a single-stage worker does: lease, prefill, decode."""

from __future__ import annotations

import torch

from dejavu.engine import build_stages
from dejavu.model.registry import resolve_model
from dejavu.model.weights import HFCheckpoint
from dejavu.sampling import SamplingParams, sample


def one_stage(folder, device: str = "cpu"):
    """The whole checkpoint as one fp32 stage."""
    cfg = resolve_model(str(folder)).config
    return build_stages(cfg, HFCheckpoint(folder), 1, dtype="fp32", device=device)[0]


def prefill(pool, ubatch: int, prompts: list[list[int]], new: int):
    """Lease a buffer for ``prompts`` (+ ``new`` tokens), prefill it; returns (lease, lens, greedy outputs)."""
    b, t = len(prompts), max(map(len, prompts))
    lens = torch.tensor([len(p) for p in prompts])
    lease = pool.acquire(ubatch, b, int(lens.max()) + new)
    tokens = torch.zeros(b, t, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    outs = [[tok] for tok in sample(pool.prefill(lease, tokens, lens - 1), [SamplingParams()] * b, 0)]
    return lease, lens, outs


def decode(pool, lease, lens: torch.Tensor, k: int, outs: list[list[int]]) -> None:
    """Decode step ``k``: each row's last token in, its greedy next token appended to ``outs``."""
    b = len(lens)
    x = torch.tensor([o[-1] for o in outs]).view(b, 1)
    logits = pool.decode(lease, x, (lens + k).view(b, 1), torch.zeros(b, dtype=torch.long))
    for o, tok in zip(outs, sample(logits, [SamplingParams()] * b, k + 1)):
        o.append(tok)
