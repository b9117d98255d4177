"""Serving throughput on one device: our engine against transformers.generate on the same requests.

A workload of mixed-length requests (random prompts of ``--min-prompt``..``--max-prompt`` tokens, each
asking for ``--min-new``..``--max-new`` tokens, greedy) is served in arrival order as back-to-back
static batches of ``--batch`` requests, by

- ``ours``: ``Engine.generate`` (the same stages, cache and CUDA-graph decode step the workers run);
  the batch's slots are right-padded and each request stops at its own length;
- ``serving`` (``--path serving``): the real serving path — ``dejavu-run`` starts the controller and one
  worker process on the device (CUDA-graph decode in pooled KV buffers, ZeroMQ control plane, sampling
  in the worker), the requests arriving at once and cut into microbatches of ``--batch``; throughput is
  output tokens over the run's makespan (first arrival to last token, model loading excluded);
- ``hf``: ``transformers`` ``generate`` on the same batches (left-padded, as HF batching needs), up to
  the batch's longest request; the tokens a request did not ask for are not counted.

Output tokens/s counts the tokens the requests asked for, over the wall time of the whole workload.
Greedy ids of both are compared with HF in fp32 on the same weights (match rate over asked-for tokens).

    python bench/serve.py --device cuda --out results/bench-serve.json            # engine and serving path
    python bench/serve.py --device cuda --path serving --requests 128 --batch 8,32
    python bench/serve.py --device cpu        # tiny shape, CI smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import SHAPES, hf_model, our_stage, short, sync  # noqa: E402
from pipeline import entry_point, model_overrides  # noqa: E402
from report import write_json  # noqa: E402

from dejavu.engine import Engine  # noqa: E402
from dejavu.model.config import parse_dtype  # noqa: E402
from dejavu.sampling import SamplingParams  # noqa: E402


def workload(n: int, vocab: int, args, seed: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(args.min_prompt, args.max_prompt + 1, (n,), generator=g).tolist()
    news = torch.randint(args.min_new, args.max_new + 1, (n,), generator=g).tolist()
    return [(torch.randint(3, vocab, (p,), generator=g).tolist(), m) for p, m in zip(lens, news)]


def batches(requests, size: int):
    for i in range(0, len(requests), size):
        yield requests[i:i + size]


def serve_ours(engine: Engine, requests, size: int) -> tuple[float, list[list[int]]]:
    outs: list[list[int]] = []
    sync(engine.device)
    t = time.perf_counter()
    for batch in batches(requests, size):
        gens = engine.generate([p for p, _ in batch], [SamplingParams(max_new_tokens=m) for _, m in batch])
        outs.extend(g.output_ids for g in gens)
    sync(engine.device)
    return time.perf_counter() - t, outs


def serve_hf(model, requests, size: int, device) -> tuple[float, list[list[int]]]:
    outs: list[list[int]] = []
    sync(device)
    t = time.perf_counter()
    for batch in batches(requests, size):
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(m for _, m in batch)
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        out = out[:, width:].cpu()
        outs.extend(out[i, :m].tolist() for i, (_, m) in enumerate(batch))
    sync(device)
    return time.perf_counter() - t, outs


def serve_serving_path(requests, size: int, dtype: torch.dtype, device, folder: Path, run_dir: Path,
                       timeout: float) -> tuple[float, list[list[int]], list[list[int]], dict]:
    """One ``dejavu-run`` (controller + one worker process) over the workload's sizes; returns the
    makespan, the prompts the controller drew, the outputs, and the summary."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    sizes = run_dir.parent / f"sizes-{size}.json"
    sizes.write_text(json.dumps([[len(p), m] for p, m in requests]))
    d = short(dtype)
    cmd = [*entry_point(), *model_overrides(str(folder)), "topology=single", f"topology.ubatch_size={size}", "workload=trace", f"workload.input_sizes_file={sizes}",
           "workload.num_requests=null", "backend=nccl" if device.type == "cuda" else "backend=gloo",
           f"backend.device={device.type}", f"backend.weights_data_type={d}", f"backend.inference_data_type={d}",
           "logger=none", "print_answers=false", "runner.echo=false", f"runner.timeout_s={timeout}",
           f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=timeout + 120)
    summary = run_dir / "summary.json"
    if r.returncode != 0 or not summary.exists():
        raise RuntimeError(f"serving run failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    recs = sorted((json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()),
                  key=lambda rec: rec["id"])
    if s["counts"]["completed"] != len(requests):
        raise RuntimeError(f"serving run completed {s['counts']['completed']} of {len(requests)} requests ({run_dir})")
    return s["makespan_s"], [rec["prompt_ids"] for rec in recs], [rec["output_ids"] for rec in recs], s


def match(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(len(r) for r in b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, help=", ".join(SHAPES) + " (default opt-1.3b; cpu: tiny-opt)")
    ap.add_argument("--dtype", default=None, help="default fp16 (cpu: fp32)")
    ap.add_argument("--requests", type=int, default=None, help="default 256 (cpu: 8)")
    ap.add_argument("--batch", default=None, help="comma list of batch sizes (default 8,32; cpu: 4)")
    ap.add_argument("--min-prompt", type=int, default=None)
    ap.add_argument("--max-prompt", type=int, default=None)
    ap.add_argument("--min-new", type=int, default=None)
    ap.add_argument("--max-new", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path", default="both", choices=("engine", "serving", "both"),
                    help="engine: Engine.generate in this process; serving: dejavu-run with one worker (default both)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per serving run")
    ap.add_argument("--runs-dir", default=None, help="keep the serving runs' folders here (default: a temp folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device; use --device cpu")
    args.shape = args.shape or ("tiny-opt" if cpu else "opt-1.3b")
    if args.shape not in SHAPES:
        ap.error(f"--shape: unknown shape {args.shape!r}; choose from {', '.join(SHAPES)}")
    dtype = parse_dtype(args.dtype or ("fp32" if cpu else "fp16"))
    args.requests = args.requests or (8 if cpu else 256)
    sizes = [int(b) for b in (args.batch or ("4" if cpu else "8,32")).split(",")]
    args.min_prompt = args.min_prompt or (4 if cpu else 32)
    args.max_prompt = args.max_prompt or (24 if cpu else 512)
    args.min_new = args.min_new or (2 if cpu else 16)
    args.max_new = args.max_new or (8 if cpu else 128)
    if not (1 <= args.min_prompt <= args.max_prompt and 1 <= args.min_new <= args.max_new):
        ap.error("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-new <= --max-new")

    ref32 = hf_model(args.shape, torch.float32, device, args.seed)
    vocab = ref32.config.vocab_size
    requests = workload(args.requests, vocab, args, args.seed + 1)
    asked = sum(m for _, m in requests)
    hf = hf_model(args.shape, dtype, device, args.seed, like=ref32)
    stage = our_stage(args.shape, ref32, dtype, device)
    # One cache length for the whole workload, so every batch replays the same graphs.
    engine = Engine([stage], cache_len=args.max_prompt + args.max_new)
    tmp = Path(tempfile.mkdtemp(prefix="dejavu-serve-"))
    folder = tmp / f"{args.shape}-random"
    if args.path != "engine":
        hf.save_pretrained(folder)  # the worker reads the same weights from a checkpoint folder
    rows = []
    try:
        for size in sizes:
            serve_hf(hf, requests[:size], size, device)  # warm-up
            row = {"batch": size, "requests": len(requests), "asked_tokens": asked}
            if args.path != "serving":
                _, ref = serve_hf(ref32, requests[: size * 2], size, device)  # fp32 ids of the first two batches
                t_hf, theirs = serve_hf(hf, requests, size, device)
                row.update({"hf_s": t_hf, "hf_tok_per_s": asked / t_hf})
                serve_ours(engine, requests[:size], size)  # warm-up: graph capture, Triton compile
                t_ours, ours = serve_ours(engine, requests, size)
                row.update({"ours_s": t_ours, "ours_tok_per_s": asked / t_ours, "speedup": t_hf / t_ours,
                            "match_vs_hf_fp32": {"ours": match(ours[: len(ref)], ref),
                                                 "hf": match(theirs[: len(ref)], ref)},
                            "ours_equal_hf": match(ours, theirs)})
                print(f"batch {size}: engine {row['ours_tok_per_s']:.0f} tok/s ({t_ours:.2f} s), HF "
                      f"{row['hf_tok_per_s']:.0f} tok/s ({t_hf:.2f} s): x{row['speedup']:.1f}; match vs fp32 ours "
                      f"{row['match_vs_hf_fp32']['ours']:.3f} HF {row['match_vs_hf_fp32']['hf']:.3f}", flush=True)
            if args.path != "engine":
                runs = Path(args.runs_dir).resolve() if args.runs_dir else tmp
                span, prompts, served, summary = serve_serving_path(requests, size, dtype, device, folder,
                                                                    runs / f"run-b{size}", args.timeout)
                # The controller drew its own random prompts of the same sizes: HF serves those too.
                same = [(p, m) for p, (_, m) in zip(prompts, requests)]
                t_hf2, theirs2 = serve_hf(hf, same, size, device)
                row.setdefault("hf_tok_per_s", asked / t_hf2)
                row.update({"serving_s": span, "serving_tok_per_s": asked / span, "hf_same_prompts_s": t_hf2,
                            "serving_speedup": t_hf2 / span, "serving_equal_hf": match(served, theirs2),
                            "serving_ttft_p50_s": summary["ttft_s"]["p50"], "serving_tpot_p50_s": summary["tpot_s"]["p50"],
                            "serving_stage_busy": {n: v.get("busy_fraction") for n, v in summary["stages"].items()},
                            "serving_worker_seconds": {w: v["seconds_by_kind"] for w, v in summary["workers"].items()}})
                print(f"batch {size}: serving path {row['serving_tok_per_s']:.0f} tok/s ({span:.2f} s makespan), HF "
                      f"{asked / t_hf2:.0f} tok/s ({t_hf2:.2f} s) on the same prompts: x{row['serving_speedup']:.1f}; "
                      f"ids equal to HF {row['serving_equal_hf']:.3f}", flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del hf, stage, engine, ref32
    gc.collect()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": args.shape, "dtype": short(dtype), "argv": sys.argv[1:],
            "workload": {k: getattr(args, k) for k in ("requests", "min_prompt", "max_prompt", "min_new", "max_new")}}
    if args.out:
        write_json(args.out, {"info": info, "results": rows})
    print("| shape | dtype | batch | requests | engine tok/s | serving tok/s | HF tok/s | engine/HF | serving/HF |\n"
          "|---|---|---|---|---|---|---|---|---|")

    def cell(r, key, fmt):
        return fmt.format(r[key]) if key in r else "-"

    for r in rows:
        print(f"| {args.shape} | {short(dtype)} | {r['batch']} | {r['requests']} | {cell(r, 'ours_tok_per_s', '{:.0f}')} | "
              f"{cell(r, 'serving_tok_per_s', '{:.0f}')} | {r['hf_tok_per_s']:.0f} | {cell(r, 'speedup', '{:.1f}x')} | "
              f"{cell(r, 'serving_speedup', '{:.1f}x')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
