"""Microbatch swapping at one pipeline stage (the paper's Figure 9 and Appendix G), in one process.

A stage of an OPT-1.3B-sized model (by default 6 of its 24 layers: one stage of a 4-stage pipeline, random
weights, fp16, CUDA graphs on a GPU) runs the steady state of a pipeline: ``--inflight`` microbatches
(default 4, one per stage) take decode turns round robin, the way a stage sees them. Per configuration
(microbatch b x positions):

- the pinned copy ceiling: a contiguous device -> pinned host copy and back of one microbatch's KV buffer
  (on the CPU: a host memcpy), measured in the same run;
- without swapping: b requests per microbatch, one KV buffer each (``inflight`` buffers on the device);
- with swapping at the same device KV budget: 2b requests per microbatch, 2 resident buffers of 2b
  (``dejavu.worker.swap.SwappingPool``: the other microbatches' caches in pinned host memory, swapped
  while the current microbatch computes), and, to isolate the swap's cost, swapping at b;
- per swapping run: swap-out and swap-in throughput against the ceiling, the share of swap time hidden
  behind compute (1 - the time the compute waited / the swap time), and swap time per turn over a decode
  step: above 1 the compute waits for the copies and swapping loses (Appendix G).

Throughput is tokens per second of the stage (in a pipeline's steady state every stage runs at the
pipeline's rate).

    python bench/swapping.py --device cuda                     # OPT-1.3B-sized stage, b x positions sweep
    python bench/swapping.py --device cpu                      # a small stage (OPT-125M-sized), smoke
    python bench/swapping.py --device cuda --configs 8x256,32x1024 --rounds 10

Prints a table and writes every number as JSON (--out, default results/bench/swapping.json). Needs torch
and transformers (tensor names and shapes of the model) only.
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

from dejavu.model.config import ModelConfig, parse_dtype  # noqa: E402
from dejavu.model.stage import StageModel  # noqa: E402
from dejavu.model.weights import CheckpointError  # noqa: E402
from dejavu.streaming import StreamStats  # noqa: E402
from dejavu.worker.cache_pool import CachePool, KVPoolOptions  # noqa: E402
from dejavu.worker.swap import SwappingPool  # noqa: E402
from report import write_json  # noqa: E402

# facebook/opt-1.3b and facebook/opt-125m
SHAPES = {
    "opt-1.3b": dict(model_type="opt", vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     ffn_dim=8192, max_position_embeddings=2048, do_layer_norm_before=True, word_embed_proj_dim=2048),
    "opt-125m": dict(model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     ffn_dim=3072, max_position_embeddings=2048, do_layer_norm_before=True, word_embed_proj_dim=768),
}
GPU = dict(shape="opt-1.3b", stages=4, dtype="fp16", configs="8x128,8x512,16x1024,32x2048")
CPU = dict(shape="opt-125m", stages=4, dtype="fp32", configs="4x128,8x256")


class RandomSource:
    """Random weights of a Hugging Face checkpoint's tensors, made on demand (only the stage's layers)."""

    def __init__(self, hf: dict, device, dtype) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = dict(hf)
        config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self.shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        self.device, self.dtype, self.folder = device, dtype, "random weights"
        self.g = torch.Generator(device=device).manual_seed(0)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def get(self, name: str, shard=None) -> torch.Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"tensor {name!r} is not in the model")
        shape = self.shapes[name]
        if len(shape) == 1 and name.endswith("weight"):
            t = torch.ones(shape, device=self.device, dtype=self.dtype)
        else:
            t = (torch.randn(shape, generator=self.g, device=self.device) * 0.02).to(self.dtype)
        return t if shard is None or shard.size == 1 else t.chunk(shard.size, dim=shard.dim)[shard.rank]


def build_stage(a, device) -> StageModel:
    hf = SHAPES[a.shape]
    cfg = ModelConfig.from_hf(hf)
    per = cfg.num_layers // a.stages
    first = per if a.stages > 1 else 0  # a middle stage: hidden states in and out, no embedding or head
    last = min(first + per, cfg.num_layers)
    stage = StageModel(cfg, first, last, dtype=a.dtype, device=device)
    stage.load_weights(RandomSource(hf, device, parse_dtype(a.dtype)))
    return stage


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_ceiling(nbytes: int, device, iters: int = 5) -> dict:
    """Seconds of one contiguous copy of ``nbytes`` device -> host and back (pinned on a GPU), median."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    out = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        times = []
        for _ in range(iters + 1):
            sync(device)
            t0 = time.perf_counter()
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                dst.copy_(src, non_blocking=True)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            else:
                dst.copy_(src)
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times[1:])
        out[name + "_GBps"] = nbytes / out[name] / 1e9
    return out


def steady_state(stage: StageModel, pool: CachePool, b: int, positions: int, inflight: int, rounds: int,
                 warm: int, device) -> dict:
    """``inflight`` microbatches of ``b`` take decode turns round robin: prompts of ``positions - rounds - warm``
    tokens prefilled, then ``warm`` untimed and ``rounds`` timed rounds of one decode step each."""
    h = stage.cfg.hidden_size
    steps = rounds + warm
    prompt = positions - steps
    g = torch.Generator(device=device).manual_seed(1)
    if pool.cuda_graphs:  # as a worker warms up: each device buffer's decode graph captured before serving
        warm_leases = [pool.acquire(-1 - i, b, positions) for i in range(pool.warm_buffers(inflight))]
        for lease in warm_leases:
            pool.decode(lease, torch.zeros(b, 1, h, device=device, dtype=stage.dtype),
                        torch.zeros(b, 1, dtype=torch.long), None)
        for i in range(len(warm_leases)):
            pool.release(-1 - i)
    leases = []
    dtype = stage.dtype
    for u in range(inflight):
        lease = pool.acquire(u, b, positions)
        x = torch.randn(b, prompt, h, generator=g, device=device).to(dtype)
        pool.prefill(lease, x, None)
        leases.append(lease)
    xs = [torch.randn(b, 1, h, generator=g, device=device).to(dtype) for _ in range(inflight)]
    t0 = None
    for k in range(steps):
        if k == warm:
            sync(device)
            if isinstance(pool, SwappingPool):
                pool._resolve(block=True)
                pool.t = {"out": [0, 0, 0.0], "in": [0, 0, 0.0]}
                pool.jobs, pool.exposed, pool.job_seconds, pool.steps, pool.step_seconds = 0, 0.0, 0.0, 0, 0.0
            t0 = time.perf_counter()
        pos = torch.full((b, 1), prompt + k, dtype=torch.long)
        for u in range(inflight):
            pool.decode(leases[u], xs[u], pos, None)
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "tokens": b * inflight * rounds, "tok_per_s": b * inflight * rounds / seconds,
           "step_ms": seconds / (rounds * inflight) * 1e3, "kv_pool": pool.report()}
    for u in range(inflight):
        pool.release(u)
    if isinstance(pool, SwappingPool):
        pool.close()
    return out


def run_config(a, stage, device, b: int, positions: int) -> dict:
    graphs = device.type == "cuda" and not a.no_graphs
    inflight = a.inflight
    row: dict = {"b": b, "positions": positions, "inflight": inflight}
    # Without swapping: a buffer of b per microbatch in flight.
    base = CachePool(stage, b, cuda_graphs=graphs, round_to=16, options=KVPoolOptions(inflight=inflight))
    row["no_swap"] = steady_state(stage, base, b, positions, inflight, a.rounds, a.warm, device)
    buffer = stage.cache_shape(b, positions).numel() * torch.empty((), dtype=stage.dtype).element_size()
    row["buffer_bytes_b"] = buffer
    row["budget_bytes"] = inflight * buffer
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for name, bb in (("swap_2b", 2 * b), ("swap_b", b)):
        opts = KVPoolOptions(swapping=True, resident=2, inflight=inflight, max_seq=positions)
        pool = SwappingPool(stage, bb, cuda_graphs=graphs, round_to=16, options=opts, stats=StreamStats())
        pool.plan(positions)
        res = steady_state(stage, pool, bb, positions, inflight, a.rounds, a.warm, device)
        ceil = copy_ceiling(res["kv_pool"]["buffer_bytes"], device)
        p = res["kv_pool"]
        res["ceiling"] = ceil
        res["out_of_ceiling"] = (p["swap_out_GBps"] or 0) / ceil["d2h_GBps"]
        res["in_of_ceiling"] = (p["swap_in_GBps"] or 0) / ceil["h2d_GBps"]
        row[name] = res
        del pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["gain_2b"] = row["swap_2b"]["tok_per_s"] / row["no_swap"]["tok_per_s"]
    return row


def table(rows: list[dict]) -> str:
    head = ["b x pos", "buf MB", "tok/s no swap", "tok/s swap 2b", "gain", "step ms (b)", "step ms (2b)",
            "out GB/s (ceil)", "in GB/s (ceil)", "hidden", "swap/step", "tok/s swap b"]
    lines = []
    for r in rows:
        s, s1, n = r["swap_2b"], r["swap_b"], r["no_swap"]
        p = s["kv_pool"]
        lines.append([
            f"{r['b']}x{r['positions']}", f"{p['buffer_bytes'] / 1e6:.1f}", f"{n['tok_per_s']:.0f}",
            f"{s['tok_per_s']:.0f}", f"{r['gain_2b']:.2f}x", f"{n['step_ms']:.3f}", f"{s['step_ms']:.3f}",
            f"{p['swap_out_GBps'] or 0:.1f} ({s['out_of_ceiling']:.0%})",
            f"{p['swap_in_GBps'] or 0:.1f} ({s['in_of_ceiling']:.0%})",
            f"{p['hidden_share'] or 0:.0%}", f"{p['swap_to_step'] or 0:.2f}", f"{s1['tok_per_s']:.0f}"])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model whose stage is measured")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages the model is split into (one measured)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--configs", default=None, help="microbatch x positions, comma-separated (e.g. 8x512,32x1024)")
    p.add_argument("--inflight", type=int, default=4, help="microbatches in flight (one per stage in a pipeline)")
    p.add_argument("--rounds", type=int, default=8, help="timed decode rounds (a step per microbatch each)")
    p.add_argument("--warm", type=int, default=2)
    p.add_argument("--no-graphs", action="store_true", help="eager decode steps on a GPU")
    p.add_argument("--out", default="results/bench/swapping.json")
    a = p.parse_args(argv)
    defaults = GPU if a.device.startswith("cuda") else CPU
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # "cuda" alone names no card for set_device
        torch.cuda.set_device(device)
    torch.set_grad_enabled(False)
    stage = build_stage(a, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for c in a.configs.split(","):
        b, pos = (int(v) for v in c.lower().split("x"))
        rows.append(run_config(a, stage, device, b, pos))
        print(f"  {c}: done", flush=True)
    result = {"device": name, "shape": a.shape, "layers": stage.num_layers, "stages": a.stages, "dtype": a.dtype,
              "inflight": a.inflight, "rounds": a.rounds, "cuda_graphs": device.type == "cuda" and not a.no_graphs,
              "rows": rows}
    print(f"\nmicrobatch swapping, one stage: {a.shape} layers [{stage.first}, {stage.last}) ({a.dtype}) on {name}, "
          f"{a.inflight} microbatches in flight; no swap: {a.inflight} buffers of b; swap 2b: 2 resident buffers of 2b "
          f"(the same KV bytes); ceil = a contiguous pinned copy of one buffer, same run")
    print(table(rows))
    write_json(a.out, result)
    print(f"\n{a.out}")
    return result


if __name__ == "__main__":
    main()
