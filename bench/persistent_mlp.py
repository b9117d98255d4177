"""Probe: does one persistent kernel per MLP (fc_in, grid barrier, fc_out) beat two kernels under PDL?

The decode step loses ~2.6 us per matmul kernel beyond its bytes (bench/NOTES-perf.md). A persistent
kernel with one program per SM runs both projections of the OPT MLP with a grid-wide barrier between
them; with ``PRELOAD`` each program loads its first fc_out weight tile before it waits at the barrier, so
its share of the weight stream goes on while the slowest program finishes fc_in. Timed side by side with
the engine's two kernels (``skinny_mm`` with bias+ReLU, then split-K ``skinny_mm_split``) in CUDA graphs
over enough weight copies that L2 cannot hold them. GPU only (the barrier needs every program resident).

    python bench/persistent_mlp.py --out results/persistent-mlp.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dejavu.model import fused, kernel_tuning  # noqa: E402
from decode_kernels import graph_time_us  # noqa: E402
from report import write_json  # noqa: E402


@triton.jit
def _grid_barrier(ARRIVED, GEN, NPROG: tl.constexpr):
    # Sense by generation: the last program to arrive resets the count and bumps GEN; the others spin on
    # GEN. Reusable across launches and graph replays with no host reset.
    tl.debug_barrier()  # every thread's stores issued before this program arrives
    gen = tl.atomic_add(GEN, 0, sem="acquire")
    arrived = tl.atomic_add(ARRIVED, 1, sem="acq_rel")
    if arrived == NPROG - 1:
        tl.atomic_xchg(ARRIVED, 0, sem="relaxed")
        tl.atomic_add(GEN, 1, sem="release")
    else:
        while tl.atomic_add(GEN, 0, sem="acquire") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _mlp_kernel(X, W1, B1, H, W2, Y, ARRIVED, GEN, M, N1, K1, N2, ROWS1, ROWS2,
                BLOCK_M: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, BN2: tl.constexpr,
                BK2: tl.constexpr, NPROG: tl.constexpr, PRELOAD: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.arange(0, BLOCK_M)
    mm = m < M
    # fc_in: rows [pid * ROWS1, (pid + 1) * ROWS1) of W1, h = relu(x W1^T + b1)
    n = pid * ROWS1 + tl.arange(0, BN1)
    nm = (n < pid * ROWS1 + ROWS1) & (n < N1)
    acc = tl.zeros([BLOCK_M, BN1], dtype=tl.float32)
    for k0 in range(0, K1, BK1):
        k = k0 + tl.arange(0, BK1)
        x = tl.load(X + m[:, None] * K1 + k[None, :], mask=mm[:, None], other=0.0)
        w = tl.load(W1 + n[:, None] * K1 + k[None, :], mask=nm[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    acc = tl.maximum(acc + tl.load(B1 + n, mask=nm, other=0.0).to(tl.float32)[None, :], 0.0)
    tl.store(H + m[:, None] * N1 + n[None, :], acc.to(H.dtype.element_ty), mask=mm[:, None] & nm[None, :])
    # fc_out: rows [pid * ROWS2, ...) of W2 over all of h
    n2 = pid * ROWS2 + tl.arange(0, BN2)
    nm2 = (n2 < pid * ROWS2 + ROWS2) & (n2 < N2)
    k = tl.arange(0, BK2)
    if PRELOAD:  # W2 does not depend on h: start this program's stream before the barrier
        w_first = tl.load(W2 + n2[:, None] * N1 + k[None, :], mask=nm2[:, None], other=0.0)
    _grid_barrier(ARRIVED, GEN, NPROG)
    acc2 = tl.zeros([BLOCK_M, BN2], dtype=tl.float32)
    if PRELOAD:
        h = tl.load(H + m[:, None] * N1 + k[None, :], mask=mm[:, None], other=0.0, cache_modifier=".cg")
        acc2 += tl.dot(h, tl.trans(w_first))
    for k0 in range(PRELOAD * BK2, N1, BK2):
        k = k0 + tl.arange(0, BK2)
        h = tl.load(H + m[:, None] * N1 + k[None, :], mask=mm[:, None], other=0.0, cache_modifier=".cg")
        w = tl.load(W2 + n2[:, None] * N1 + k[None, :], mask=nm2[:, None], other=0.0)
        acc2 += tl.dot(h, tl.trans(w))
    tl.store(Y + m[:, None] * N2 + n2[None, :], acc2.to(Y.dtype.element_ty), mask=mm[:, None] & nm2[None, :])


# (programs per SM, BN1, BK1, BN2, BK2, num_stages, num_warps). One program per SM, so that every program
# is resident (a program that cannot be scheduled would leave the others spinning at the barrier). Also
# tried on an H100 (2026-11-25), all slower: BK2 1024 with 8 warps, 6 stages with 8 warps, two programs
# per SM (one of those configurations never finished: not every program was resident).
CONFIGS = [(1, 64, 128, 16, 256, 4, 4), (1, 64, 128, 16, 512, 4, 4)]


def persistent_mlp(x, w1, b1, w2, h, sync, preload: int, cfg=CONFIGS[0]) -> torch.Tensor:
    m, k1 = x.shape
    n1, n2 = w1.shape[0], w2.shape[0]
    per_sm, bn1, bk1, bn2, bk2, stages, warps = cfg
    nprog = per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count
    rows1, rows2 = triton.cdiv(n1, nprog), triton.cdiv(n2, nprog)
    assert rows1 <= bn1 and rows2 <= bn2, (rows1, rows2, cfg)
    y = torch.empty(m, n2, dtype=x.dtype, device=x.device)
    _mlp_kernel[(nprog,)](x, w1, b1, h, w2, y, sync[0:], sync[1:], m, n1, k1, n2, rows1, rows2,
                          BLOCK_M=kernel_tuning.bucket(m), BN1=bn1, BK1=bk1, BN2=bn2, BK2=bk2, NPROG=nprog,
                          PRELOAD=preload, num_stages=stages, num_warps=warps)
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    args = ap.parse_args()
    d, f, dt = args.dim, args.ffn, torch.float16
    copies = 8  # 8 x 67 MB: no layer's weights are still in L2
    w1s = [torch.randn(f, d, dtype=dt, device="cuda") / d**0.5 for _ in range(copies)]
    w2s = [torch.randn(d, f, dtype=dt, device="cuda") / f**0.5 for _ in range(copies)]
    b1 = torch.randn(f, dtype=dt, device="cuda") * 0.1
    sync = torch.zeros(2, dtype=torch.int32, device="cuda")
    rows, mbytes = [], 2 * d * f * 2 / 2**20
    for m in (1, 8, 32):
        x = torch.randn(m, d, dtype=dt, device="cuda")
        h = torch.empty(m, f, dtype=dt, device="cuda")
        ref = F.linear(F.relu(F.linear(x, w1s[0], b1)), w2s[0])
        split = kernel_tuning.tuning().split[(kernel_tuning.bucket(m), d, f)]
        two = lambda i: fused.skinny_mm_split(fused.skinny_mm(x, w1s[i % copies], b1, 1), w2s[i % copies], split)  # noqa: E731
        assert ((two(0).resolve().float() - ref.float()).norm() / ref.float().norm()) < 4e-3
        row = {"m": m, "mbytes": mbytes, "two_kernels_us": graph_time_us(two, 24)}
        print(f"m={m:2d}: two kernels {row['two_kernels_us']:6.1f} us "
              f"({mbytes * 2**20 / row['two_kernels_us'] / 1e6:.2f} TB/s), floor at 3 TB/s {mbytes * 2**20 / 3e6:.1f} us")
        for cfg in CONFIGS:
            for preload in (0, 1):
                one = lambda i: persistent_mlp(x, w1s[i % copies], b1, w2s[i % copies], h, sync, preload, cfg)  # noqa: E731
                err = ((one(0).float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 4e-3, (m, preload, err)
                row[f"persistent {cfg} preload={preload}"] = us = graph_time_us(one, 24)
                print(f"       persistent {cfg} preload={preload}: {us:6.1f} us", flush=True)
        rows.append(row)
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
