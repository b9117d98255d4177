"""Prefill and decode speed of our engine beside transformers.generate, on the same random weights.

For each model shape (built inline from transformers' config classes, randomly initialised), batch and
dtype it measures, in one run:

- ours: prefill time and TFLOP/s (2 * params * prompt tokens / time), the decode step of the stage
  (CUDA-graph replay timed with events; the whole model in one stage), and end-to-end decode ms/step of
  ``Engine.generate`` measured the way the HF numbers are (generate N tokens minus generate 1, over N-1);
- transformers: the same prefill and decode numbers from ``generate``;
- the floor of a decode step: bytes it must read (weights + the KV cache at the mean decode length)
  over the device-to-device copy bandwidth measured at the start of the run (bytes read + written);
- correctness: greedy ids of ours and of HF in fp16/bf16 against HF in fp32 (match rate over all
  generated positions, and the mean agreeing prefix), and ours in fp32 against HF in fp32.

    python bench/generate.py --device cuda --out results/bench-generate.json
    python bench/generate.py --device cuda --variants --rounds 3 --dtypes fp16   # the engine one change at a time
    python bench/generate.py --device cpu          # tiny shapes, CI smoke

``--variants`` times the decode step of each optimisation stage instead (``VARIANTS``: each sets switches of
``dejavu/model/switches.py``); ``--variant-names`` picks some by index, ``--rounds`` alternates their order.

Writes JSON with every number (--out) and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dejavu.engine import Engine  # noqa: E402
from dejavu.model import switches  # noqa: E402
from dejavu.model.config import ModelConfig, parse_dtype  # noqa: E402
from dejavu.model.stage import StageModel  # noqa: E402
from dejavu.model.weights import StateDictSource  # noqa: E402
from dejavu.sampling import SamplingParams  # noqa: E402
from report import write_json  # noqa: E402

SHAPES = {
    # facebook/opt-1.3b
    "opt-1.3b": dict(model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24,
                     num_attention_heads=32, ffn_dim=8192, max_position_embeddings=2048,
                     word_embed_proj_dim=2048, do_layer_norm_before=True),
    # meta-llama/Llama-3.2-1B (GQA 32/8, tied embeddings)
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                     max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
                     rms_norm_eps=1e-5),
    # CI smoke shapes
    "tiny-opt": dict(model_type="opt", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64,
                     do_layer_norm_before=True),
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                       max_position_embeddings=256, tie_word_embeddings=True),
}


def hf_config(shape: str):
    from transformers import LlamaConfig, OPTConfig

    spec = dict(SHAPES[shape])
    kind = spec.pop("model_type")
    common = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return (OPTConfig if kind == "opt" else LlamaConfig)(**spec, **common)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median wall time of ``fn`` in seconds (device synchronised around each call)."""
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy rate, bytes read + written per second (the ceiling of a memory-bound step)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    b.copy_(a)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        secs = start.elapsed_time(end) / 1e3 / 20
    else:
        secs = timed(lambda: b.copy_(a), device, 10)
    return 2 * n / secs


def matmul_rate(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3)


def short(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def hf_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int, like=None):
    """A random HF model; ``like`` copies another's weights (same values in another dtype)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if like is None else dtype)
    if like is not None:
        model.load_state_dict(like.state_dict())
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, prompts.shape[1]:]


def our_stage(shape: str, hf, dtype: torch.dtype, device: torch.device) -> StageModel:
    cfg = ModelConfig.from_hf({**hf.config.to_dict(), "model_type": SHAPES[shape]["model_type"]})
    src = StateDictSource({k: v for k, v in hf.state_dict().items()}, "random weights")
    return StageModel(cfg, comm=None, dtype=dtype, device=device).load_weights(src)


def param_count(hf) -> int:
    return sum(p.numel() for p in hf.parameters())  # tied matrices counted once


def floor_bytes(cfg: ModelConfig, params: int, dtype: torch.dtype, batch: int, kv_len: float) -> float:
    size = torch.empty((), dtype=dtype).element_size()
    kv = cfg.num_layers * cfg.kv_bytes_per_token_per_layer(dtype) * batch * kv_len
    return params * size + kv


def match(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.cpu(), ref.cpu()
    same = ours == ref
    prefix = (same.cumprod(dim=1)).sum(dim=1).float()
    return {"rate": same.float().mean().item(), "mean_prefix": prefix.mean().item(),
            "rows_equal": int(same.all(dim=1).sum()), "rows": ours.shape[0]}


def decode_step_ms(engine: Engine, prompts: list[list[int]], device: torch.device, steps: int,
                   host_sync: bool = False) -> float:
    """The decode step of the stage alone: graph replays (or eager forwards) at the mean position.
    ``host_sync``: copy the positions from the host each step (blocking), as this bench did until
    2026-12-03; kept for the side-by-side."""
    batch = len(prompts)
    slab = engine._slab_for(batch, len(prompts[0]) + steps)
    engine.prefill(prompts, slab)
    x = torch.randint(3, engine.cfg.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), len(prompts[0]) + steps // 2, dtype=torch.long)
    # Graphs take device positions. They stay there, as in the engine's greedy loop: a blocking host-to-device
    # copy per step would time the host's round trip too (+2-12% on the H200, docs/PERFORMANCE.md).
    graphs = slab.graphs is not None
    pos_device = pos.to(device) if graphs else pos

    def one():
        engine._decode(slab, x, pos.to(device) if graphs and host_sync else pos_device)

    if device.type != "cuda":
        return timed(one, device, 5) * 1e3
    for _ in range(3):
        one()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(20):
            one()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 20)
    return statistics.median(samples)


def profile_step(engine: Engine, prompts, device, steps: int, out_path: Path | None) -> str:
    from torch.profiler import ProfilerActivity, profile

    batch = len(prompts)
    slab = engine._slab_for(batch, len(prompts[0]) + steps)
    x = torch.randint(3, engine.cfg.vocab_size, (batch, 1), device=device)
    pos = torch.full((batch, 1), len(prompts[0]) + steps // 2, dtype=torch.long, device=device)
    engine._decode(slab, x, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine._decode(slab, x, pos)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    if out_path is not None:
        out_path.write_text(table)
    return table


def run_shape(shape: str, args, device: torch.device, bw: float, results: list) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = [parse_dtype(d) for d in args.dtypes.split(",")]
    hf_dtypes = [parse_dtype(d) for d in args.hf_dtypes.split(",")] if args.hf_dtypes else []
    P, N = args.prompt, args.gen
    ref32 = hf_model(shape, torch.float32, device, args.seed)
    params = param_count(ref32)
    cfg = ModelConfig.from_hf({**ref32.config.to_dict(), "model_type": SHAPES[shape]["model_type"]})
    g = torch.Generator().manual_seed(args.seed + 1)
    all_prompts = torch.randint(3, cfg.vocab_size, (max(batches), P), generator=g)
    refs = {b: hf_generate(ref32, all_prompts[:b].to(device), N).cpu() for b in batches}

    if args.fp32_check:
        stage = our_stage(shape, ref32, torch.float32, device)
        eng = Engine([stage], cache_len=P + N)
        for b in batches:
            out = eng.generate(all_prompts[:b].tolist(), SamplingParams(max_new_tokens=N))
            m = match(torch.tensor([o.output_ids for o in out]), refs[b])
            results.append({"model": shape, "impl": "ours", "dtype": "fp32", "batch": b, "match_vs_hf_fp32": m})
            print(f"[{shape}] ours fp32 b={b}: match vs HF fp32 {m}", flush=True)
        del stage, eng

    for dtype in dict.fromkeys(dtypes + hf_dtypes):  # in the order given (which runs first can matter)
        dname = short(dtype)
        hf = hf_model(shape, dtype, device, args.seed, like=ref32) if dtype in hf_dtypes else None
        stage = our_stage(shape, ref32, dtype, device) if dtype in dtypes else None
        engine = Engine([stage], cache_len=P + N) if stage is not None else None
        for b in batches:
            prompts = all_prompts[:b]
            row_base = {"model": shape, "params": params, "batch": b, "prompt": P, "gen": N, "dtype": dname}
            fb = floor_bytes(cfg, params, dtype, b, P + N / 2)
            floor_ms = fb / bw * 1e3
            if engine is not None:
                plist = prompts.tolist()
                gen1 = lambda: engine.generate(plist, SamplingParams(max_new_tokens=1))  # noqa: E731
                genN = lambda: engine.generate(plist, SamplingParams(max_new_tokens=N))  # noqa: E731
                out = genN()  # warm-up (captures the graphs) and the ids for the match
                gen1()
                slab = engine._slab_for(b, P + N)
                t_pre = timed(lambda: engine.prefill(plist, slab), device, args.reps)
                t1 = timed(gen1, device, args.reps)
                tN = timed(genN, device, args.reps)
                step = decode_step_ms(engine, plist, device, N)
                step_sync = decode_step_ms(engine, plist, device, N, host_sync=True) if device.type == "cuda" else step
                ids = torch.tensor([o.output_ids for o in out])
                row = {**row_base, "impl": "ours", "prefill_s": t_pre,
                       "prefill_TFLOPs": 2 * params * b * P / t_pre / 1e12,
                       "decode_step_ms": step, "decode_step_ms_host_sync": step_sync,
                       "decode_step_ms_e2e": (tN - t1) / (N - 1) * 1e3,
                       "e2e_tok_per_s": b * N / tN, "floor_ms": floor_ms, "step_over_floor": step / floor_ms,
                       "match_vs_hf_fp32": match(ids, refs[b])}
                results.append(row)
                print(f"[{shape}] ours {dname} b={b}: prefill {t_pre*1e3:.1f} ms "
                      f"({row['prefill_TFLOPs']:.0f} TFLOP/s), step {step:.3f} ms (with a host sync "
                      f"{step_sync:.3f}), e2e step "
                      f"{row['decode_step_ms_e2e']:.3f} ms, floor {floor_ms:.3f} ms "
                      f"(x{step / floor_ms:.2f}), match {row['match_vs_hf_fp32']['rate']:.3f}", flush=True)
                if args.profile and device.type == "cuda" and b in (1, max(batches)):
                    path = Path(args.out).with_name(f"profile-{shape}-{dname}-b{b}.txt") if args.out else None
                    print(profile_step(engine, plist, device, N, path)[:4000], flush=True)
            if hf is not None:
                pd = prompts.to(device)
                out = hf_generate(hf, pd, N)
                t1 = timed(lambda: hf_generate(hf, pd, 1), device, args.reps)
                tN = timed(lambda: hf_generate(hf, pd, N), device, args.reps)
                step = (tN - t1) / (N - 1) * 1e3
                row = {**row_base, "impl": "hf", "prefill_s": t1, "prefill_TFLOPs": 2 * params * b * P / t1 / 1e12,
                       "decode_step_ms": step, "decode_step_ms_e2e": step, "e2e_tok_per_s": b * N / tN,
                       "floor_ms": floor_ms, "step_over_floor": step / floor_ms,
                       "match_vs_hf_fp32": match(out, refs[b])}
                results.append(row)
                print(f"[{shape}] hf   {dname} b={b}: prefill {t1*1e3:.1f} ms ({row['prefill_TFLOPs']:.0f} "
                      f"TFLOP/s), step {step:.3f} ms, floor {floor_ms:.3f} ms, "
                      f"match {row['match_vs_hf_fp32']['rate']:.3f}", flush=True)
        del hf, stage, engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del ref32
    gc.collect()


# What each change bought: (name, environment switches, fused pre-norm pass, CUDA graphs).
# Every variant uses the launch tilings DEJAVU_TUNING names at start (default: this GPU's file, if shipped),
# except "H100 tilings" (10), which takes the built-in tables: `DEJAVU_TUNING=sweep.json ... --variant-names
# 9,10` is the A/B of a new sweep file against them (the two differ in nothing else).
# The switches are declared in dejavu/model/switches.py; docs/PERFORMANCE.md has what each variant measured.
_OFF = {"DEJAVU_TRITON": "0", "DEJAVU_SKINNY": "0", "DEJAVU_PDL": "0",
        "DEJAVU_SKINNY_ALL": "0", "DEJAVU_SPLITK": "0", "DEJAVU_ATTN_WRITE": "0", "DEJAVU_PDL_EARLY": "",
        "DEJAVU_TUNING": switches.get("DEJAVU_TUNING"), "DEJAVU_MATMUL": "triton", "DEJAVU_TMA_EARLY": "1",
        "DEJAVU_TMA_TILE": "", "DEJAVU_TMA_SPLITS": ""}
_SKINNY = {**_OFF, "DEJAVU_TRITON": "1", "DEJAVU_SKINNY": "1"}
_SPLIT = {**_SKINNY, "DEJAVU_SPLITK": "1"}
_WRITE = {**_SPLIT, "DEJAVU_ATTN_WRITE": "1"}
VARIANTS = [
    ("eager, torch ops", _OFF, False, False),
    ("graphs, torch ops", _OFF, False, True),
    ("graphs, triton kernels", {**_OFF, "DEJAVU_TRITON": "1"}, False, True),
    ("graphs, triton, fused blocks", {**_OFF, "DEJAVU_TRITON": "1"}, True, True),
    ("+ skinny matmuls", _SKINNY, True, True),
    ("+ split-K summed by add+norm", _SPLIT, True, True),
    ("+ rope/cache write inside decode attention", _WRITE, True, True),
    ("+ PDL (next kernel launched after wait)", {**_WRITE, "DEJAVU_PDL": "1"}, True, True),
    ("+ PDL, matmuls trigger after their loop", {**_WRITE, "DEJAVU_PDL": "late"}, True, True),
    ("+ PDL late, skinny everywhere", {**_WRITE, "DEJAVU_PDL": "late", "DEJAVU_SKINNY_ALL": "1"}, True, True),
    ("PDL late, skinny everywhere, H100 tilings", {**_WRITE, "DEJAVU_PDL": "late", "DEJAVU_SKINNY_ALL": "1",
                                                   "DEJAVU_TUNING": "builtin"}, True, True),
    ("PDL late, split-K matmuls trigger at once (Triton matmuls)", {**_WRITE, "DEJAVU_PDL": "late",
                                                             "DEJAVU_SKINNY_ALL": "1", "DEJAVU_PDL_EARLY": "split"},
     True, True),
    ("PDL late, split-K and plain matmuls at once", {**_WRITE, "DEJAVU_PDL": "late", "DEJAVU_SKINNY_ALL": "1",
                                                     "DEJAVU_PDL_EARLY": "split,plain"}, True, True),
]
# The TMA matmul (dejavu/model/skinny_tma.py) on the Triton matmuls' settings: the default (its weight tiles
# before the PDL wait, tilings per row count), the same with the weights read after the wait, and one tiling
# for every row count.
_TRITON = VARIANTS[11][1]
VARIANTS += [
    ("TMA matmuls, first weight tiles before the wait (default)", {**_TRITON, "DEJAVU_MATMUL": "tma"}, True, True),
    ("TMA matmuls, weights after the wait", {**_TRITON, "DEJAVU_MATMUL": "tma", "DEJAVU_TMA_EARLY": "0"}, True, True),
    *((f"TMA matmuls {t.replace(',', 'x', 1).replace(',', ' x')} at every batch",
       {**_TRITON, "DEJAVU_MATMUL": "tma", "DEJAVU_TMA_TILE": t}, True, True)
      for t in ("64,128,8", "64,128,6", "64,256,4")),
    *((f"TMA matmuls, split-K projections in {k} slices", {**_TRITON, "DEJAVU_MATMUL": "tma", "DEJAVU_TMA_SPLITS": k},
       True, True) for k in ("2", "8")),
]


def run_variants(shape: str, args, device: torch.device, bw: float, results: list) -> None:
    """Each selected variant's decode step (and prefill) at every batch. With ``--rounds N`` the variants
    run N times, in index order and then reversed, and each cell reports the median: one pass in index
    order favours or handicaps whatever runs first, and a cell moves by ~5% from one pass to the next."""
    batches = [int(b) for b in args.batches.split(",")]
    dtype = parse_dtype(args.dtypes.split(",")[0])
    P, N = args.prompt, args.gen
    ref = hf_model(shape, torch.float32, device, args.seed)
    params = param_count(ref)
    stage = our_stage(shape, ref, dtype, device)
    del ref
    gc.collect()
    fusable = stage.fused
    g = torch.Generator().manual_seed(args.seed + 1)
    only = args.variant_names.split(",") if args.variant_names else None
    chosen = [i for i, (_, _, _, graphs) in enumerate(VARIANTS)
              if not (graphs and device.type != "cuda") and not (only and str(i) not in only)]
    saved = {k: os.environ.get(k) for k in _OFF}
    steps: dict = {}
    prefill: dict = {}
    for r in range(args.rounds):
        for i in chosen if r % 2 == 0 else chosen[::-1]:
            name, env, fused, graphs = VARIANTS[i]
            os.environ.update(env)
            stage.fused = fused and fusable
            for b in batches:
                engine = Engine([stage], cuda_graphs=graphs, cache_len=P + N)
                plist = torch.randint(3, stage.cfg.vocab_size, (b, P), generator=g).tolist()
                steps.setdefault((i, b), []).append(decode_step_ms(engine, plist, device, N))
                if r == 0:
                    slab = engine._slab_for(b, P + N)
                    prefill[i, b] = timed(lambda: engine.prefill(plist, slab), device, args.reps)
                    del slab
                print(f"[{shape}] round {r + 1}/{args.rounds} {name:30s} b={b:3d}: step "
                      f"{steps[i, b][-1]:8.3f} ms", flush=True)
                del engine
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    for i in chosen:
        name = VARIANTS[i][0]
        for b in batches:
            step, t_pre = statistics.median(steps[i, b]), prefill[i, b]
            floor_ms = floor_bytes(stage.cfg, params, dtype, b, P + N / 2) / bw * 1e3
            results.append({"model": shape, "impl": "variant", "variant": name, "dtype": short(dtype), "batch": b,
                            "decode_step_ms": step, "decode_step_ms_rounds": steps[i, b], "floor_ms": floor_ms,
                            "prefill_s": t_pre, "prefill_TFLOPs": 2 * params * b * P / t_pre / 1e12})
            print(f"[{shape}] {name:30s} b={b:3d}: step {step:8.3f} ms (x{step / floor_ms:5.2f} floor), "
                  f"prefill {t_pre * 1e3:7.1f} ms ({2 * params * b * P / t_pre / 1e12:5.0f} TFLOP/s)", flush=True)
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    del stage
    gc.collect()


def best_env(path: str) -> str:
    """Shell exports of the variant with the lowest geometric-mean step/floor in a --variants JSON."""
    import math

    rows = [r for r in json.load(open(path))["results"] if r["impl"] == "variant"]
    score: dict = {}
    for r in rows:
        score.setdefault(r["variant"], []).append(math.log(r["decode_step_ms"] / r["floor_ms"]))
    best = min(score, key=lambda v: sum(score[v]) / len(score[v]))
    env = next(e for name, e, _, _ in VARIANTS if name == best)
    return f"# best: {best}\n" + "\n".join(f"export {k}={v}" for k, v in env.items())


def table(results: list) -> str:
    lines = ["| shape | dtype | batch | ours step ms | ours e2e ms | HF step ms | floor ms | ours/floor | HF/ours "
             "| ours prefill TFLOP/s | HF prefill TFLOP/s | match ours / HF (vs fp32) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["model"], r["dtype"], r["batch"])  # noqa: E731
    ours = {key(r): r for r in results if r["impl"] == "ours" and "decode_step_ms" in r}
    if not ours and not any(r["impl"] == "hf" for r in results):
        return "\n".join(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['decode_step_ms']:.3f} ms | "
                         f"x{r['decode_step_ms'] / r['floor_ms']:.2f} floor | {r['prefill_TFLOPs']:.0f} TFLOP/s |"
                         for r in results if r["impl"] == "variant")
    hf = {key(r): r for r in results if r["impl"] == "hf"}
    for k in sorted(set(ours) | set(hf)):
        o, h = ours.get(k), hf.get(k)
        f = lambda r, name, fmt: format(r[name], fmt) if r else "-"  # noqa: E731
        ratio = f"{h['decode_step_ms'] / o['decode_step_ms']:.1f}x" if o and h else "-"
        m = (f"{o['match_vs_hf_fp32']['rate']:.2f}" if o else "-") + " / " + \
            (f"{h['match_vs_hf_fp32']['rate']:.2f}" if h else "-")
        floor = (o or h)["floor_ms"]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {f(o, 'decode_step_ms', '.3f')} | "
                     f"{f(o, 'decode_step_ms_e2e', '.3f')} | {f(h, 'decode_step_ms', '.2f')} | {floor:.3f} | "
                     f"{(o['step_over_floor'] if o else 0):.2f} | {ratio} | {f(o, 'prefill_TFLOPs', '.3g')} | "
                     f"{f(h, 'prefill_TFLOPs', '.3g')} | {m} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,32; cpu: 1,4)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; cpu: 32)")
    ap.add_argument("--gen", type=int, default=None, help="new tokens (default 64; cpu: 8)")
    ap.add_argument("--dtypes", default=None, help="our dtypes (default fp16,bf16; cpu: fp32)")
    ap.add_argument("--hf-dtypes", default=None, help="HF dtypes timed (default fp16,bf16; cpu: fp32)")
    ap.add_argument("--no-fp32-check", dest="fp32_check", action="store_false",
                    help="skip ours-in-fp32 against HF-in-fp32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print the kernel table of a decode step")
    ap.add_argument("--variants", action="store_true",
                    help="instead: decode step and prefill of each optimisation stage (first of --dtypes)")
    ap.add_argument("--variant-names", default=None, help="with --variants: comma list of their indices")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --variants: passes over the variants, alternately in index order and reversed; "
                         "each cell reports the median")
    ap.add_argument("--out", default=None, help="write every number here (JSON)")
    ap.add_argument("--print-best-env", metavar="VARIANTS_JSON", default=None,
                    help="print shell exports of the best variant in a --variants JSON, and exit")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.print_best_env:
        print(best_env(args.print_best_env))
        return 0
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device; use --device cpu")
    args.shapes = args.shapes or ("tiny-opt,tiny-llama" if cpu else "opt-1.3b,llama-1b")
    args.batches = args.batches or ("1,4" if cpu else "1,8,32")
    args.prompt = args.prompt or (32 if cpu else 512)
    args.gen = args.gen or (8 if cpu else 64)
    args.dtypes = args.dtypes or ("fp32" if cpu else "fp16,bf16")
    args.hf_dtypes = args.hf_dtypes if args.hf_dtypes is not None else ("fp32" if cpu else "fp16,bf16")
    for s in args.shapes.split(","):
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    if args.gen < 2:
        ap.error("--gen must be >= 2 (decode time is generate(N) - generate(1))")

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "argv": sys.argv[1:],
            "triton": switches.get("DEJAVU_TRITON")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    bw = copy_bandwidth(device)
    ceilings = {"d2d_GBps_rw": bw / 1e9, "bf16_matmul_TFLOPs": (matmul_rate(device) or 0) / 1e12}
    print(f"device {info['device']}: copy {bw / 1e9:.0f} GB/s (read+write), "
          f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    results: list = []
    for shape in args.shapes.split(","):
        (run_variants if args.variants else run_shape)(shape, args, device, bw, results)
    report = {"info": info, "ceilings": ceilings, "results": results}
    if args.out:
        write_json(args.out, report)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
