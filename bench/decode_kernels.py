"""Sweep of the decode kernels' launch configurations on the GPU (where do the bytes go?).

- skinny matmuls (the decode step's projections, M = batch rows): cuBLAS (``F.linear``) against the
  Triton ``skinny_mm`` in several tilings, each timed inside a CUDA graph over enough weight copies that
  the L2 cache cannot hold them (as in a real step, where every layer's weights are new);
- decode attention over a 576-position cache (24 layers' worth, same reason) in several tilings;
- prefill at batch 1: wall time with and without the Triton kernels, and the same prefill replayed as a
  CUDA graph (its GPU time alone).

    python bench/decode_kernels.py --out results/decode-kernels.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu.model import fused  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

MATMULS = {  # name: (N, K, bias, act)  act: 0 none, 1 relu, 2 swiglu (N = 2 * out)
    "opt.qkv": (6144, 2048, True, 0), "opt.out": (2048, 2048, False, 0), "opt.fc_in": (8192, 2048, True, 1),
    "opt.fc_out": (2048, 8192, False, 0), "opt.lm_head": (50272, 2048, False, 0),
    "llama.qkv": (3072, 2048, False, 0), "llama.gate_up": (16384, 2048, False, 2),
    "llama.down": (2048, 8192, False, 0), "llama.lm_head": (128256, 2048, False, 0),
}
MM_CONFIGS = [(16, 256, 4, 4), (16, 512, 3, 4), (32, 256, 4, 4), (32, 128, 6, 4), (64, 128, 4, 4),
              (64, 256, 3, 8), (128, 128, 3, 8)]
ATTN_CONFIGS = [(64, 2, 4, 264), (64, 3, 4, 264), (128, 2, 4, 264), (128, 3, 8, 264), (64, 3, 4, 1056),
                (128, 3, 4, 528), (32, 3, 4, 528), (64, 4, 4, 528), (128, 2, 4, 528), (128, 4, 4, 264),
                (256, 2, 8, 264), (128, 3, 8, 528), (64, 4, 4, 1056)]


def graph_time_us(fn, calls: int) -> float:
    """Mean µs per call of ``fn(i)`` for i in range(calls), captured in one graph and replayed."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(4):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / 4 / calls)
    return statistics.median(samples)


def sweep_matmuls(rows: list, dtype) -> None:
    for name, (n, k, has_bias, act) in MATMULS.items():
        nbytes = n * k * 2
        copies = max(1, min(16, -(-256 * 2**20 // nbytes)))
        ws = [torch.randn(n, k, dtype=dtype, device="cuda") / k**0.5 for _ in range(copies)]
        b = torch.randn(n, dtype=dtype, device="cuda") if has_bias else None
        for m in (1, 8, 32):
            x = torch.randn(m, k, dtype=dtype, device="cuda")

            def ref(i):
                y = F.linear(x, ws[i % copies], b)
                if act == 1:
                    y = F.relu(y)
                elif act == 2:
                    y = fused.silu_mul(y)
                return y

            want = ref(0)
            row = {"case": name, "m": m, "n": n, "k": k, "mbytes": nbytes / 2**20,
                   "cublas_us": graph_time_us(ref, copies * 2)}
            best = None
            for cfg in MM_CONFIGS:
                got = fused.skinny_mm(x, ws[0], b, act, config=cfg)
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                us = graph_time_us(lambda i: fused.skinny_mm(x, ws[i % copies], b, act, config=cfg), copies * 2)
                row[str(cfg)] = us
                if err < 2e-2 and (best is None or us < best[1]):
                    best = (cfg, us)
            row["best"], row["best_us"] = best
            row["cublas_TBps"] = nbytes / row["cublas_us"] / 1e6
            row["best_TBps"] = nbytes / row["best_us"] / 1e6
            rows.append(row)
            print(f"{name:14s} m={m:2d}: cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_TBps']:.2f} TB/s)  "
                  f"triton {row['best_us']:7.1f} us ({row['best_TBps']:.2f} TB/s) {best[0]}", flush=True)
        del ws


def sweep_attention(rows: list, dtype) -> None:
    S, d, layers, pos = 576, 64, 24, 544
    for kv in (32, 8):
        for b in (1, 8, 32):
            cache = torch.randn(layers, 2, b, kv, S, d, dtype=dtype, device="cuda")
            q = torch.randn(b, 32, d, dtype=dtype, device="cuda")
            p = torch.full((b, 1), pos, device="cuda")
            nbytes = 2 * b * kv * (pos + 1) * d * 2
            row = {"case": f"attn kv={kv}", "b": b, "mbytes": nbytes / 2**20}
            best = None
            for cfg in ATTN_CONFIGS:
                us = graph_time_us(lambda i: fused.decode_attention(q, cache[i % layers, 0], cache[i % layers, 1], p,
                                                                    config=cfg), layers)
                row[str(cfg)] = us
                if best is None or us < best[1]:
                    best = (cfg, us)
            row["best"], row["best_us"] = best
            row["default_us"] = row[str(ATTN_CONFIGS[0])]
            rows.append(row)
            print(f"attn kv={kv:2d} b={b:2d}: default {row['default_us']:6.1f} us "
                  f"({nbytes / row['default_us'] / 1e6:.2f} TB/s)  best {best[1]:6.1f} us "
                  f"({nbytes / best[1] / 1e6:.2f} TB/s) {best[0]}", flush=True)


def prefill_overhead(rows: list, dtype) -> None:
    from dejavu.model.config import ModelConfig
    from dejavu.model.kv_cache import KVCache
    from dejavu.model.stage import StageModel

    from generate import SHAPES  # noqa: F401  (same shapes as the main bench)

    for shape in ("opt-1.3b", "llama-1b"):
        spec = dict(SHAPES[shape])
        cfg = ModelConfig.from_hf(spec)
        stage = StageModel(cfg, dtype=dtype, device="cuda")
        with torch.no_grad():
            for prm in stage.parameters():
                prm.normal_(0, 0.02)
        for b in (1, 8):
            cache = stage.new_cache(b, 576)
            x = torch.randint(3, cfg.vocab_size, (b, 512), device="cuda")
            pos = torch.arange(512).expand(b, -1)
            idx = torch.full((b,), 511)
            row = {"case": f"prefill {shape}", "b": b}
            for on in ("1", "0"):
                os.environ["DEJAVU_TRITON"] = on
                for _ in range(2):
                    stage(x, pos, cache, idx)
                times = []
                for _ in range(7):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    stage(x, pos, cache, idx)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                row[f"wall_ms_triton{on}"] = min(times) * 1e3
                # The same prefill as a graph: GPU time without the Python launches (plan from the host
                # positions, no host-to-device copies inside the capture).
                pos_d, idx_d = pos.to("cuda"), idx.to("cuda")
                cache.begin = lambda p, h, static=False: KVCache.begin(cache, p, pos, static)
                row[f"graph_ms_triton{on}"] = graph_time_us(lambda i: stage(x, pos_d, cache, idx_d), 1) / 1e3
                del cache.begin
            os.environ["DEJAVU_TRITON"] = "1"
            rows.append(row)
            print(f"prefill {shape} b={b}: wall {row['wall_ms_triton1']:.1f} ms (torch ops "
                  f"{row['wall_ms_triton0']:.1f}); GPU alone {row['graph_ms_triton1']:.1f} ms "
                  f"(torch ops {row['graph_ms_triton0']:.1f})", flush=True)
            del cache
        del stage
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="matmul,attention,prefill")
    args = ap.parse_args()
    rows: list = []
    parts = args.parts.split(",")
    if "matmul" in parts:
        sweep_matmuls(rows, torch.float16)
    if "attention" in parts:
        sweep_attention(rows, torch.float16)
    if "prefill" in parts:
        prefill_overhead(rows, torch.float16)
    if args.out:
        write_json(args.out, rows, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
