"""Random weights for serving a model without its checkpoint (``dejavu-run model.weights=random``,
``dejavu worker --load_format dummy``), as serving benchmarks offer: real shapes, real timings, made-up
weights.

The random model is defined tensor by tensor, element by element: the value at flat index ``i`` of the
checkpoint tensor ``name`` (the Hugging Face name the model would have) is a counter-based hash of
``(seed, name, i)``. So a worker computes exactly its own slice (its stage's layers, its tensor-parallel
shard) on its own device, nothing else is ever built, and every layout of the same model and seed holds
the same weights: a run at 2 stages and one at TP 2 give the same tokens (up to the rounding of their
different reduction orders, as with a real checkpoint).

Values: matrices and biases uniform with standard deviation ``std`` (0.02, Hugging Face's usual
``initializer_range``); one-dimensional ``*.weight`` tensors (norm scales) uniform in ``1 +- 0.1``.
The tensors' names and full shapes come from transformers' own class for the config, built on the meta
device (no memory).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping

import torch

from .weights import CheckpointError, Shard

DEFAULT_STD = 0.02
NORM_SPREAD = 0.1
CHUNK = 1 << 22  # elements hashed at once: 32 MiB of int64 indices

# SplitMix64's constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


def checkpoint_tensors(hf_config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor name of the model's Hugging Face checkpoint with its full shape, and the tied ones
    (``lm_head.weight`` -> the embedding, when the model ties them), from transformers' class for the
    config built on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(hf_config)
    model_type = hf.pop("model_type", None)
    if not model_type:
        raise CheckpointError("random weights need the model's config.json with a model_type")
    config = AutoConfig.for_model(model_type, **hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name:
            aliases[name] = canonical
    return shapes, aliases


def tensor_key(seed: int, name: str) -> int:
    """The per-tensor stream: a signed 64-bit integer from (seed, name), the same in every process."""
    digest = hashlib.sha256(f"dejavu-random-weights:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash_uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform floats in [0, 1) (24 bits, exact in fp32), one per int64 ``index``: SplitMix64 of
    ``key + (index + 1) * golden``. Pure integer arithmetic, so every device computes the same bits."""
    z = (index + 1) * _GOLDEN + key
    z ^= _logical_shift(z, 30)
    z *= _M1
    z ^= _logical_shift(z, 27)
    z *= _M2
    z ^= _logical_shift(z, 31)
    return _logical_shift(z, 40).to(torch.float32) * (1.0 / (1 << 24))


def fill(out: torch.Tensor, key: int, full_shape: tuple[int, ...], start: tuple[int, ...], *,
         low: float, high: float) -> torch.Tensor:
    """Write into ``out`` its region of the full tensor whose element ``i`` is ``low + (high - low) * u(key, i)``;
    ``start`` is the region's corner in the full tensor, ``out.shape`` its size."""
    strides = [1] * len(full_shape)
    for d in range(len(full_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * full_shape[d + 1]
    if out.dim() == 0 or out.numel() == 0:
        return out
    # The flat index of every element of the region: a sum of per-dimension aranges, built in row chunks.
    inner = torch.zeros((), dtype=torch.int64, device=out.device)
    for d in range(1, out.dim()):
        shape = [1] * (out.dim() - 1)
        shape[d - 1] = out.shape[d]
        inner = inner + ((torch.arange(out.shape[d], device=out.device, dtype=torch.int64) + start[d])
                         * strides[d]).reshape(shape)
    row_elems = max(1, math.prod(out.shape[1:]))
    rows = max(1, CHUNK // row_elems)
    for r0 in range(0, out.shape[0], rows):
        r1 = min(out.shape[0], r0 + rows)
        first = (torch.arange(r0, r1, device=out.device, dtype=torch.int64) + start[0]) * strides[0]
        index = first.reshape(-1, *([1] * (out.dim() - 1))) + inner
        u = hash_uniform(key, index)
        out[r0:r1].copy_(u.mul_(high - low).add_(low))
    return out


class RandomWeights:
    """A weight source (``has`` / ``get`` like ``weights.HFCheckpoint``) of a random model of ``hf_config``."""

    def __init__(self, hf_config: Mapping[str, Any], seed: int = 0, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, std: float = DEFAULT_STD) -> None:
        self.seed, self.device, self.dtype, self.std = int(seed), torch.device(device), dtype, std
        self.shapes, self.aliases = checkpoint_tensors(hf_config)
        self.folder = f"random weights (seed {self.seed})"  # how errors name the source

    def has(self, name: str) -> bool:
        return name in self.shapes

    def bounds(self, name: str) -> tuple[float, float]:
        if len(self.shapes[name]) == 1 and name.endswith("weight"):  # a norm's scale
            return 1.0 - NORM_SPREAD, 1.0 + NORM_SPREAD
        a = math.sqrt(3.0) * self.std  # uniform with this standard deviation
        return -a, a

    def get(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"tensor {name!r} is not part of this model's checkpoint ({self.folder})")
        full = self.shapes[name]
        size, start = list(full), [0] * len(full)
        if shard is not None and shard.size > 1:
            n = full[shard.dim]
            if n % shard.size:
                raise CheckpointError(
                    f"tensor {name!r} has size {n} along dim {shard.dim}, not divisible into {shard.size} shards")
            size[shard.dim] = n // shard.size
            start[shard.dim] = shard.rank * size[shard.dim]
        out = torch.empty(size, dtype=self.dtype, device=self.device)
        low, high = self.bounds(name)
        key = tensor_key(self.seed, self.aliases.get(name, name))  # a tied tensor is its twin
        return fill(out, key, full, tuple(start), low=low, high=high)
