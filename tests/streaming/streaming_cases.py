"""Shared layouts and data for the streaming tests (imported by the tests and by peer_main.py).

A "global" cache G[layer, kv, slot, head, position, head_dim] of random bit patterns stands for the
whole model's KV cache; each sender partition starts with its block of G, each receiver with a
sentinel, and after streaming a receiver must hold G exactly on the plan's positions (compared as
integers, so NaN bit patterns count) and the sentinel everywhere else.
"""

from __future__ import annotations

import torch

from dejavu.streaming import Partition, make_plan

LAYERS, HEADS, SLOTS, MAX_SEQ, HEAD_DIM = 6, 4, 4, 12, 8
POSITIONS = (0, 9)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
SENTINEL = 0x55


def even(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


def partitions(stages: int, tp: int, slot_groups: int = 1) -> list[Partition]:
    """Stage-major, then TP shard, then slot group."""
    return [Partition(layers, heads, slots) for layers in even(LAYERS, stages) for heads in even(HEADS, tp)
            for slots in even(SLOTS, slot_groups)]


# name -> (sender stages, sender tp, sender slot groups), (receiver ...)
LAYOUTS = {
    "3->2": ((3, 1, 1), (2, 1, 1)),
    "2->3": ((2, 1, 1), (3, 1, 1)),
    "1->4": ((1, 1, 1), (4, 1, 1)),
    "2->3 tp2": ((2, 2, 1), (3, 2, 1)),
    "2->1 tp2->1 slots2->1": ((2, 2, 2), (1, 1, 1)),
}


def plan_for(layout: str):
    s, r = LAYOUTS[layout]
    return make_plan(partitions(*s), partitions(*r), POSITIONS)


def global_cache(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    raw = torch.randint(info.min, info.max, (LAYERS, 2, SLOTS, HEADS, MAX_SEQ, HEAD_DIM), generator=g, dtype=torch.int64)
    return raw.to(bits).view(dtype)


WHOLE = Partition((0, LAYERS), (0, HEADS), (0, SLOTS))


def block(g: torch.Tensor, part: Partition) -> torch.Tensor:
    return g[WHOLE.local(part.box((0, MAX_SEQ)))]


def sender_caches(plan, dtype, seed=0, device="cpu") -> list[torch.Tensor]:
    g = global_cache(dtype, seed)
    return [block(g, p).clone().to(device) for p in plan.senders]


def receiver_caches(plan, dtype, device="cpu") -> list[torch.Tensor]:
    out = []
    for p in plan.receivers:
        c = torch.empty(p.cache_shape(MAX_SEQ, HEAD_DIM), dtype=dtype, device=device)
        c.view(torch.uint8).fill_(SENTINEL)
        out.append(c)
    return out


def check_received(plan, caches, dtype, seed=0) -> None:
    g = global_cache(dtype, seed)
    bits = BITS[dtype]
    lo, hi = plan.positions
    for j, (p, c) in enumerate(zip(plan.receivers, caches)):
        c = c.cpu()
        want = block(g, p)
        inside_ok = torch.equal(c[..., lo:hi, :].view(bits), want[..., lo:hi, :].view(bits))
        outside = torch.cat([c[..., :lo, :].reshape(-1), c[..., hi:, :].reshape(-1)]).view(torch.uint8)
        outside_ok = bool((outside == SENTINEL).all())
        if not (inside_ok and outside_ok):
            raise AssertionError(f"receiver {j} ({p}): positions {plan.positions} "
                                 f"{'match' if inside_ok else 'DIFFER'}, rest {'untouched' if outside_ok else 'OVERWRITTEN'}")
