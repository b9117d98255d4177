"""Serving throughput on one device: our engine against transformers.generate on the same requests.

A workload of mixed-length requests (random prompts of ``--min-prompt``..``--max-prompt`` tokens, each
asking for ``--min-new``..``--max-new`` tokens, greedy) is served in arrival order as back-to-back
static batches of ``--batch`` requests, by

- ``ours``: ``Engine.generate`` (the same stages, cache and CUDA-graph decode step the workers run);
  the batch's slots are right-padded and each request stops at its own length;
- ``hf``: ``transformers`` ``generate`` on the same batches (left-padded, as HF batching needs), up to
  the batch's longest request; the tokens a request did not ask for are not counted.

Output tokens/s counts the tokens the requests asked for, over the wall time of the whole workload.
Greedy ids of both are compared with HF in fp32 on the same weights (match rate over asked-for tokens).

    python bench/serve.py --device cuda --out results/bench-serve.json
    python bench/serve.py --device cpu        # tiny shape, CI smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import SHAPES, hf_model, our_stage, short, sync  # noqa: E402

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
    rows = []
    for size in sizes:
        _, ref = serve_hf(ref32, requests[: size * 2], size, device)  # fp32 ids of the first two batches
        serve_ours(engine, requests[:size], size)  # warm-up: graph capture, Triton compile
        serve_hf(hf, requests[:size], size, device)
        t_ours, ours = serve_ours(engine, requests, size)
        t_hf, theirs = serve_hf(hf, requests, size, device)
        row = {"batch": size, "requests": len(requests), "asked_tokens": asked,
               "ours_s": t_ours, "hf_s": t_hf, "ours_tok_per_s": asked / t_ours, "hf_tok_per_s": asked / t_hf,
               "speedup": t_hf / t_ours,
               "match_vs_hf_fp32": {"ours": match(ours[: len(ref)], ref), "hf": match(theirs[: len(ref)], ref)},
               "ours_equal_hf": match(ours, theirs)}
        rows.append(row)
        print(f"batch {size}: ours {row['ours_tok_per_s']:.0f} tok/s ({t_ours:.2f} s), HF {row['hf_tok_per_s']:.0f} "
              f"tok/s ({t_hf:.2f} s): x{row['speedup']:.1f}; match vs fp32 ours {row['match_vs_hf_fp32']['ours']:.3f}"
              f" HF {row['match_vs_hf_fp32']['hf']:.3f}", flush=True)
    del hf, stage, engine, ref32
    gc.collect()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": args.shape, "dtype": short(dtype), "argv": sys.argv[1:],
            "workload": {k: getattr(args, k) for k in ("requests", "min_prompt", "max_prompt", "min_new", "max_new")}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "results": rows}, indent=1))
    print(f"| shape | dtype | batch | requests | ours tok/s | HF tok/s | ours/HF |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {args.shape} | {short(dtype)} | {r['batch']} | {r['requests']} | {r['ours_tok_per_s']:.0f} | "
              f"{r['hf_tok_per_s']:.0f} | {r['speedup']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
