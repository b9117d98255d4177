"""Launch configurations of the decode kernels (``fused``), per GPU.

The fastest tiling of a memory-bound kernel depends on the card: an H200 streams 1.4x the bytes of an
H100 with the same 132 SMs, so each SM needs more bytes in flight. The built-in tables below were found
on an H100 by ``bench/decode_kernels.py``; a sweep file of that bench for another card, saved as
``dejavu/model/tuning/<device-name>.json`` (e.g. ``nvidia-h200.json``), is laid over them on that card.

``DEJAVU_TUNING`` picks the tables: ``auto`` (default: the file for this device's name if there is one),
``builtin`` (the H100 tables alone), or the path of a sweep JSON. It is read at each call, so one process
can A/B two tunings (``bench/generate.py --variants``); a CUDA graph keeps what it captured.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dejavu.model import switches

TUNING_DIR = Path(__file__).with_name("tuning")

# (rows bucket, N, K) -> (BLOCK_N, BLOCK_K, num_stages, num_warps) of ``skinny_mm``: the fastest tiling
# found by bench/decode_kernels.py on an H100 (2026-11-24) for the OPT-1.3B / Llama-1B projections.
SKINNY: dict = {
    (16, 2048, 2048): (16, 512, 3, 4),
    (16, 2048, 8192): (16, 512, 3, 4),
    (16, 3072, 2048): (32, 128, 6, 4),
    (16, 6144, 2048): (32, 128, 6, 4),
    (16, 8192, 2048): (64, 128, 4, 4),
    (16, 50272, 2048): (64, 128, 4, 4),
    (16, 128256, 2048): (64, 128, 4, 4),
    (32, 2048, 2048): (16, 256, 4, 4),
    (32, 2048, 8192): (16, 256, 4, 4),
    (32, 3072, 2048): (32, 256, 4, 4),
    (32, 6144, 2048): (64, 128, 4, 4),
    (32, 8192, 2048): (64, 128, 4, 4),
    (32, 50272, 2048): (32, 256, 4, 4),
    (32, 128256, 2048): (128, 128, 3, 8),
}
# Shapes where cuBLAS was as fast or faster in that sweep (without PDL): cuBLAS keeps them where PDL is
# off, unless DEJAVU_SKINNY_ALL=1. With PDL our kernels go everywhere (a cuBLAS kernel breaks the chain of
# early launches), unless DEJAVU_SKINNY_ALL=0.
CUBLAS_FASTER = {(16, 2048, 8192), (32, 2048, 8192), (32, 3072, 2048), (16, 2048, 2048), (16, 3072, 2048)}
# (rows bucket, N, K) -> (splits, BLOCK_N, BLOCK_K, num_stages, num_warps): projections whose output feeds
# an add+norm and whose grid cuBLAS and skinny_mm under-fill. Split-K probe on an H100 (2026-11-25), us at
# M = 1/8/32: 2048x2048 6.0/6.3/6.5 (cuBLAS) -> 5.1/5.2/5.5; 2048x8192 15.7/15.5/16.3 -> 13.5/13.8/14.4.
SPLIT: dict = {
    (16, 2048, 2048): (4, 32, 64, 6, 4),
    (32, 2048, 2048): (4, 32, 64, 6, 4),
    (16, 2048, 8192): (4, 32, 128, 4, 4),
    (32, 2048, 8192): (4, 32, 128, 4, 4),
}
# (batch, kv_heads) -> (block_n, num_stages, num_warps, target programs) of decode attention.
ATTENTION: dict = {
    (1, 8): (64, 2, 4, 264),
    (1, 32): (64, 3, 4, 264),
    (8, 8): (64, 3, 4, 1056),
    (8, 32): (128, 2, 4, 264),
    (32, 8): (128, 2, 4, 264),
    (32, 32): (64, 4, 4, 528),
}


@dataclass
class Tuning:
    skinny: dict = field(default_factory=lambda: dict(SKINNY))
    split: dict = field(default_factory=lambda: dict(SPLIT))
    attention: dict = field(default_factory=lambda: dict(ATTENTION))
    cublas_faster: set = field(default_factory=lambda: set(CUBLAS_FASTER))
    source: str = "builtin"


def bucket(m: int) -> int:
    """Rows are padded to a power of two >= 16 (the tensor-core tile), so one tiling serves each bucket."""
    return max(16, 1 << max(0, (m - 1).bit_length()))


def _fastest(rows: list[dict]) -> tuple[tuple, float] | None:
    """The configuration with the least total time over ``rows`` (each maps str(config) -> us), among
    those every row timed: one tiling serves all row counts of a bucket (m = 1 and 8 share 16)."""
    common = set.intersection(*(set(r["configs"]) for r in rows))
    if not common:
        return None
    best = min(common, key=lambda c: sum(r["configs"][c] for r in rows))
    return tuple(json.loads(best)), sum(r["configs"][best] for r in rows)


def from_sweep(path: str | Path, base: Tuning | None = None) -> Tuning:
    """``base`` (default the built-in tables) with every shape that ``bench/decode_kernels.py --out`` timed
    replaced by its fastest configuration there."""
    rows = json.loads(Path(path).read_text())
    if isinstance(rows, dict):
        rows = rows["rows"]
    t = base or Tuning()
    t = Tuning(dict(t.skinny), dict(t.split), dict(t.attention), set(t.cublas_faster), str(path))
    groups: dict = defaultdict(list)
    for row in rows:
        if row.get("part") not in ("matmul", "split", "attention"):
            continue  # the sweep's prefill and launch timings
        if row.get("dtype", "float16") != "float16":
            continue  # tilings come from fp16 sweeps; a bf16 sweep is for comparing kernels, not tuning
        key = tuple(row["key"]) if row["part"] == "attention" else (bucket(row["m"]), *row["key"])
        groups[(row["part"], key)].append(row)
    for (part, key), group in groups.items():
        best = _fastest(group)
        if best is None:
            continue
        config, us = best
        if part == "attention":
            t.attention[key] = config
        elif part == "split":
            t.split[key] = config
        elif part == "matmul":
            t.skinny[key] = config
            cublas = sum(r["cublas_us"] for r in group)
            (t.cublas_faster.add if us >= cublas else t.cublas_faster.discard)(key)
    return t


def _device_file() -> Path | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    path = TUNING_DIR / f"{name}.json"
    return path if path.exists() else None


@functools.lru_cache(maxsize=8)
def _load(choice: str) -> Tuning:
    if choice == "builtin":
        return Tuning()
    if choice == "auto":
        path = _device_file()
        return from_sweep(path) if path else Tuning()
    if not Path(choice).exists():
        raise FileNotFoundError(f"DEJAVU_TUNING={choice!r}: no such sweep file; use 'auto', 'builtin' or the "
                                f"path of a bench/decode_kernels.py --out JSON")
    return from_sweep(choice)


def tuning() -> Tuning:
    """The active tables (``DEJAVU_TUNING``, see the module doc)."""
    return _load(switches.get("DEJAVU_TUNING"))
