"""The paper's two streaming microbenchmarks, on whatever device this runs on.

(1) The optimization ladder: time to stream one token step's KV slice, and a whole prompt's cache, from
    the device to (pinned) host memory with ``naive`` (one copy per layer and k/v), ``buffered``
    (gathered on the device, one copy) and ``layerwise`` (one gathered copy per layer, issued while the
    next layers compute), beside the raw contiguous copy of the same number of bytes measured in the
    same run (the ceiling). For the layerwise rung what matters is the time it adds to the compute it
    overlaps, so the table also shows compute alone and the exposed time of streaming after vs during it.
    A last row times ``replicate_step`` (the real per-step path: every slot at its own position).
(2) End-to-end generation time of ``dejavu.engine.Engine`` with streaming off vs on (on: as a token
    stage replicates, the prompt's cache copied to host memory one layer per decode step, and every
    token step's slice after its step), i.e. the overhead DéjàVu's replication costs (paper: ~2%).

    python bench/streaming.py --device cuda                 # default shape: 24 layers, batch 8, 32 x 64
    python bench/streaming.py --device cpu                  # tiny shape, smoke test

Prints a table and writes every number as JSON (--out, default results/bench/streaming.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu.engine import Engine, build_stages  # noqa: E402
from dejavu.model.config import ModelConfig, parse_dtype  # noqa: E402
from dejavu.model.weights import StateDictSource  # noqa: E402
from dejavu.sampling import SamplingParams  # noqa: E402
from dejavu.streaming import (LADDER, LayerwiseStreamer, LocalTransport, Partition, StagingPool,  # noqa: E402
                              StreamOptions, StreamStats, make_plan, replicate_box, replicate_step, stream_out)

GPU_DEFAULTS = dict(layers=24, batch=8, heads=32, head_dim=64, prompt_len=512, new_tokens=64, dtype="bf16")
CPU_DEFAULTS = dict(layers=4, batch=2, heads=4, head_dim=16, prompt_len=32, new_tokens=8, dtype="fp32")


# ---- a random Llama-shaped model of the requested size ------------------------------------------------
def model_config(a) -> ModelConfig:
    hidden = a.heads * a.head_dim
    return ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=a.vocab, hidden_size=hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, head_dim=a.head_dim,
        intermediate_size=4 * hidden, max_position_embeddings=a.prompt_len + a.new_tokens + 64,
        attention_bias=False, tie_word_embeddings=False))


def random_weights(cfg: ModelConfig, device, dtype) -> StateDictSource:
    g = torch.Generator(device=device).manual_seed(0)
    h, q, kv, ff = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size

    def w(*shape):
        return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    t = {"model.embed_tokens.weight": w(cfg.vocab_size, h), "lm_head.weight": w(cfg.vocab_size, h),
         "model.norm.weight": torch.ones(h, device=device, dtype=dtype)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
                  p + "post_attention_layernorm.weight": torch.ones(h, device=device, dtype=dtype),
                  p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                  p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                  p + "mlp.gate_proj.weight": w(ff, h), p + "mlp.up_proj.weight": w(ff, h),
                  p + "mlp.down_proj.weight": w(h, ff)})
    return StateDictSource(t, "random weights")


# ---- timing -----------------------------------------------------------------------------------------
def timed(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median wall seconds of ``fn()``, the device drained before and after each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- (1) the ladder ---------------------------------------------------------------------------------
def ladder(a, stage, device, dtype) -> list[dict]:
    B, P = a.batch, a.prompt_len
    max_seq = P + a.new_tokens
    kv = stage.new_cache(B, max_seq)
    part = Partition((0, a.layers), (0, a.heads), (0, B))
    transport, pool = LocalTransport(), StagingPool(device)
    on_gpu = device.type == "cuda"

    tokens = torch.randint(0, a.vocab, (B, P), device=device)
    prompt_pos = torch.arange(P).expand(B, -1)
    last = torch.full((B,), P - 1, dtype=torch.long)
    step_x = torch.randint(0, a.vocab, (B, 1), device=device)
    step_pos = torch.full((B, 1), P, dtype=torch.long)
    zeros = torch.zeros(B, dtype=torch.long)

    def prefill(cb=None):
        stage(tokens, prompt_pos, kv, last, on_layer_done=cb)

    def decode(cb=None):
        stage(step_x, step_pos, kv, zeros, on_layer_done=cb)

    # The prompt stage's own cache holds only the prompt (it never decodes), so each of its layers is
    # one contiguous block; a token stage's cache has room for P + N positions, so there the prompt's
    # rows are strided and must be gathered.
    pkv = stage.new_cache(B, P)

    def prefill_prompt_stage(cb=None):
        stage(tokens, prompt_pos, pkv, last, on_layer_done=cb)

    prefill()  # real contents in the caches
    prefill_prompt_stage()
    decode()
    rows = []
    for what, cache, positions, compute in (
            ("token step slice", kv, (P, P + 1), decode),
            ("prompt cache (prompt stage, P rows)", pkv, (0, P), prefill_prompt_stage),
            ("prompt cache (in a P+N cache)", kv, (0, P), prefill)):
        plan = make_plan([part], [part], positions)
        nbytes = plan.chunks[0].box.count() * a.head_dim * dtype.itemsize
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=on_gpu)
        row = {"what": what, "bytes": nbytes,
               "raw_s": timed(lambda: dst.copy_(src, non_blocking=True), device, a.iters)}
        del src, dst

        def out(mode):
            return lambda: stream_out(cache.data, plan, 0, transport, prefix=f"{what}/{mode}",
                                      options=StreamOptions.named(mode), staging=pool).wait()

        for mode in LADDER:
            row[f"{mode}_s"] = timed(out(mode), device, a.iters)

        def during():
            s = LayerwiseStreamer(cache.data, plan, 0, transport, prefix=f"{what}/overlap",
                                  options=StreamOptions.named("layerwise"), staging=pool)
            compute(s.on_layer_done)
            s.finish()

        row["compute_s"] = timed(compute, device, a.iters)
        row["buffered_after_compute_s"] = timed(lambda: (compute(), out("buffered")()), device, a.iters)
        row["layerwise_during_compute_s"] = timed(during, device, a.iters)
        row["buffered_exposed_s"] = row["buffered_after_compute_s"] - row["compute_s"]
        row["layerwise_exposed_s"] = row["layerwise_during_compute_s"] - row["compute_s"]
        for k in ("raw", *LADDER):
            row[f"{k}_GBps"] = nbytes / row[f"{k}_s"] / 1e9
        rows.append(row)

    # The per-step replication path: each slot at its own position (right-padded prompts).
    positions = [P - i % 3 for i in range(B)]
    step_bytes = B * a.layers * 2 * a.heads * a.head_dim * dtype.itemsize

    def rep():
        replicate_step(kv.data, part, range(B), positions, transport, key="rep/step").wait()

    src = torch.empty(step_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty(step_bytes, dtype=torch.uint8, pin_memory=on_gpu)
    rows.append({"what": "replicate_step (per-slot positions)", "bytes": step_bytes,
                 "raw_s": timed(lambda: dst.copy_(src, non_blocking=True), device, a.iters),
                 "buffered_s": timed(rep, device, a.iters)})
    return rows


# ---- (2) end to end ---------------------------------------------------------------------------------
class StreamingEngine(Engine):
    """The engine with DéjàVu's replication on, as a token stage runs it: after the prefill each stage's
    prompt cache is replicated to host memory (one gathered copy, on the side stream, overlapping the
    first decode steps), and every decode step's new KV slice follows it."""

    def __init__(self, stages, transport: LocalTransport, stats: StreamStats, **kw) -> None:
        super().__init__(stages, **kw)
        self.transport, self.stats = transport, stats
        self._lengths: list[int] = []
        self._steps = 0
        self._pending: list = []
        self._prompt_layers: list = []

    def _parts(self, batch: int):
        return [Partition((s.first, s.last), (0, s.cache_shape(batch, 1).kv_heads), (0, batch)) for s in self.stages]

    def prefill(self, prompts, slab):
        logits = super().prefill(prompts, slab)
        self._lengths, self._steps = [len(p) for p in prompts], 0
        batch, longest = len(prompts), max(self._lengths)
        # The prompt's replica goes one layer per decode step: one big copy would hold the device->host
        # copy engine for ~15 ms, and every step's token read-back would queue behind it.
        self._prompt_layers = [(cache, part, layer_box, f"rep/s{i}/prompt/{layer_box.name()}")
                               for i, (cache, part) in enumerate(zip(slab.caches, self._parts(batch)))
                               for layer_box in part.box((0, longest)).split_layers()]
        return logits

    def _replicate_prompt_layer(self) -> None:
        cache, part, box, key = self._prompt_layers.pop(0)
        self._pending.append(replicate_box(cache.data, part, box, self.transport, key=key, stats=self.stats))

    def _decode(self, slab, x, positions):
        logits = super()._decode(slab, x, positions)
        batch = len(self._lengths)
        host_positions = [n + self._steps for n in self._lengths]
        if len(self._pending) > 4 * len(self.stages):  # a bounded number of copies in flight
            for h in self._pending[: len(self.stages)]:
                h.wait()
            del self._pending[: len(self.stages)]
        for i, (cache, part) in enumerate(zip(slab.caches, self._parts(batch))):
            self._pending.append(replicate_step(cache.data, part, range(batch), host_positions, self.transport,
                                                key=f"rep/s{i}/t{self._steps}", stats=self.stats))
        if self._prompt_layers:
            self._replicate_prompt_layer()
        self._steps += 1
        return logits

    def generate(self, prompts, params):
        out = super().generate(prompts, params)
        while self._prompt_layers:
            self._replicate_prompt_layer()
        for h in self._pending:
            h.wait()
        self._pending = []
        self.transport.drop("")  # the next run reuses the pinned buffers
        return out


def end_to_end(a, stages, device) -> dict:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, a.vocab, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    params = SamplingParams(max_new_tokens=a.new_tokens)
    stats = StreamStats()
    off = Engine(stages)
    on = StreamingEngine(stages, LocalTransport(), stats)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {"off": [], "on": []}
    outputs = {}
    for r in range(a.e2e_repeats + 1):  # the first round warms up (graphs, pinned buffers)
        for name, engine in (("off", off), ("on", on)) if r % 2 else (("on", on), ("off", off)):
            sync()
            t0 = time.perf_counter()
            outputs[name] = [gen.output_ids for gen in engine.generate(prompts, params)]
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"off_s": t_off, "on_s": t_on, "overhead": t_on / t_off - 1, "runs": times,
            "same_tokens": outputs["on"] == outputs["off"], "stream_stats": stats.as_dict()}


# ---- report -----------------------------------------------------------------------------------------
def us(x: float) -> str:
    return f"{x * 1e6:10.1f}"


def table(rows: list[dict], e2e: dict | None) -> str:
    lines = [f"{'what':38s} {'bytes':>11s} {'raw us':>10s} {'naive us':>10s} {'buffered':>10s} {'layerwise':>10s}"
             f" {'compute':>10s} {'exp.buf':>10s} {'exp.lw':>10s}"]
    for r in rows:
        cells = [us(r[k]) if k in r else f"{'-':>10s}" for k in
                 ("raw_s", "naive_s", "buffered_s", "layerwise_s", "compute_s", "buffered_exposed_s", "layerwise_exposed_s")]
        lines.append(f"{r['what']:38s} {r['bytes']:11d} " + " ".join(cells))
    lines.append("(us = microseconds; exp.buf / exp.lw: time added to the compute by streaming after it / during it)")
    for r in rows:
        if "naive_GBps" in r:
            lines.append(f"  {r['what']}: GB/s raw {r['raw_GBps']:.1f}, naive {r['naive_GBps']:.1f}, "
                         f"buffered {r['buffered_GBps']:.1f}, layerwise {r['layerwise_GBps']:.1f}")
    if e2e:
        lines.append(f"end to end: streaming off {e2e['off_s']:.3f} s, on {e2e['on_s']:.3f} s, overhead "
                     f"{100 * e2e['overhead']:+.2f}% (same tokens: {e2e['same_tokens']})")
    return "\n".join(lines)


def targets(rows: list[dict], e2e: dict | None) -> dict:
    slice_, prompt = rows[0], rows[1]  # the prompt stage's cache: what a handover ships
    t = {"token_slice_buffered_over_raw": slice_["buffered_s"] / slice_["raw_s"],
         "token_slice_buffered_within_2x_raw": slice_["buffered_s"] <= 2 * slice_["raw_s"],
         "prompt_buffered_fraction_of_raw_bandwidth": prompt["buffered_GBps"] / prompt["raw_GBps"],
         "prompt_buffered_at_least_80pct": prompt["buffered_GBps"] >= 0.8 * prompt["raw_GBps"]}
    if e2e:
        t["e2e_overhead_within_2pct"] = e2e["overhead"] <= 0.02
    return t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k in ("layers", "batch", "heads", "head_dim", "prompt_len", "new_tokens"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    ap.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--iters", type=int, default=None, help="timed repetitions per measurement (median)")
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", default="results/bench/streaming.json")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but this machine has no CUDA device")
    for k, v in (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.iters = a.iters or (50 if device.type == "cuda" else 5)
    dtype = parse_dtype(a.dtype)

    cfg = model_config(a)
    stages = build_stages(cfg, random_weights(cfg, device, dtype), 1, dtype=dtype, device=device)
    rows = ladder(a, stages[0], device, dtype)
    e2e = None if a.skip_e2e else end_to_end(a, stages, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {k: getattr(a, k) for k in ("layers", "batch", "heads", "head_dim", "prompt_len", "new_tokens",
                                             "dtype", "vocab")},
        "ladder": rows, "end_to_end": e2e, "targets": targets(rows, e2e),
    }
    print(table(rows, e2e))
    print("targets:", json.dumps(result["targets"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
