"""The KV cache of one microbatch on one stage, as a single buffer.

Layout: ``data[layer, kv, slot, head, position, head_dim]`` with ``kv`` 0 = keys, 1 = values, layers
local to the stage (0 is the stage's first layer) and heads local to the tensor-parallel shard.

One buffer per microbatch means the whole cache of a microbatch is one contiguous block (one copy to
swap it out or hand it to another stage), and one token step's slice (``position == p`` for every
layer) is a strided region that the streaming library gathers.

Slots are right-padded: slot ``b`` holds positions ``[0, lengths[b])``. A token at position ``p`` writes
its key/value at index ``p``; attention of a query at ``p`` reads keys ``0..p``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepPlan:
    """What one forward over the cache needs, worked out once and shared by all the stage's layers.

    Working it out per layer cost a device-to-host sync per layer (the span) and rebuilt the same mask
    and RoPE tables every layer.
    """

    positions: torch.Tensor  # [batch, T] on the cache's device
    span: int  # attention reads keys [0, span)
    # Every slot's positions are exactly 0..T-1 (a prefill from an empty cache): the cache is written by a
    # slice copy and causal attention alone is right (right-padding garbage is never seen by a valid query).
    from_start: bool
    # Static shapes for CUDA graphs: span == max_seq and nothing reads the positions on the host.
    static: bool = False
    memo: dict = field(default_factory=dict)  # per-step tables shared by layers (masks, RoPE cos/sin)

    def visible(self) -> torch.Tensor:
        """[batch, 1, T, span] bool: key j is visible to the query at position p when j <= p."""
        mask = self.memo.get("visible")
        if mask is None:
            b, t = self.positions.shape
            key_pos = torch.arange(self.span, device=self.positions.device)
            mask = key_pos.view(1, 1, 1, self.span) <= self.positions.view(b, 1, t, 1)
            self.memo["visible"] = mask
        return mask


@dataclass(frozen=True)
class CacheShape:
    layers: int
    batch: int
    kv_heads: int
    max_seq: int
    head_dim: int

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        return (self.layers, 2, self.batch, self.kv_heads, self.max_seq, self.head_dim)

    def numel(self) -> int:
        n = 1
        for d in self.as_tuple():
            n *= d
        return n


class KVCache:
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str = "cpu",
                 pin_memory: bool = False) -> None:
        self.shape = shape
        self.data = torch.zeros(shape.as_tuple(), dtype=dtype, device=device,
                                pin_memory=pin_memory and torch.device(device).type == "cpu")
        # Number of valid positions per slot; the owner of the cache advances it after each forward.
        self.lengths = torch.zeros(shape.batch, dtype=torch.long)
        self.step: StepPlan | None = None

    @classmethod
    def from_tensor(cls, data: torch.Tensor, lengths: torch.Tensor | None = None) -> "KVCache":
        layers, two, batch, heads, max_seq, head_dim = data.shape
        assert two == 2, f"expected a cache buffer [layers, 2, batch, heads, seq, head_dim], got {tuple(data.shape)}"
        cache = cls.__new__(cls)
        cache.shape = CacheShape(layers, batch, heads, max_seq, head_dim)
        cache.data = data
        cache.lengths = lengths.clone() if lengths is not None else torch.zeros(batch, dtype=torch.long)
        cache.step = None
        return cache

    # ---- the plan of one forward ---------------------------------------------------------------------
    def begin(self, positions: torch.Tensor, host_positions: torch.Tensor | None = None,
              static: bool = False) -> StepPlan:
        """Plan a forward whose tokens sit at ``positions`` [batch, T] (already on the cache's device).

        ``host_positions``: the same values on the CPU, if the caller has them; then no device sync.
        ``static``: plan for a captured graph (attention over the whole max_seq, masked by position).
        """
        if static:
            self.step = StepPlan(positions, self.shape.max_seq, from_start=False, static=True)
            return self.step
        host = host_positions if host_positions is not None else positions.detach().cpu()
        b, t = host.shape
        span = int(host.max()) + 1
        if span > self.shape.max_seq:
            raise ValueError(f"position {span - 1} is outside the cache's {self.shape.max_seq} positions")
        from_start = span == t and bool((host == torch.arange(t)).all())
        self.step = StepPlan(positions, span, from_start)
        return self.step

    def plan_for(self, positions: torch.Tensor) -> StepPlan:
        """The plan of the current forward (made once by the stage); a fresh one for direct callers."""
        if self.step is not None and self.step.positions is positions:
            return self.step
        return self.begin(positions)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of local layer ``i``: two views [batch, heads, max_seq, head_dim]."""
        return self.data[i, 0], self.data[i, 1]

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              plan: StepPlan | None = None) -> None:
        """Store new keys/values [batch, heads, T, head_dim] of layer ``i`` at ``positions`` [batch, T]."""
        keys, values = self.layer(i)
        batch, heads, t, dim = k.shape
        if plan is not None and plan.from_start:
            # Positions 0..T-1 in every slot: a plain slice copy, much cheaper than a scatter.
            keys[:, :, :t].copy_(k)
            values[:, :, :t].copy_(v)
            return
        if t == 1:
            # Decode: one position per slot; index_put avoids materializing an expanded index.
            slots = torch.arange(batch, device=k.device)
            pos = positions[:, 0].to(k.device)
            keys[slots, :, pos] = k[:, :, 0]
            values[slots, :, pos] = v[:, :, 0]
            return
        index = positions.to(k.device).view(batch, 1, t, 1).expand(batch, heads, t, dim)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)

    def reset(self) -> None:
        self.lengths.zero_()
