"""The decode kernels' launch configurations swept on the GPU: the tuning sweep for a new card.

What it times (``--parts``, default ``matmul,split,attention,prefill``):

- ``matmul``: the decode step's projections (M = batch rows), cuBLAS (``F.linear``) against the Triton
  ``skinny_mm`` in several tilings, each inside a CUDA graph over enough weight copies that the L2 cache
  cannot hold them (as in a real step, where every layer's weights are new);
- ``split``: the split-K projections (out-proj, fc_out / down) together with the add+norm that sums their
  partials;
- ``attention``: decode attention over a 576-position cache (24 layers' worth, same reason);
- ``prefill``: prefill at batch 1, wall time with and without the Triton kernels, and the same prefill
  replayed as a CUDA graph (its GPU time alone);
- ``launch``: the fixed cost of one kernel in a dependent chain, with PDL off and on (the boundary part of
  the gap, docs/PERFORMANCE.md);
- ``add_norm``: the add+norm that sums split-K partials, in both dtypes and both read forms (rerun after a
  Triton upgrade: ``fused.add_norm`` picks the form per dtype).

The JSON it writes is a tuning file: saved as ``dejavu/model/tuning/<device-name>.json`` it gives that
card its tilings (``dejavu/model/kernel_tuning.py``); ``DEJAVU_TUNING=<file>`` tries one out first.
Every configuration is compiled first by ``--jobs`` processes in parallel (Triton's disk cache keeps them).

    python bench/decode_kernels.py --parts matmul,split,attention --out sweep.json   # the sweep, ~1 minute
    python bench/decode_kernels.py --parts launch,add_norm                           # the two measurements
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu.model import fused  # noqa: E402
from dejavu.model.config import dtype_name, parse_dtype  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

MATMULS = {  # name: (N, K, bias, act)  act: 0 none, 1 relu, 2 swiglu (N = 2 * out)
    "opt.qkv": (6144, 2048, True, 0), "opt.fc_in": (8192, 2048, True, 1), "opt.lm_head": (50272, 2048, False, 0),
    "llama.qkv": (3072, 2048, False, 0), "llama.gate_up": (16384, 2048, False, 2),
    "llama.lm_head": (128256, 2048, False, 0),
}
SPLITS = {"out": (2048, 2048), "fc_out": (2048, 8192)}  # split-K + add+norm: (N, K); Llama's o/down alike
ROWS = (1, 8, 32)
# (BLOCK_N, BLOCK_K, num_stages, num_warps); deeper pipelines than an H100 needs are for the H200, whose
# SMs must keep ~1.4x the bytes in flight.
MM_CONFIGS = [(16, 256, 4, 4), (16, 512, 3, 4), (32, 256, 4, 4), (32, 128, 6, 4), (64, 128, 4, 4),
              (64, 256, 3, 8), (128, 128, 3, 8), (16, 512, 4, 4), (16, 256, 6, 4), (32, 256, 5, 4),
              (32, 128, 8, 4), (64, 128, 6, 4), (64, 256, 4, 8), (128, 128, 4, 8), (32, 512, 3, 4)]
# (splits, BLOCK_N, BLOCK_K, num_stages, num_warps)
SPLIT_CONFIGS = [(4, 32, 64, 6, 4), (4, 32, 128, 4, 4), (2, 32, 128, 4, 4), (4, 16, 128, 4, 4),
                 (8, 32, 64, 4, 4), (8, 32, 128, 4, 4), (4, 64, 64, 4, 4), (4, 32, 128, 6, 4),
                 (8, 16, 128, 4, 4), (2, 64, 128, 4, 4), (4, 32, 256, 3, 4), (8, 32, 128, 6, 4),
                 (2, 32, 256, 4, 4), (4, 64, 128, 4, 8)]
# (block_n, num_stages, num_warps, target programs)
ATTN_CONFIGS = [(64, 2, 4, 264), (64, 3, 4, 264), (128, 2, 4, 264), (128, 3, 8, 264), (64, 3, 4, 1056),
                (128, 3, 4, 528), (32, 3, 4, 528), (64, 4, 4, 528), (128, 2, 4, 528), (128, 4, 4, 264),
                (256, 2, 8, 264), (128, 3, 8, 528), (64, 4, 4, 1056),
                # target 1: one program per (slot, KV head) streams all its keys, no reduce kernel
                (64, 3, 4, 1), (128, 3, 8, 1), (128, 4, 8, 1), (256, 3, 8, 1), (64, 4, 8, 1), (128, 3, 4, 132)]
ATTN_S, ATTN_LAYERS, ATTN_POS = 576, 24, 544


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


def configs(part: str, name: str) -> list[tuple]:
    if part == "matmul":
        return MM_CONFIGS
    if part == "split":
        k = SPLITS[name][1]
        return [c for c in SPLIT_CONFIGS if (k // c[0]) % c[2] == 0]
    return ATTN_CONFIGS


def make_case(part: str, name: str, m: int, dtype, copies: int | None = None) -> SimpleNamespace:
    """One sweep case: ``run(cfg, i)`` launches the kernel(s) on weight (or cache layer) copy i,
    ``ref(i)`` the baseline (cuBLAS; None for attention), ``key`` the tuning-table key."""
    dev = "cuda"
    if part == "attention":
        kv, b = int(name), m
        layers = copies or ATTN_LAYERS
        cache = torch.randn(layers, 2, b, kv, ATTN_S, 64, dtype=dtype, device=dev)
        q = torch.randn(b, 32, 64, dtype=dtype, device=dev)
        p = torch.full((b, 1), ATTN_POS, device=dev)
        return SimpleNamespace(
            copies=layers, key=[b, kv], mbytes=2 * b * kv * (ATTN_POS + 1) * 64 * 2 / 2**20, ref=None,
            run=lambda cfg, i: fused.decode_attention(q, cache[i % layers, 0], cache[i % layers, 1], p, config=cfg))
    if part == "matmul":
        n, k, has_bias, act = MATMULS[name]
    else:
        (n, k), has_bias, act = SPLITS[name], False, 0
    nbytes = n * k * 2
    copies = copies or max(1, min(16, -(-256 * 2**20 // nbytes)))
    ws = [torch.randn(n, k, dtype=dtype, device=dev) / k**0.5 for _ in range(copies)]
    bias = torch.randn(n, dtype=dtype, device=dev) if has_bias else None
    x = torch.randn(m, k, dtype=dtype, device=dev)
    case = SimpleNamespace(copies=copies, mbytes=nbytes / 2**20, key=[n // 2 if act == 2 else n, k])
    if part == "split":
        h = torch.randn(m, n, dtype=dtype, device=dev)
        norm = SimpleNamespace(weight=torch.ones(n, dtype=dtype, device=dev), eps=1e-5)  # RMSNorm
        case.run = lambda cfg, i: fused.add_norm(h, fused.skinny_mm_split(x, ws[i % copies], cfg), None, norm)[1]
        case.ref = lambda i: fused.add_norm(h, F.linear(x, ws[i % copies]), None, norm)[1]
        return case

    def ref(i):
        y = F.linear(x, ws[i % copies], bias)
        return F.relu(y) if act == 1 else fused.silu_mul(y) if act == 2 else y

    case.run = lambda cfg, i: fused.skinny_mm(x, ws[i % copies], bias, act, config=cfg)
    case.ref = ref
    return case


def _compile_group(job: tuple) -> list:
    """In a worker process: launch every configuration of one case once (Triton compiles and caches it)."""
    part, name, m, dtype = job
    case = make_case(part, name, m, dtype, copies=1)
    failed = []
    for cfg in configs(part, name):
        try:
            case.run(cfg, 0)
        except Exception as e:  # noqa: BLE001 -- a tiling that does not fit is skipped in the sweep too
            failed.append((cfg, repr(e)[:160]))
    torch.cuda.synchronize()
    return failed


def precompile(cases: list[tuple], jobs: int) -> None:
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        failed = sum(len(f) for f in pool.map(_compile_group, cases))
    print(f"compiled {len(cases)} cases' configurations with {jobs} processes in "
          f"{time.perf_counter() - t0:.0f} s ({failed} did not compile)", flush=True)


def sweep(rows: list, part: str, name: str, m: int, dtype) -> None:
    case = make_case(part, name, m, dtype)
    calls = case.copies * (2 if part != "attention" else 1)
    row = {"part": part, "case": name, "m": m, "key": case.key, "mbytes": case.mbytes,
           "dtype": dtype_name(dtype), "configs": {}}
    if case.ref is not None:
        row["cublas_us"] = graph_time_us(case.ref, calls)
        want = case.ref(0).float()
    for cfg in configs(part, name):
        try:
            if case.ref is not None:
                got = case.run(cfg, 0).float()
                if ((got - want).norm() / want.norm()).item() > 2e-2:
                    print(f"  {name} m={m} {cfg}: wrong result, skipped", flush=True)
                    continue
            row["configs"][json.dumps(list(cfg))] = graph_time_us(lambda i: case.run(cfg, i), calls)
        except Exception as e:  # noqa: BLE001
            print(f"  {name} m={m} {cfg}: {type(e).__name__}, skipped", flush=True)
    best = min(row["configs"], key=row["configs"].get)
    row["best"], row["best_us"] = json.loads(best), row["configs"][best]
    row["best_TBps"] = case.mbytes * 2**20 / row["best_us"] / 1e6
    rows.append(row)
    base = f"cuBLAS {row['cublas_us']:7.1f} us  " if "cublas_us" in row else ""
    print(f"{part:9s} {name:14s} m={m:2d}: {base}best {row['best_us']:7.1f} us ({row['best_TBps']:.2f} TB/s) "
          f"{row['best']}", flush=True)


def launch_floor(rows: list) -> None:
    """The fixed cost of one kernel in a dependent chain, without bytes: 256 launches of a kernel whose 132
    programs each store one value ("empty"), first load one line that sits in L2 ("one L2 load"), or add one
    to what the predecessor stored ("dependent load"), captured in a graph, with and without PDL (each
    program waits for its predecessor, then lets its successor launch, as the decode kernels do)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _boundary(X, Y, stride, LOAD: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        if LOAD == 1:
            v = tl.load(X + pid * stride)
        elif LOAD == 2:  # what the predecessor stored: the decode step's data dependency
            v = tl.load(Y + pid) + 1.0
        else:
            v = pid.to(tl.float32)
        tl.store(Y + pid, v)

    programs, calls = 132, 256
    # Each launch reads its own 128-byte lines; 4.3 MB in all, so from the second replay on they are L2 hits.
    x = torch.zeros(calls * programs * 64 + 64, device="cuda")
    y = torch.zeros(programs, device="cuda")
    for load in (0, 1, 2):
        for pdl in (0, 1):
            extra = {"launch_pdl": True} if pdl else {}

            def run(i, load=load, pdl=pdl, extra=extra):
                _boundary[(programs,)](x[i * programs * 64:], y, 64, LOAD=load, PDL=pdl, **extra)

            us = graph_time_us(run, calls)
            name = f"{['empty', 'one L2 load', 'dependent load'][load]}, PDL {'on' if pdl else 'off'}"
            rows.append({"part": "launch", "case": name, "us_per_kernel": us})
            print(f"launch    {name:22s}: {us:5.2f} us per kernel in a chain of {calls}", flush=True)


def add_norm_forms(rows: list) -> None:
    """The add+norm that sums split-K partials, alone, in fp16 and bf16, with the partials read part by
    part or as one [parts, n] tile (``fused.add_norm(one_load=...)``): which form compiles to loads that
    are all in flight differs by dtype (Triton 3.6 on the H200: part by part for fp16, one tile for bf16).
    Rerun after a Triton upgrade; the default form is the one ``add_norm`` picks without ``one_load``."""
    from dejavu.model.layers import RMSNorm

    n, calls = 2048, 50
    for dtype in (torch.float16, torch.bfloat16):
        norm = RMSNorm(n, 1e-5).to("cuda", dtype)
        for m in ROWS:
            x = torch.randn(m, n, dtype=dtype, device="cuda")
            for parts in (2, 4):
                delta = fused.SplitSum(torch.randn(parts, m, n, device="cuda"), x.shape, dtype)
                row = {"part": "add_norm", "case": f"{parts} parts", "m": m,
                       "dtype": dtype_name(dtype)}
                for form, one_load in (("part_by_part_us", False), ("one_load_us", True)):
                    row[form] = graph_time_us(lambda i, o=one_load: fused.add_norm(x, delta, None, norm, o), calls)
                rows.append(row)
                print(f"add_norm  {row['dtype']:8s} {parts} parts m={m:2d}: part by part "
                      f"{row['part_by_part_us']:5.2f} us, one load {row['one_load_us']:5.2f} us", flush=True)


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
            row = {"part": "prefill", "case": f"prefill {shape}", "b": b}
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
    ap.add_argument("--parts", default="matmul,split,attention,prefill", help="also: launch, add_norm")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"],
                    help="of the sweep's tensors (the shipped tilings come from fp16 sweeps)")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                    help="processes that compile the configurations first (1: compile as the sweep goes)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    dtype = parse_dtype(args.dtype)
    cases = [(p, name, m) for p, names in (("matmul", MATMULS), ("split", SPLITS)) if p in parts
             for name in names for m in ROWS]
    if "attention" in parts:
        cases += [("attention", kv, b) for kv in ("32", "8") for b in ROWS]
    if args.jobs > 1 and cases:
        try:
            precompile([(*c, dtype) for c in cases], args.jobs)
        except Exception as e:  # noqa: BLE001 -- the sweep then compiles each configuration as it goes
            print(f"parallel compile failed ({type(e).__name__}: {e}); compiling in the sweep", flush=True)
    rows: list = []
    for case in cases:
        sweep(rows, *case, dtype)
    if "prefill" in parts:
        prefill_overhead(rows, dtype)
    if "launch" in parts:
        launch_floor(rows)
    if "add_norm" in parts:
        add_norm_forms(rows)
    if args.out:
        write_json(args.out, rows, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
