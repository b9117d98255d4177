"""Probes of the decode step's dependent chain: where does each kernel's fixed cost go, and can anything
beside the chain take it back? (bench/NOTES-perf.md, thirteenth session)

The chain is an OPT-1.3B decode layer with the engine's kernels (add+norm, QKV, decode attention over 544
positions, split-K out-projection, add+norm, fc_in, split-K fc_out), over enough layer copies that L2
cannot hold them, as in a real step, captured in a CUDA graph.

- ``--parts ahead``: a weight prefetcher on a concurrent graph branch. One persistent kernel on a side
  stream walks the step's weights in the order the matmuls read them and pulls them into L2 a window
  ahead of the matmul that is running; each matmul's first program publishes how far the chain is after
  its PDL wait (``skinny_mm(progress=)``). Nothing in the chain waits for it. Printed: us a layer with and
  without it, per fetch form / window / program count, and the floor (the layer's bytes at the copy rate
  measured in the same run). ``--dummy`` also fetches a decoy buffer (what the fetches cost if nothing hits).
- ``--parts reuse``: how much faster a skinny matmul reads a weight that sits in L2, and whether it matters
  which program (SM) brought it there.
- ``--parts timeline``: every matmul program's timestamps in the chain (``skinny_mm(stamps=)``: start, PDL
  wait returned, end, SM), reduced to where each matmul's time goes: the gap from the previous matmul's
  last program to its first wait return, the spread of the waits, the programs' run times, the tail.

    python bench/decode_chain.py --parts timeline,reuse --out results/decode-chain.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu.model import fused  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernels import graph_time_us  # noqa: E402
from generate import copy_bandwidth  # noqa: E402
from report import write_json  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Loaded with the carveout of the chain's kernels: an SM does not take programs of a kernel with another
# carveout until it drains, so a persistent kernel with its own would hold the whole chain back.
fused._OURS.add("_ahead_kernel")


@triton.jit
def _ahead_kernel(BASE, FLAG, SEG_OFF, SEG_BYTES, SEG_END, n_seg, window, max_spin, SINK, SPINS,
                  SHARE: tl.constexpr, MODE: tl.constexpr):
    # The weights are segments of a byte stream in the order the chain reads them: segment s lies at
    # BASE + SEG_OFF[s] (bytes) and ends at SEG_END[s] in the stream. FLAG holds the stream offset up to
    # which the running matmul reads. Program p fetches bytes [p * SHARE, (p + 1) * SHARE) of each chunk
    # of P * SHARE bytes. MODE 0: loads into registers (L2 evict_last); 1: per-line prefetch.global.L2;
    # 2: one bulk prefetch a share. A program that has waited ``max_spin`` polls in all stops waiting
    # (SPINS[pid] says so): a chain that cannot run beside it must not hang the step.
    pid = tl.program_id(0)
    total = 0
    chunk = tl.num_programs(0) * SHARE
    acc = tl.zeros([SHARE // 32], dtype=tl.int32)
    for s in range(n_seg):
        off = tl.load(SEG_OFF + s)
        nbytes = tl.load(SEG_BYTES + s)
        start = tl.load(SEG_END + s) - nbytes
        for c in range(0, nbytes, chunk):
            at = start + c  # stream offset of this chunk
            cur = tl.load(FLAG, volatile=True)
            spins = 0
            while (at >= cur + window) & (total + spins < max_spin):
                cur = tl.load(FLAG, volatile=True)
                spins += 1
            total += spins
            if at >= cur:  # past the weight the chain is reading now
                lo = c + pid * SHARE
                if MODE == 0:  # one word of every 32-byte sector
                    j = lo + tl.arange(0, SHARE // 32) * 32
                    p = (BASE + off + j).to(tl.pointer_type(tl.int32))
                    acc += tl.load(p, mask=j < nbytes, other=0, eviction_policy="evict_last")
                elif MODE == 1:  # one prefetch a 128-byte line
                    j = lo + tl.arange(0, SHARE // 128) * 128
                    ok = (j < nbytes).to(tl.int32)
                    tl.inline_asm_elementwise(
                        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; "
                        "mov.u32 $0, 0; }",
                        "=r,l,r", [BASE + off + j, ok], dtype=tl.int32, is_pure=False, pack=1)
                else:  # one bulk prefetch of the whole share
                    j = tl.arange(0, 16)
                    size = tl.minimum(nbytes - lo, SHARE).to(tl.int32)
                    ok = ((j == 0) & (size > 0)).to(tl.int32)
                    tl.inline_asm_elementwise(
                        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; "
                        "mov.u32 $0, 0; }",
                        "=r,l,r,r", [BASE + off + lo + j * 0, ok, ok * 0 + tl.maximum(size, 16)],
                        dtype=tl.int32, is_pure=False, pack=1)
    tl.store(SPINS + pid, total)
    if MODE == 0:
        tl.store(SINK + pid * (SHARE // 32) + tl.arange(0, SHARE // 32), acc)


class _Ptr:
    """A raw device address as a Triton pointer argument (the segments' common base)."""

    dtype = torch.uint8

    def __init__(self, address: int) -> None:
        self.address = address

    def data_ptr(self) -> int:
        return self.address


class OptLayers:
    """``copies`` OPT-1.3B decode layers at ``batch`` with the engine's kernels; ``run()`` is one pass over
    all of them. The weight stream's segments (``seg_*``, ``ends``) are the matmuls' weights in the order
    they are read (or decoys of the same sizes)."""

    MATMULS = ("qkv", "out", "fc_in", "fc_out")

    def __init__(self, copies: int, dtype=torch.float16, batch: int = 1, dummy: bool = False) -> None:
        d, ffn, heads, s = 2048, 8192, 32, 576
        dev = "cuda"
        mk = lambda n, k: torch.randn(n, k, dtype=dtype, device=dev) / k ** 0.5  # noqa: E731
        self.layers = [dict(qkv=mk(3 * d, d), qkv_b=torch.zeros(3 * d, dtype=dtype, device=dev),
                            out=mk(d, d), fc_in=mk(ffn, d), fc_in_b=torch.zeros(ffn, dtype=dtype, device=dev),
                            fc_out=mk(d, ffn),
                            cache=torch.randn(2, batch, heads, s, 64, dtype=dtype, device=dev))
                       for _ in range(copies)]
        self.norm = torch.nn.LayerNorm(d).to(dev, dtype)
        self.x = torch.randn(batch, d, dtype=dtype, device=dev)
        self.pos = torch.full((batch, 1), 544, device=dev)
        self.batch, self.heads = batch, heads
        order = [layer[name] for layer in self.layers for name in self.MATMULS]
        if dummy:  # the same bytes from a buffer the chain never reads: what the fetches cost if nothing hits
            self.decoys = [torch.empty_like(w) for w in order]
            order = self.decoys
        self.base = min(w.data_ptr() for w in order)
        sizes = [w.numel() * w.element_size() for w in order]
        ends = torch.tensor(sizes).cumsum(0)
        self.seg_off = torch.tensor([w.data_ptr() - self.base for w in order], dtype=torch.int64, device=dev)
        self.seg_bytes = torch.tensor(sizes, dtype=torch.int64, device=dev)
        self.seg_end = ends.to(dev)
        self.ends = ends.tolist()
        kv = self.layers[0]["cache"]
        self.layer_bytes = sum(sizes) / copies + kv[:, :, :, :545].numel() * kv.element_size()

    def run(self, flag: torch.Tensor | None = None, stamps: torch.Tensor | None = None) -> None:
        """One pass; matmul i publishes to ``flag`` or stores its programs' timestamps in ``stamps[i]``."""
        def pub(i):
            return {"progress": (flag, self.ends[i]) if flag is not None else None,
                    "stamps": stamps[i] if stamps is not None else None}
        def split(inp, weight):  # the engine's split-K tiling, or one that fits every shape here
            return fused.split_config(inp, weight) or (4, 32, 128, 4, 4)

        x, delta = self.x, None
        for li, w in enumerate(self.layers):
            x, h = fused.add_norm(x, delta, None, self.norm)
            qkv = fused.skinny_mm(h, w["qkv"], w["qkv_b"], **pub(4 * li))
            q = qkv[:, :2048].view(self.batch, self.heads, 64)
            o = fused.decode_attention(q, w["cache"][0], w["cache"][1], self.pos)
            o = o.reshape(self.batch, -1)
            part = fused.skinny_mm_split(o, w["out"], split(o, w["out"]), **pub(4 * li + 1))
            x, h = fused.add_norm(x, part, None, self.norm)
            a = fused.skinny_mm(h, w["fc_in"], w["fc_in_b"], act=1, **pub(4 * li + 2))
            delta = fused.skinny_mm_split(a, w["fc_out"], split(a, w["fc_out"]), **pub(4 * li + 3))


def time_chain(model: OptLayers, ahead: dict | None, reps: int = 2) -> float:
    """us per layer of ``reps`` passes over the layers, each captured with the prefetcher beside it."""
    flag = torch.zeros(1, dtype=torch.int64, device="cuda")
    sink = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    spins = torch.zeros(1024, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    publish = flag if ahead is not None else None

    def step():
        if ahead is not None:
            flag.zero_()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                programs, share = ahead["programs"], ahead["share"]
                _ahead_kernel[(programs,)](
                    _Ptr(model.base), flag, model.seg_off, model.seg_bytes, model.seg_end, len(model.ends),
                    ahead["window"] << 20, 1 << 20, sink, spins, SHARE=share, MODE=ahead["mode"], num_warps=4)
        model.run(publish)
        if ahead is not None:
            torch.cuda.current_stream().wait_stream(side)

    model.run(publish)  # compiles the chain before anything waits on it
    torch.cuda.synchronize()
    us = graph_time_us(lambda i: step(), reps) / len(model.layers)
    if ahead is not None and int(spins.max()) >= 1 << 20:
        raise RuntimeError("the prefetcher stopped waiting: the chain did not run beside it")
    return us


def timeline(rows: list, batch: int, copies: int) -> None:
    """Where each matmul's time goes in the chain, from its programs' timestamps (the last of the graph's
    replays; layer 0 left out, its predecessor is not a layer's). Per matmul, means over the layers, us:
    ``gap``: the previous matmul's last program end -> this one's first wait return (for fc_out, right
    after fc_in, the dependent boundary alone; else it holds the light kernels between); ``waits``: first to
    last wait return; ``run``: median and max of a program's wait-to-end; ``tail``: last end minus the
    median end; ``span``: first wait to last end, and the weight's bytes over it."""
    model = OptLayers(copies, batch=batch)
    stamps = torch.zeros(4 * copies, 4096, dtype=torch.int64, device="cuda")
    graph_time_us(lambda i: model.run(stamps=stamps), 2)
    t = stamps.view(4 * copies, -1, 4).cpu()
    used = [int((t[i, :, 2] > 0).sum()) for i in range(4 * copies)]
    stamp_values = torch.unique(t[:, :, 1:3][t[:, :, 1:3] > 0])
    step = int(stamp_values.diff().min()) if stamp_values.numel() > 1 else 0
    print(f"timeline b={batch}: globaltimer's smallest step {step} ns; programs a matmul "
          f"{dict(zip(OptLayers.MATMULS, used[:4]))}", flush=True)
    for j, name in enumerate(OptLayers.MATMULS):
        acc = []
        for li in range(1, copies):
            i = 4 * li + j
            start, wait, end = (t[i, :used[i], c].double() / 1e3 for c in range(3))
            prev_end = t[i - 1, :used[i - 1], 2].double().max() / 1e3
            run = end - wait
            span = float(end.max() - wait.min())
            acc.append([float(wait.min() - prev_end), float(wait.max() - wait.min()), float(run.median()),
                        float(run.max()), float(end.max() - end.median()), span,
                        float(wait.min() - start.min())])
        m = torch.tensor(acc).mean(0).tolist()
        weight = model.layers[0][name]
        nbytes = weight.numel() * weight.element_size()
        row = {"part": "timeline", "batch": batch, "matmul": name, "gap_us": m[0], "waits_us": m[1],
               "run_median_us": m[2], "run_max_us": m[3], "tail_us": m[4], "span_us": m[5],
               "resident_before_wait_us": m[6], "span_TBps": nbytes / m[5] / 1e6, "timer_step_ns": step}
        rows.append(row)
        print(f"  {name:7s} gap {m[0]:5.2f}  waits {m[1]:5.2f}  run {m[2]:5.2f} / max {m[3]:5.2f}  tail {m[4]:5.2f}"
              f"  span {m[5]:5.2f} us ({row['span_TBps']:.2f} TB/s)  resident {m[6]:5.2f} us before the wait",
              flush=True)


def l2_reuse(rows: list) -> None:
    """Is a weight line that one program pulled into L2 a hit for another program (on another SM)? The
    OPT fc_in matmul over half its rows, twice in a row, in a graph: the second call on the same rows
    (program i reads what program i read) or shifted by one program's rows (program i reads what
    program i + 1 read, most likely on another SM and maybe in the other L2 partition), against the
    same pair on two different halves (cold)."""
    w = torch.randn(8192 + 256, 2048, dtype=torch.float16, device="cuda") / 45
    copies = [torch.randn_like(w) for _ in range(7)]
    x = torch.randn(1, 2048, dtype=torch.float16, device="cuda")
    bn = fused._skinny_config(1, 4096, 2048)[0]
    cases = {"same rows": lambda v: (v[:4096], v[:4096]),
             "shifted one program": lambda v: (v[:4096], v[bn:4096 + bn]),
             "shifted 64 programs": lambda v: (v[:4096], v[64 * bn:4096 + 64 * bn]),
             "other half (cold)": lambda v: (v[:4096], v[4096:8192])}
    for name, pick in cases.items():
        def pair(i, pick=pick):
            a, b = pick(([w] + copies)[i % 8])
            fused.skinny_mm(x, a)
            fused.skinny_mm(x, b)
        g_us = graph_time_us(pair, 32)
        rows.append({"part": "reuse", "case": name, "us_per_pair": g_us})
        print(f"l2 reuse {name:20s}: {g_us:6.2f} us a pair (8 weight copies in turn)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="ahead", help="comma list of: ahead, reuse, timeline")
    ap.add_argument("--copies", type=int, default=6, help="layers in the chain (each 100 MB of weights)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default="0,1,2", help="ahead: 0 loads, 1 per-line prefetch, 2 bulk prefetch")
    ap.add_argument("--windows", default="8,16,24", help="ahead: MB the prefetcher may run ahead of the chain")
    ap.add_argument("--programs", default="132,264", help="ahead: programs of the prefetcher")
    ap.add_argument("--share", type=int, default=32768, help="ahead: bytes a program fetches of each chunk")
    ap.add_argument("--dummy", action="store_true", help="ahead: also fetch from a decoy buffer (no hits possible)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    rows: list = []
    if "reuse" in parts:
        l2_reuse(rows)
    if "timeline" in parts:
        for b in batches:
            timeline(rows, b, args.copies)
    if "ahead" in parts:
        ahead_sweep(rows, args, batches)
    if args.out:
        write_json(args.out, rows)
    return 0


def ahead_sweep(rows: list, args, batches: list) -> None:
    rate = copy_bandwidth(torch.device("cuda")) / 1e12
    for b, dummy in [(b, d) for b in batches for d in ((False, True) if args.dummy else (False,))]:
        if dummy:
            print("decoy buffer:", flush=True)
        model = OptLayers(args.copies, batch=b, dummy=dummy)
        floor = model.layer_bytes / rate / 1e6
        base = time_chain(model, None)
        print(f"b={b}: copy {rate:.2f} TB/s, floor {floor:.1f} us a layer; chain alone {base:.1f} us", flush=True)
        rows.append({"part": "ahead", "batch": b, "dummy": dummy, "case": "chain alone", "us_per_layer": base,
                     "floor_us": floor, "copy_tbps": rate})
        for mode in map(int, args.modes.split(",")):
            for programs in map(int, args.programs.split(",")):
                for window in map(int, args.windows.split(",")):
                    cfg = {"mode": mode, "programs": programs, "window": window, "share": args.share}
                    try:
                        us = time_chain(model, cfg)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {cfg}: {type(e).__name__}: {e}", flush=True)
                        continue
                    again = time_chain(model, None)
                    rows.append({"part": "ahead", "batch": b, "dummy": dummy, **cfg, "us_per_layer": us,
                                 "chain_alone_us": again})
                    print(f"  mode {mode} programs {programs:3d} window {window:2d} MB: {us:6.1f} us a layer "
                          f"({(us / again - 1) * 100:+.1f}% against {again:.1f} alone)", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
