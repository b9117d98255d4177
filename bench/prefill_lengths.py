"""Prefill time when every microbatch brings a new prompt length, per attention backend.

A serving prefill rarely sees the same padded length twice. Some attention backends pay a set-up cost
per new shape (cuDNN's SDPA builds an execution plan); this measures one stage's prefill over a run of
distinct lengths and again at one repeated length, with the backends the model uses
(``dejavu.model.layers._GPU_BACKENDS``) and with cuDNN put first, side by side in one process.

    python bench/prefill_lengths.py --device cuda                        # OPT-1.3B shape, batch 8, fp16
    python bench/prefill_lengths.py --device cuda --shape llama-1b --batch 32

Prints a table and writes JSON (--out, default results/bench/prefill_lengths.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import SHAPES, hf_model, our_stage  # noqa: E402
from report import write_json  # noqa: E402

import dejavu.model.layers as layers  # noqa: E402


def prefill_ms(stage, cache, batch: int, length: int) -> float:
    x = torch.randint(3, stage.cfg.vocab_size - 1, (batch, length), device=stage.device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stage(x, torch.arange(length).expand(batch, length), cache, torch.full((batch,), length - 1))
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="opt-1.3b", choices=[s for s in SHAPES if not s.startswith("tiny")])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--first-length", type=int, default=400, help="the new lengths are first..first+count-1")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--out", default="results/bench/prefill_lengths.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() or not a.device.startswith("cuda"):
        ap.error("this benchmark compares GPU attention backends: it needs --device cuda and a CUDA device")
    if layers.sdpa_kernel is None:
        ap.error("torch.nn.attention.sdpa_kernel is missing (torch < 2.3): nothing to compare")
    from torch.nn.attention import SDPBackend

    device = torch.device(a.device)
    hf = hf_model(a.shape, torch.float16, device, 0)
    stage = our_stage(a.shape, hf, torch.float16, device)
    del hf
    longest = a.first_length + 2 * a.count
    cache = stage.new_cache(a.batch, longest)
    ours = list(layers._GPU_BACKENDS)
    rows = []
    lengths = iter(range(a.first_length, longest))
    try:
        for name, backends in (("cuDNN first", [SDPBackend.CUDNN_ATTENTION] + ours), ("ours (no cuDNN)", ours)):
            layers._GPU_BACKENDS = backends
            prefill_ms(stage, cache, a.batch, a.first_length - 1)  # warm-up at a length not measured
            new = [prefill_ms(stage, cache, a.batch, next(lengths)) for _ in range(a.count)]
            same = [prefill_ms(stage, cache, a.batch, a.first_length - 1) for _ in range(5)]
            rows.append({"backends": name, "new_length_ms_median": statistics.median(new),
                         "same_length_ms_median": statistics.median(same), "new_length_ms": new})
    finally:
        layers._GPU_BACKENDS = ours
    print(f"{a.shape} fp16, batch {a.batch}, {a.count} prefills of distinct lengths from {a.first_length}:")
    print(f"{'attention backends':20s} {'new length ms':>14s} {'same length ms':>15s}")
    for r in rows:
        print(f"{r['backends']:20s} {r['new_length_ms_median']:14.1f} {r['same_length_ms_median']:15.1f}")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "args": vars(a), "rows": rows}
    print(f"wrote {write_json(a.out, result)}")
    return result


if __name__ == "__main__":
    main()
