"""Probe: the batch-1 decode MLP as one persistent CUDA kernel (``persistent_mlp_cuda.cu``, built here
with nvcc through ``torch.utils.cpp_extension``) against the engine's two Triton kernels, side by side in
one process, in CUDA graphs over enough weight copies that L2 cannot hold them. Both are timed with the
residual add+norm that follows them in the step (which sums the Triton path's split-K partials, and
takes the persistent kernel's output as a plain tensor). Also each one's error against PyTorch in fp32,
whether the kernel gives the same bits on every call, and the floor (the MLP's bytes at the device copy
rate measured in the same run). ``--modes 0,1,2,3,4,5`` adds the kernel without its grid-wide wait (1),
without its math (2), without storing h and y (3), and with only fc_in's (4) or fc_out's (5) math, to
place its time; mode 6 is the MLP with each stage handed back to the producer as soon as it is in
registers (tensor cores only). GPU only (Hopper or newer).

Result (H200, bench/NOTES-perf.md): correct and repeatable. The tenth session's form was ~10% slower than the
two kernels. Filled before the wait for the kernel before (``--pdl 1``), with the dot products on tensor
cores (``--tensor 1``) and each stage handed back once in registers (mode 6) it is 3% under them at OPT,
level at Llama. With the add+norm before it folded in (``--fold 1``: every CTA normalises the row itself)
it is 8% under the two kernels + add+norm at OPT (21.7 vs 23.6 us) and 3% at Llama (28.9 vs 29.7): each
dependency folded into a persistent kernel saves ~1.2 us. Too little at batch 1 of two shapes for a
JIT-built CUDA extension in the engine, which does not use it; it measures what a megakernel would win.
The Triton version of the same idea is ``persistent_mlp.py``.

    python bench/persistent_mlp_cuda.py --out results/persistent-mlp-cuda.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dejavu.model import fused, kernel_tuning  # noqa: E402
from dejavu.model.layers import RMSNorm  # noqa: E402
from dejavu.model.config import dtype_name, parse_dtype  # noqa: E402
from decode_kernels import graph_time_us  # noqa: E402
from generate import copy_bandwidth  # noqa: E402
from report import write_json  # noqa: E402

# name: (act, hidden, ffn); act "relu" has a bias on fc_in, "silu_mul" stacks [gate; up] in fc_in.
SHAPES = {"opt-1.3b": ("relu", 2048, 8192), "llama-1b": ("silu_mul", 2048, 8192)}
ACTS = {"relu": 1, "silu_mul": 2}
TILE_BYTES, SMEM_PER_BLOCK = 16384, 227 * 1024


def extension():
    from torch.utils.cpp_extension import load

    src = Path(__file__).resolve().parent / "persistent_mlp_cuda.cu"
    return load(name="dejavu_persistent_mlp", sources=[str(src)], verbose=False,
                extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"])


def max_stages(d: int, f: int, consumers: int) -> int:
    """16 KB ring stages that fit beside x, h and a CTA's fc_in biases, in whole rounds of the consumer
    warps (the kernel says why)."""
    fit = min(12, (SMEM_PER_BLOCK - 2 * (d + f) - 4 * 128) // TILE_BYTES)
    return fit - fit % consumers


def reference(x, w1, b1, w2, act: str) -> torch.Tensor:
    if act == "relu":
        return F.linear(F.relu(F.linear(x, w1, b1)), w2)
    gate, up = F.linear(x, w1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def two_kernels(x, w1, b1, w2, act: str):
    """What the engine runs without the persistent kernel (``layers.linear`` at batch 1, deferred)."""
    a = fused.skinny_mm(x, w1, b1, ACTS[act])
    config = fused.split_config(a, w2)
    return fused.skinny_mm_split(a, w2, config) if config else fused.skinny_mm(a, w2)


def resolved(y) -> torch.Tensor:
    return y.resolve() if isinstance(y, fused.SplitSum) else y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="opt-1.3b,llama-1b")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--stages", default="8", help="ring depths (multiples of the consumer warps)")
    ap.add_argument("--consumers", default="4", help="consumer warps a CTA (4 or 8)")
    ap.add_argument("--tensor", default="0,1",
                    help="the consumers' dot products on CUDA cores (0) or tensor cores (1)")
    ap.add_argument("--fold", default="0,1", help="the add+norm before the MLP folded into the kernel (1)")
    ap.add_argument("--pdl", default="1", help="launched early, the weight ring filling before the wait (1)")
    ap.add_argument("--modes", default="0,6",
                    help="0 the MLP, 1 without the grid-wide wait, 2 without the math, 3 without storing h and y, "
                         "4 fc_in's math only, 5 fc_out's only, 6 the MLP with each stage handed back once in "
                         "registers (tensor cores)")
    args = ap.parse_args()
    copy_rate = copy_bandwidth(torch.device("cuda"))
    ext = extension()
    sync = torch.zeros(2, dtype=torch.int32, device="cuda")  # the grid wait's counters, zeroed once
    copies = 8  # 8 x 67-100 MB: no copy is still in L2 when its turn comes again
    rows = []
    print(f"copy rate {copy_rate / 1e12:.2f} TB/s; tuning {kernel_tuning.tuning().source}")
    for shape in args.shapes.split(","):
        act, d, f = SHAPES[shape]
        for dt in [parse_dtype(n) for n in args.dtypes.split(",")]:
            n1 = 2 * f if act == "silu_mul" else f
            w1s = [torch.randn(n1, d, dtype=dt, device="cuda") / d**0.5 for _ in range(copies)]
            w2s = [torch.randn(d, f, dtype=dt, device="cuda") / f**0.5 for _ in range(copies)]
            b1 = torch.randn(f, dtype=dt, device="cuda") * 0.1 if act == "relu" else None
            x = torch.randn(1, d, dtype=dt, device="cuda")
            residual = torch.randn(1, d, dtype=dt, device="cuda")
            delta = torch.randn(1, d, dtype=dt, device="cuda")  # the last MLP's output, for the folded norm
            norm = (torch.nn.LayerNorm(d) if act == "relu" else RMSNorm(d, 1e-5)).to("cuda", dt)
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                if act == "relu":
                    norm.bias.uniform_(-0.5, 0.5)
            ref = reference(x.float(), w1s[0].float(), b1.float() if b1 is not None else None, w2s[0].float(), act)
            with torch.no_grad():
                normed = norm.float()((residual + delta).float())  # the residual as stored, then the norm
                norm.to(dt)
            ref_folded = reference(normed, w1s[0].float(), b1.float() if b1 is not None else None,
                                   w2s[0].float(), act)
            norm_args = (norm.weight, getattr(norm, "bias", None), norm.eps)
            nbytes = (w1s[0].numel() + w2s[0].numel()) * dt.itemsize
            row = {"shape": shape, "dtype": dtype_name(dt), "mbytes": nbytes / 2**20,
                   "floor_us": nbytes / copy_rate * 1e6}

            def err(y, ref=ref):
                return ((y.float() - ref).norm() / ref.norm()).item()

            row["two_kernels_err"] = err(resolved(two_kernels(x, w1s[0], b1, w2s[0], act)))
            row["two_kernels_us"] = graph_time_us(lambda i: fused.add_norm(
                residual, two_kernels(x, w1s[i % copies], b1, w2s[i % copies], act), None, norm)[1], 24)
            print(f"{shape} {dtype_name(dt):8s}: floor {row['floor_us']:5.1f} us; two kernels "
                  f"{row['two_kernels_us']:5.1f} us (err {row['two_kernels_err']:.1e})", flush=True)
            for fold, tensor, consumers, stages, pdl, mode in itertools.product(*[
                    [int(n) for n in a.split(",")]
                    for a in (args.fold, args.tensor, args.consumers, args.stages, args.pdl, args.modes)]):
                if stages % consumers or stages > max_stages(d, f, consumers) or (mode == 6 and not tensor):
                    continue  # mode 6 hands back tensor-core fragments; the CUDA-core form has none
                def one(i, stages=stages, mode=mode, consumers=consumers, pdl=pdl, tensor=tensor, fold=fold):
                    folded = (delta, *norm_args) if fold else (None, None, None, 0.0)
                    return ext.persistent_mlp(residual if fold else x, w1s[i % copies], b1, w2s[i % copies],
                                              ACTS[act], sync, stages, mode, consumers, bool(pdl), bool(tensor),
                                              *folded)[0]
                y = one(0)
                e = err(y, ref_folded if fold else ref)
                same = all(torch.equal(one(0), y) for _ in range(3))
                # Both chains hold the add+norm: after the MLP as a kernel, or folded into the next one.
                us = graph_time_us(one if fold else lambda i: fused.add_norm(residual, one(i), None, norm)[1], 24)
                name = (f"{'tc' if tensor else 'fma'}_{consumers}w_{stages}s_pdl{pdl}_mode{mode}"
                        f"{'_fold' if fold else ''}")
                row[f"persistent_{name}"] = {"us": us, "err": e, "repeatable": same}
                print(f"   persistent, {'norm folded, ' if fold else ''}{'tensor' if tensor else 'fma':6s}, "
                      f"{consumers:2d} warps, {stages:2d} stages, pdl {pdl}, mode {mode}: {us:5.1f} us "
                      f"(err {e:.1e}, repeatable {same}) = "
                      f"{row['two_kernels_us'] / us:.2f}x the two kernels, {us / row['floor_us']:.2f}x the floor",
                      flush=True)
            rows.append(row)
            del w1s, w2s
            torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
