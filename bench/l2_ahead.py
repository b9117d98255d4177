"""Probe: can a weight prefetcher on a concurrent graph branch keep the DRAM busy across the decode
step's kernel boundaries?

Every session since the fourth put the decode gap in the ~2.5 us each dependent kernel costs beyond its
bytes: the boundary, the ramp of its first DRAM loads after its PDL wait, its tail. Loads or prefetches
issued from inside the dependent chain were measured as slower (they gate the successor, NOTES-perf.md
eleventh session). This probe moves them out of the chain: one persistent kernel, launched on a side
stream of the same CUDA graph, walks the step's weights in the order the matmuls read them and pulls
them into L2 a window ahead of the matmul that is running. Each matmul's first program publishes how far
the chain is (the end of its weight in the stream) after its PDL wait; the prefetcher only fetches bytes
past that point and less than ``window`` beyond it, so that what it fetches is still in L2 when read.

The chain is an OPT-1.3B decode layer at batch 1 with the engine's kernels (add+norm, QKV, decode
attention over 544 positions, split-K out-projection, add+norm, fc_in, split-K fc_out), over enough
layer copies that L2 cannot hold them, as in a real step. Printed: us per layer without the prefetcher and
with it, for each fetch form / window / program count, and the floor (the layer's bytes at the copy rate
measured in the same run).

    python bench/l2_ahead.py --out results/l2-ahead.json
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
    """``copies`` OPT-1.3B decode layers at batch 1 with the engine's kernels; ``run(flag)`` is one pass
    over all of them (each matmul publishing the end of its weight in the stream when ``flag`` is given)."""

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
        order = [w for layer in self.layers for w in (layer["qkv"], layer["out"], layer["fc_in"], layer["fc_out"])]
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
        self.layer_bytes = sum(sizes) / copies + sum(layer["cache"][:, :, :, :545].numel() * 2
                                                    for layer in self.layers) / copies

    def run(self, flag: torch.Tensor | None) -> None:
        pub = lambda i: (flag, self.ends[i]) if flag is not None else None  # noqa: E731
        x, delta = self.x, None
        for li, w in enumerate(self.layers):
            x, h = fused.add_norm(x, delta, None, self.norm)
            qkv = fused.skinny_mm(h, w["qkv"], w["qkv_b"], progress=pub(4 * li))
            q = qkv[:, :2048].view(self.batch, self.heads, 64)
            o = fused.decode_attention(q, w["cache"][0], w["cache"][1], self.pos)
            part = fused.skinny_mm_split(o.reshape(self.batch, -1), w["out"],
                                         fused.split_config(h, w["out"]) or (4, 32, 128, 4, 4),
                                         progress=pub(4 * li + 1))
            x, h = fused.add_norm(x, part, None, self.norm)
            a = fused.skinny_mm(h, w["fc_in"], w["fc_in_b"], act=1, progress=pub(4 * li + 2))
            delta = fused.skinny_mm_split(a, w["fc_out"], fused.split_config(a, w["fc_out"]) or (4, 32, 128, 4, 4),
                                          progress=pub(4 * li + 3))


def time_chain(model: OptLayers, ahead: dict | None, reps: int = 2) -> float:
    """us per layer of ``reps`` passes over the layers, each captured with the prefetcher beside it."""
    flag = torch.zeros(1, dtype=torch.int64, device="cuda")
    sink = torch.zeros(1 << 20, dtype=torch.int32, device="cuda")
    spins = torch.zeros(1024, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()

    def step():
        if ahead is not None:
            flag.zero_()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                programs, share = ahead["programs"], ahead["share"]
                _ahead_kernel[(programs,)](
                    _Ptr(model.base), flag, model.seg_off, model.seg_bytes, model.seg_end, len(model.ends),
                    ahead["window"] << 20, 1 << 20, sink, spins, SHARE=share, MODE=ahead["mode"], num_warps=4)
        model.run(flag if ahead is not None else None)
        if ahead is not None:
            torch.cuda.current_stream().wait_stream(side)

    model.run(flag if ahead is not None else None)  # compiles the chain before anything waits on it
    torch.cuda.synchronize()
    us = graph_time_us(lambda i: step(), reps) / len(model.layers)
    if ahead is not None and int(spins.max()) >= 1 << 20:
        raise RuntimeError("the prefetcher stopped waiting: the chain did not run beside it")
    return us


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
        rows.append({"case": f"l2 reuse: {name}", "us_per_pair": g_us})
        print(f"l2 reuse {name:20s}: {g_us:6.2f} us a pair (8 weight copies in turn)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--copies", type=int, default=6, help="layers in the chain (each 100 MB of weights)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default="0,1,2")
    ap.add_argument("--windows", default="8,16,24", help="MB the prefetcher may run ahead of the chain")
    ap.add_argument("--programs", default="132,264")
    ap.add_argument("--share", type=int, default=32768, help="bytes a program fetches of each chunk")
    ap.add_argument("--dummy", action="store_true", help="also fetch from a decoy buffer (no hits possible)")
    ap.add_argument("--reuse", action="store_true", help="first, the L2 reuse test across programs")
    args = ap.parse_args()
    rows: list = []
    if args.reuse:
        l2_reuse(rows)
    rate = copy_bandwidth(torch.device("cuda")) / 1e12
    for b, dummy in [(int(b), d) for b in args.batches.split(",") for d in ((False, True) if args.dummy else (False,))]:
        if dummy:
            print("decoy buffer:", flush=True)
        model = OptLayers(args.copies, batch=b, dummy=dummy)
        floor = model.layer_bytes / rate / 1e6
        base = time_chain(model, None)
        print(f"b={b}: copy {rate:.2f} TB/s, floor {floor:.1f} us a layer; chain alone {base:.1f} us", flush=True)
        rows.append({"batch": b, "dummy": dummy, "case": "chain alone", "us_per_layer": base, "floor_us": floor,
                     "copy_tbps": rate})
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
                    rows.append({"batch": b, "dummy": dummy, **cfg, "us_per_layer": us, "chain_alone_us": again})
                    print(f"  mode {mode} programs {programs:3d} window {window:2d} MB: {us:6.1f} us a layer "
                          f"({(us / again - 1) * 100:+.1f}% against {again:.1f} alone)", flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
