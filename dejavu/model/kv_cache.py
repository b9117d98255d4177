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

from dataclasses import dataclass

import torch


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

    @classmethod
    def from_tensor(cls, data: torch.Tensor, lengths: torch.Tensor | None = None) -> "KVCache":
        layers, two, batch, heads, max_seq, head_dim = data.shape
        assert two == 2, f"expected a cache buffer [layers, 2, batch, heads, seq, head_dim], got {tuple(data.shape)}"
        cache = cls.__new__(cls)
        cache.shape = CacheShape(layers, batch, heads, max_seq, head_dim)
        cache.data = data
        cache.lengths = lengths.clone() if lengths is not None else torch.zeros(batch, dtype=torch.long)
        return cache

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

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new keys/values [batch, heads, T, head_dim] of layer ``i`` at ``positions`` [batch, T]."""
        keys, values = self.layer(i)
        batch, heads, t, dim = k.shape
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
