"""Copying checkpoint tensors into a stage's parameters, with shape checks that name the tensor."""

from __future__ import annotations

import torch
from torch import nn

from .weights import CheckpointError, Shard


def column(comm) -> Shard:
    """Split along output features (dim 0 of a [out, in] weight, or a bias)."""
    return Shard(0, comm.rank, comm.size)


def row(comm) -> Shard:
    """Split along input features (dim 1 of a [out, in] weight)."""
    return Shard(1, comm.rank, comm.size)


def load(param: nn.Parameter | torch.Tensor, src, names: str | list[str], shard: Shard | None = None,
         transform=None) -> None:
    """Fill ``param`` from one tensor, or from several concatenated along dim 0 (fused projections)."""
    names = [names] if isinstance(names, str) else names
    parts = []
    for name in names:
        t = src.get(name, shard)
        if transform is not None:
            t = transform(name, t)
        parts.append(t)
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if tuple(value.shape) != tuple(param.shape):
        what = names[0] if len(names) == 1 else " + ".join(names)
        raise CheckpointError(
            f"tensor {what} has shape {tuple(value.shape)} but the model expects {tuple(param.shape)}"
            + (f" (tensor-parallel shard {shard.rank}/{shard.size} along dim {shard.dim})" if shard else ""))
    with torch.no_grad():
        param.copy_(value)


def load_layer_norm(norm: nn.LayerNorm, src, name: str) -> None:
    """``name.weight`` and ``name.bias``; a norm without an affine part reads nothing."""
    if norm.weight is not None:
        load(norm.weight, src, name + ".weight")
        load(norm.bias, src, name + ".bias")
