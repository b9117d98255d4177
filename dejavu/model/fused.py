"""Fused GPU kernels (Triton) for the steps that plain PyTorch runs as many small launches.

A decode step of a 1B model moves ~2.6 GB of weights in about a millisecond, so every extra kernel
launch (2-4 µs each, even inside a CUDA graph) shows. These kernels cut each layer's non-matmul work to
a handful of launches:

- ``add_norm``: residual add (+ the row-split projection's bias) and RMSNorm/LayerNorm, one pass.
- ``rope_write``: RoPE on q and k, and k, v stored into the cache at each token's position, one pass.
- ``decode_attention``: one query per slot over its cached keys 0..pos, split along the keys
  (flash-decoding) so that batch 1 still fills the GPU, reading each KV head once for its whole
  query group; static shapes, so it lives in a CUDA graph. ``decode_attention_new`` also does the new
  token's ``rope_write`` (one kernel a layer fewer in decode).
- ``silu_mul``: SwiGLU's act(gate) * up.

Every kernel rounds where the PyTorch reference rounds (e.g. RMSNorm casts before the weight, RoPE
rounds each product), so fp16/bf16 results follow the reference as closely as the reduction order allows.
The callers fall back to plain PyTorch when Triton is missing or the tensors are on the CPU.
``DEJAVU_TRITON=0`` turns the kernels off (A/B measurements; every switch is in ``switches.py``);
``TRITON_INTERPRET=1`` runs them on the CPU (slowly) for tests.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import dataclass

import torch

from dejavu.model import skinny_tma, switches
from dejavu.model.kernel_tuning import bucket, tuning

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def skinny_enabled(x: torch.Tensor) -> bool:
    """Decode-sized activations (few rows) on the GPU: stream weights with ``skinny_mm``?

    Not in fp32: that is the dtype we check against the reference with, and cuBLAS sums in the same order
    as the reference's own matmuls (skinny_mm flipped a near-tie in 1 of 32 rows of a 64-token run)."""
    rows = x.numel() // x.shape[-1]
    return rows <= SKINNY_MAX_ROWS and x.dtype != torch.float32 and switches.get("DEJAVU_SKINNY") and enabled(x)


def enabled(t: torch.Tensor) -> bool:
    """Use the Triton kernels for tensors like ``t``?"""
    if not HAVE_TRITON or not switches.get("DEJAVU_TRITON"):
        return False
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return t.is_cuda or _INTERPRET


def _pdl_supported() -> bool:
    if not HAVE_TRITON or _INTERPRET:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.is_available() \
            and torch.cuda.get_device_capability()[0] >= 9
    except Exception:
        return False


_PDL_OK = _pdl_supported()


def _pdl_mode() -> str:
    """DEJAVU_PDL: "late" (default), "1", or "0" (off); see ``_pdl``."""
    return switches.get("DEJAVU_PDL") if _PDL_OK else "0"


def _pdl(t: torch.Tensor, matmul: str | None = None) -> dict:
    """Programmatic dependent launch (Hopper): a kernel is launched while its predecessor still runs and
    waits (griddepcontrol.wait) before it reads or writes anything; the weight stream of a matmul and the
    launch latency of every kernel then overlap the previous kernel's tail. Each kernel lets its successor
    launch only after its own wait (else the whole step goes resident at once and spins: 15-20% slower,
    docs/PERFORMANCE.md); with "late", a matmul lets it launch only once its weights are streamed, so the
    waiting successor takes no SM slots from the matmul.

    ``matmul`` names the kind of matmul ("split": split-K, whose successor is a one-program-per-row
    add+norm; "plain": no activation, e.g. the QKV projection; "activation": relu or SwiGLU); kinds
    listed in DEJAVU_PDL_EARLY (comma list, default "split") let their successor launch right after
    their wait even in "late" mode. The add+norm after a split-K projection needs no SM slots worth
    having, so its launch may as well hide behind the projection: 0.1-1.1% faster in all six fp16 cells
    on the H200; "plain" was not (docs/PERFORMANCE.md)."""
    mode = _pdl_mode()
    on = t.is_cuda and mode in ("1", "late")
    early = switches.get("DEJAVU_PDL_EARLY")
    late = mode == "late" and matmul is not None and matmul not in early
    return {"PDL": 2 if late else 1, "launch_pdl": True} if on else {"PDL": 0}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if HAVE_TRITON:

    @triton.jit
    def _add_norm_kernel(X, D, B, W, NB, H_OUT, Y, stride_x, stride_d, stride_h, stride_y, N, eps, stride_part,
                         HAS_D: tl.constexpr, HAS_B: tl.constexpr, HAS_W: tl.constexpr,
                         HAS_NB: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = 0,
                         PARTS: tl.constexpr = 1, PARTS_P2: tl.constexpr = 1, ONE_LOAD: tl.constexpr = 0):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_D:
            if PARTS > 1 and ONE_LOAD:  # a split-K projection's fp32 partials (SplitSum): summed, rounded
                p = tl.arange(0, PARTS_P2)
                parts = tl.load(D + p[:, None] * stride_part + row * stride_d + cols[None, :],
                                mask=(p < PARTS)[:, None] & m[None, :], other=0.0)
                d = tl.sum(parts, axis=0).to(x.dtype)
            elif PARTS > 1:
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for p in tl.static_range(PARTS):
                    acc += tl.load(D + p * stride_part + row * stride_d + cols, mask=m, other=0.0)
                d = acc.to(x.dtype)
            else:
                d = tl.load(D + row * stride_d + cols, mask=m, other=0.0)
            if HAS_B:
                # The reference adds the bias to the projection first, then the sum to the residual.
                d = (d.to(tl.float32) + tl.load(B + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(H_OUT + row * stride_h + cols, x, mask=m)
        xf = x.to(tl.float32)
        if RMS:
            var = tl.sum(xf * xf, axis=0) / N
            y = (xf * tl.rsqrt(var + eps)).to(x.dtype)  # cast before the weight, as Llama does
            w = tl.load(W + cols, mask=m, other=0.0)
            y = (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype)
        else:
            mean = tl.sum(xf, axis=0) / N
            xc = tl.where(m, xf - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
            y = xc * tl.rsqrt(var + eps)
            if HAS_W:
                y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_NB:
                y = y + tl.load(NB + cols, mask=m, other=0.0).to(tl.float32)
            y = y.to(x.dtype)
        tl.store(Y + row * stride_y + cols, y, mask=m)

    @triton.jit
    def _rope_write_kernel(QKV, POS, COS, SIN, CACHE, Q_OUT, stride_row, T,
                           s_kv, s_slot, s_head, s_seq,
                           H: tl.constexpr, KV: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                           ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, PDL: tl.constexpr = 0):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        slot = row // T
        pos = tl.load(POS + row)
        d = tl.arange(0, D)
        dm = d < HEAD_DIM
        base = QKV + row * stride_row
        # Keys (and, with RoPE, the queries in front of them): heads [first, H + KV) of the fused row.
        first = 0 if ROPE else H
        heads = first + tl.arange(0, BLOCK_H)
        hm = heads < H + KV
        m2 = hm[:, None] & dm[None, :]
        x = tl.load(base + heads[:, None] * HEAD_DIM + d[None, :], mask=m2, other=0.0)
        if ROPE:
            half = HEAD_DIM // 2
            partner = tl.where(d < half, d + half, d - half)
            other = tl.load(base + heads[:, None] * HEAD_DIM + partner[None, :], mask=m2, other=0.0)
            rot = tl.where((d < half)[None, :], -other.to(tl.float32), other.to(tl.float32))
            c = tl.load(COS + pos * HEAD_DIM + d, mask=dm, other=0.0).to(x.dtype).to(tl.float32)
            s = tl.load(SIN + pos * HEAD_DIM + d, mask=dm, other=0.0).to(x.dtype).to(tl.float32)
            # q * cos + rotate_half(q) * sin, each product rounded as the reference rounds it.
            a = (x.to(tl.float32) * c[None, :]).to(x.dtype).to(tl.float32)
            b = (rot * s[None, :]).to(x.dtype).to(tl.float32)
            x = (a + b).to(x.dtype)
            qm = (heads < H)[:, None] & dm[None, :]
            tl.store(Q_OUT + row * (H * HEAD_DIM) + heads[:, None] * HEAD_DIM + d[None, :], x, mask=qm)
        kh = heads - H
        km = (heads >= H)[:, None] & m2
        cache_k = CACHE + slot * s_slot + pos * s_seq
        tl.store(cache_k + kh[:, None] * s_head + d[None, :], x, mask=km)
        vh = tl.arange(0, BLOCK_KV)
        vm = (vh < KV)[:, None] & dm[None, :]
        v = tl.load(base + (H + KV + vh[:, None]) * HEAD_DIM + d[None, :], mask=vm, other=0.0)
        tl.store(cache_k + s_kv + vh[:, None] * s_head + d[None, :], v, mask=vm)

    @triton.jit
    def _rope_row(X, d, dm, c, s, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, other_mask):
        # Rows of head vectors at X (pointer block [rows, D]), rotated as rope_write rotates them.
        x = tl.load(X + d[None, :], mask=other_mask, other=0.0)
        if ROPE:
            half = HEAD_DIM // 2
            partner = tl.where(d < half, d + half, d - half)
            o = tl.load(X + partner[None, :], mask=other_mask, other=0.0)
            rot = tl.where((d < half)[None, :], -o.to(tl.float32), o.to(tl.float32))
            a = (x.to(tl.float32) * c[None, :]).to(x.dtype).to(tl.float32)
            b = (rot * s[None, :]).to(x.dtype).to(tl.float32)
            x = (a + b).to(x.dtype)
        return x

    @triton.jit
    def _decode_attn_kernel(Q, K, V, POS, O, MX, LX, ACC,
                            stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                            stride_vb, stride_vh, stride_vs, stride_pb, stride_ob, stride_oh, scale_log2,
                            COS, SIN,
                            H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                            HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                            SPLIT_LEN: tl.constexpr, NUM_SPLITS: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = 0,
                            NEW: tl.constexpr = False, ROPE: tl.constexpr = False):
        # NEW: Q is the fused projection's row [H q | KV k | KV v heads] of this step's token, not yet in
        # the cache: q (and k) are rotated here, the new key and value are attended from registers, and
        # the split that holds the token's position stores them into the cache (rope_write folded in).
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        sid = tl.program_id(1)
        KVH: tl.constexpr = H // GROUP
        b = (pid // KVH).to(tl.int64)
        kvh = pid % KVH
        pos = tl.load(POS + b * stride_pb).to(tl.int32)
        length = pos + 1
        g = tl.arange(0, BLOCK_G)
        gm = g < GROUP
        heads = kvh * GROUP + g
        d = tl.arange(0, D)
        dm = d < HEAD_DIM
        start = sid * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, length)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        if NEW:
            if ROPE:
                c = tl.load(COS + pos * HEAD_DIM + d, mask=dm, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
                sn = tl.load(SIN + pos * HEAD_DIM + d, mask=dm, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
            else:
                c = tl.zeros([D], dtype=tl.float32)  # unused without RoPE
                sn = c
            row = Q + b * stride_qb
            q = _rope_row(row + heads[:, None] * HEAD_DIM, d, dm, c, sn, ROPE, HEAD_DIM, gm[:, None] & dm[None, :])
            one = tl.arange(0, 1)
            k_new = _rope_row(row + (H + kvh + one[:, None]) * HEAD_DIM, d, dm, c, sn, ROPE, HEAD_DIM, dm[None, :])
            v_new = tl.load(row + (H + KVH + kvh + one[:, None]) * HEAD_DIM + d[None, :], mask=dm[None, :], other=0.0)
            cached_end = tl.minimum(end, pos)  # the cache holds positions < pos; pos is k_new / v_new
        else:
            q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                        mask=gm[:, None] & dm[None, :], other=0.0)
            cached_end = end
        m_i = tl.zeros([BLOCK_G], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
        for n0 in range(start, cached_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < cached_end
            k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
            s = tl.where(nm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        if NEW:
            if (start <= pos) & (pos < end):  # this split holds the new position
                tl.store(k_base + pos * stride_ks + d[None, :], k_new, mask=dm[None, :])
                tl.store(v_base + pos * stride_vs + d[None, :], v_new, mask=dm[None, :])
                s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale_log2
                m_new = tl.maximum(m_i, s)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new)
                l_i = l_i * alpha + p
                acc = acc * alpha[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
                m_i = m_new
        if NUM_SPLITS == 1:
            o = acc / l_i[:, None]
            tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], o.to(O.dtype.element_ty),
                     mask=gm[:, None] & dm[None, :])
        else:
            # Splits past the slot's length store m = -inf, l = 0: they weigh nothing in the reduction.
            idx = (b * H + heads) * NUM_SPLITS + sid
            tl.store(MX + idx, m_i, mask=gm)
            tl.store(LX + idx, l_i, mask=gm)
            tl.store(ACC + idx[:, None] * D + d[None, :], acc, mask=gm[:, None])

    @triton.jit
    def _decode_reduce_kernel(MX, LX, ACC, O, stride_ob, stride_oh, H: tl.constexpr, HEAD_DIM: tl.constexpr,
                              D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = 0):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H
        h = pid % H
        s = tl.arange(0, BLOCK_S)
        sm = s < NUM_SPLITS
        d = tl.arange(0, D)
        m = tl.load(MX + pid * NUM_SPLITS + s, mask=sm, other=float("-inf"))
        l = tl.load(LX + pid * NUM_SPLITS + s, mask=sm, other=0.0)
        top = tl.max(m, axis=0)
        w = tl.exp2(m - top)
        acc = tl.load(ACC + (pid * NUM_SPLITS + s)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(O + b * stride_ob + h * stride_oh + d, o.to(O.dtype.element_ty), mask=d < HEAD_DIM)

    @triton.jit
    def _skinny_mm_kernel(X, W, B, Y, M, N, K, K_PER, stride_xm, stride_wn, stride_ym, GATE_OFF,
                          HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = 0,
                          SPLIT: tl.constexpr = 1):
        # y[m, n] = x[m, :] . w[n, :] (+ b[n]) for a few rows m: each program streams BLOCK_N rows of w
        # once for every m. ACT: 0 none, 1 relu, 2 swiglu (silu(x.w[n]) * x.w[n + GATE_OFF]).
        # SPLIT > 1: program (i, s) sums only K slice s (K_PER long) and stores fp32 partials y[s, m, n].
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        nm = n < N
        mm = m < M
        if PDL:
            tl.extra.cuda.gdc_wait()
            if PDL == 1:
                tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ACT == 2:
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_lo = tl.program_id(1) * K_PER
        for k0 in range(k_lo, k_lo + K_PER, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < K
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
            if ACT == 2:
                w2 = tl.load(W + (n[:, None] + GATE_OFF) * stride_wn + k[None, :], mask=nm[:, None] & km[None, :],
                             other=0.0)
                acc2 += tl.dot(x, tl.trans(w2), input_precision=PREC)
        if PDL == 2:  # let the next kernel launch only once the weights are streamed
            tl.extra.cuda.gdc_launch_dependents()
        if SPLIT > 1:
            tl.store(Y + (tl.program_id(1) * M + m[:, None]) * stride_ym + n[None, :], acc,
                     mask=mm[:, None] & nm[None, :])
            return
        if HAS_BIAS:
            acc += tl.load(B + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        out_ty = Y.dtype.element_ty
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
        if ACT == 2:
            # As the reference: gate and up rounded, silu(gate) rounded, the product rounded.
            g = acc.to(out_ty).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)
            acc = a * acc2.to(out_ty).to(tl.float32)
        tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(out_ty), mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _silu_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        gate = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        up = tl.load(X + row * stride_x + N + cols, mask=m, other=0.0)
        g = gate.to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # act(gate) rounded, then the product rounded
        tl.store(Y + row * stride_y + cols, (a.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=m)


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _prefer_shared(module, function, name, metadata_group, hash) -> None:
    """Give each of our kernels the whole shared-memory carveout when it is loaded. Triton asks for it only
    for kernels over 48 KB, so the small kernels (add+norm, attention at some tilings, the reduce) ran
    with another split of L1 and shared memory, and an SM cannot take programs of a kernel with another
    carveout until it drains: PDL's early-launched programs waited. Measured (docs/PERFORMANCE.md):
    Llama b=8 -2.5% (bf16) to -7% (fp16), OPT b=8 bf16 -2.5%, b=1 within noise. DEJAVU_CARVEOUT=0: off."""
    if name in _OURS:
        _libcuda().cuFuncSetAttribute(ctypes.c_void_p(function), 9, 100)  # PREFERRED_SHARED_MEMORY_CARVEOUT, %


_CARVEOUT = False
if HAVE_TRITON:
    _OURS = {name for name, f in list(globals().items()) if isinstance(f, triton.runtime.JITFunction)}
    _OURS.add("_skinny_tma_kernel")
    _hooks = getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "kernel_load_end_hook", None)
    if _PDL_OK and switches.get("DEJAVU_CARVEOUT") and _hooks is not None:
        _hooks.add(_prefer_shared)  # Triton >= 3.4; older ones load every kernel with their own carveout
        _CARVEOUT = True


# ---- entry points (callers check ``enabled`` first) -------------------------------------------------

def add_norm(x: torch.Tensor, delta: torch.Tensor | None, bias: torch.Tensor | None, norm,
             one_load: bool | None = None) -> tuple:
    """``h = x + (delta + bias)`` (when delta is given) and ``norm(h)``; returns (h, norm(h)).

    ``norm`` is our RMSNorm or an ``nn.LayerNorm``; ``delta`` a tensor or a split-K ``SplitSum``.
    ``one_load`` forces how split-K partials are read (None: the faster form for the dtype, below).
    """
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    rms = not hasattr(norm, "normalized_shape")
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if delta is not None else x2
    parts = 1
    if isinstance(delta, SplitSum):
        parts, d2 = delta.parts.shape[0], delta.parts  # [parts, rows, n], contiguous
        assert d2.shape[1:] == (rows, n) and d2.is_contiguous()
    else:
        d2 = delta.reshape(-1, n) if delta is not None else x2
    w = norm.weight
    nb = None if rms else norm.bias
    eps = norm.eps
    # The partials' loads must all be in flight at once. Loaded part by part, the fp16 build does that and
    # the bf16 build issues them one after another (4 parts: 2.8 us against 1.6); as one [parts, n] load
    # both take 1.8. Each dtype gets the form that compiles to parallel loads (H200, docs/PERFORMANCE.md).
    one_load = x.dtype == torch.bfloat16 if one_load is None else one_load
    _add_norm_kernel[(rows,)](
        x2, d2, bias if bias is not None else x2, w if w is not None else x2, nb if nb is not None else x2,
        h, y, x2.stride(0), d2.stride(-2), h.stride(0), y.stride(0), n, eps, rows * n,
        HAS_D=delta is not None, HAS_B=bias is not None, HAS_W=w is not None, HAS_NB=nb is not None,
        RMS=rms, BLOCK=_pow2(n), num_warps=4 if n <= 4096 else 8, PARTS=parts, PARTS_P2=_pow2(parts),
        ONE_LOAD=one_load, **_pdl(x))
    return h.view(shape), y.view(shape)


def rope_write(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
               cache_layer: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rotate q, k of the fused projection [b, T, (H + 2 KV) * d] and store k, v into ``cache_layer``
    [2, b, KV, S, d] at ``positions`` [b, T]. Returns q [b, T, H, d] (a view of qkv without RoPE)."""
    b, t, width = qkv.shape
    qkv2 = qkv.reshape(b * t, width)
    assert qkv2.stride(1) == 1 and cache_layer.stride(-1) == 1
    pos = positions.reshape(b * t)
    if pos.dtype != torch.long or not pos.is_contiguous():
        pos = pos.to(torch.long).contiguous()
    rope = cos is not None
    q = torch.empty(b, t, heads, head_dim, dtype=qkv.dtype, device=qkv.device) if rope else None
    first = 0 if rope else heads
    _rope_write_kernel[(b * t,)](
        qkv2, pos, cos if rope else qkv2, sin if rope else qkv2, cache_layer, q if rope else qkv2,
        qkv2.stride(0), t, cache_layer.stride(0), cache_layer.stride(1), cache_layer.stride(2),
        cache_layer.stride(3), H=heads, KV=kv_heads, HEAD_DIM=head_dim, D=_pow2(head_dim), ROPE=rope,
        BLOCK_H=_pow2(heads + kv_heads - first), BLOCK_KV=_pow2(kv_heads), num_warps=4, **_pdl(qkv))
    if rope:
        return q
    return qkv[..., : heads * head_dim].view(b, t, heads, head_dim)


def _splits(batch: int, kv_heads: int, max_seq: int, block_n: int, target: int = 264) -> tuple[int, int]:
    """Split the keys so that about two waves of programs cover the GPU even at batch 1."""
    blocks = triton.cdiv(max_seq, block_n)
    want = max(1, min(blocks, triton.cdiv(target, batch * kv_heads)))
    split_len = triton.cdiv(blocks, want) * block_n
    return triton.cdiv(max_seq, split_len), split_len


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     scale: float | None = None, config: tuple | None = None) -> torch.Tensor:
    """One query per slot: q [b, H, d]; keys/values [b, KV, S, d] (cache views); positions [b] or [b, 1]
    is each query's position, so keys 0..pos are read. Returns [b, H, d]."""
    assert q.stride(-1) == 1
    return _decode_attention(q, q.stride(0), q.stride(1), q.shape[1], q.shape[2], keys, values, positions,
                             scale, config)


def attention_writes_cache() -> bool:
    """Decode through ``decode_attention_new`` (one kernel) rather than ``rope_write`` + ``decode_attention``
    (``DEJAVU_ATTN_WRITE=0``: the two-kernel path, for A/B measurements)."""
    return switches.get("DEJAVU_ATTN_WRITE")


def decode_attention_new(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor | None,
                         sin: torch.Tensor | None, cache_layer: torch.Tensor, heads: int, head_dim: int,
                         scale: float | None = None, config: tuple | None = None) -> torch.Tensor:
    """``rope_write`` and ``decode_attention`` of one new token per slot, in one kernel: qkv
    [b, 1, (H + 2 KV) * d] is the fused projection's output, rotated here (cos/sin None: no RoPE); its k, v
    are stored into ``cache_layer`` [2, b, KV, S, d] at ``positions`` and attended with keys 0..pos-1
    read from the cache. Returns [b, H, d]."""
    b = qkv.shape[0]
    row = qkv.reshape(b, -1)
    assert row.stride(1) == 1 and cache_layer.stride(-1) == 1
    return _decode_attention(row, row.stride(0), head_dim, heads, head_dim, cache_layer[0], cache_layer[1],
                             positions, scale, config, new=(cos, sin))


def _decode_attention(q, stride_qb: int, stride_qh: int, heads: int, head_dim: int, keys, values, positions,
                      scale, config, new: tuple | None = None) -> torch.Tensor:
    b = q.shape[0]
    kv_heads, max_seq = keys.shape[1], keys.shape[2]
    assert keys.stride(-1) == 1 and values.stride(-1) == 1
    group = heads // kv_heads
    pos = positions.reshape(b)
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    block_n, stages, warps, target = config or tuning().attention.get((b, kv_heads)) or (64, 2, 4, 264)
    block_n = min(block_n, max(16, _pow2(max_seq)))
    num_splits, split_len = _splits(b, kv_heads, max_seq, block_n, target)
    out = torch.empty(b, heads, head_dim, dtype=q.dtype, device=q.device)
    d_pad = _pow2(max(head_dim, 16))
    if num_splits > 1:
        mx = torch.empty(b * heads * num_splits, dtype=torch.float32, device=q.device)
        lx = torch.empty_like(mx)
        acc = torch.empty(b * heads * num_splits, d_pad, dtype=torch.float32, device=q.device)
    else:
        mx = lx = acc = out
    cos, sin = new if new is not None else (None, None)
    _decode_attn_kernel[(b * kv_heads, num_splits)](
        q, keys, values, pos, out, mx, lx, acc,
        stride_qb, stride_qh, keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), pos.stride(0), out.stride(0), out.stride(1),
        scale * 1.4426950408889634, cos if cos is not None else q, sin if sin is not None else q,
        H=heads, GROUP=group, BLOCK_G=max(16, _pow2(group)), HEAD_DIM=head_dim, D=d_pad, BLOCK_N=block_n,
        SPLIT_LEN=split_len, NUM_SPLITS=num_splits, num_warps=warps, num_stages=stages,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        NEW=new is not None, ROPE=cos is not None, **_pdl(q))
    if num_splits > 1:
        _decode_reduce_kernel[(b * heads,)](
            mx, lx, acc, out, out.stride(0), out.stride(1), H=heads, HEAD_DIM=head_dim, D=d_pad,
            NUM_SPLITS=num_splits, BLOCK_S=_pow2(num_splits), num_warps=2, **_pdl(q))
    return out


SKINNY_MAX_ROWS = 64


def use_skinny(m: int, n: int, k: int) -> bool:
    """False where the sweep found cuBLAS at least as fast for this shape (and PDL is off)."""
    everywhere = switches.get("DEJAVU_SKINNY_ALL")
    if everywhere or (everywhere is None and _pdl_mode() != "0"):
        return True
    t = tuning()
    return (bucket(m), n, k) not in t.cublas_faster and t.skinny.get((bucket(m), n, k), True) is not None


def _skinny_config(m: int, n: int, k: int) -> tuple[int, int, int, int]:
    cfg = tuning().skinny.get((bucket(m), n, k))
    if cfg:
        return cfg
    # Enough programs for about one wave on 132 SMs, each streaming a narrow slab of w.
    block_n = 16 if n <= 4096 else 32 if n <= 16384 else 64
    return block_n, 256 if k >= 256 else _pow2(k), 4, 4


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, K] with unit stride along K (what the skinny kernels read)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _tma(x2: torch.Tensor, weight: torch.Tensor, k_per: int) -> tuple | None:
    """The tiling of ``skinny_tma`` where it applies and DEJAVU_MATMUL does not say "triton"."""
    return skinny_tma.tiling(x2, weight, k_per) if skinny_tma.wanted() else None


def skinny_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: int = 0,
              config: tuple | None = None, static_weight: bool = False) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for x with few rows (decode), streaming the weight at full bandwidth.

    act: 0 none, 1 relu, 2 swiglu (weight holds [gate; up]; returns silu(x gate) * (x up), half width).
    ``config``: a Triton tiling (the sweep's; it also picks the Triton kernel). ``static_weight``: no kernel
    of the step writes ``weight`` (a model weight), so the TMA kernel may read it before its PDL wait.
    """
    shape = x.shape
    k = shape[-1]
    x2 = _rows(x)
    m, n = x2.shape[0], weight.shape[0]
    n_out = n // 2 if act == 2 else n
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    tma = _tma(x2, weight, k) if config is None else None
    if tma is not None:
        skinny_tma.launch(x2, weight, bias, y, n_out, act, 1, tma, _pdl(x, "plain" if act == 0 else "activation"),
                          static_weight)
        return y.view(*shape[:-1], n_out)
    block_n, block_k, stages, warps = config or _skinny_config(m, n_out, k)
    # The tilings were tuned in fp16; keep the pipelined tiles inside shared memory for fp32 (and swiglu's
    # two weight tiles): (stages - 1) * (x tile + w tiles) must fit.
    block_m = bucket(m)  # rows padded to the tensor-core tile
    per_stage = lambda: (block_m + (2 if act == 2 else 1) * block_n) * block_k * x.element_size()  # noqa: E731
    while (stages - 1) * per_stage() > 160 * 1024 and stages > 2:
        stages -= 1
    while (stages - 1) * per_stage() > 160 * 1024 and block_k > 32:
        block_k //= 2
    pdl = _pdl(x, "plain" if act == 0 else "activation")  # the kinds DEJAVU_PDL_EARLY may name
    _skinny_mm_kernel[(triton.cdiv(n_out, block_n),)](
        x2, weight, bias if bias is not None else weight, y, m, n_out, k, k, x2.stride(0), weight.stride(0),
        y.stride(0), n_out if act == 2 else 0, HAS_BIAS=bias is not None, ACT=act,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_stages=stages, num_warps=warps,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", **pdl)
    return y.view(*shape[:-1], n_out)


@dataclass
class SplitSum:
    """A projection's output left as fp32 partial sums over slices of K, ``parts`` [splits, rows, n]. The
    next add+norm kernel sums them in a fixed order as it reads them (so the split costs no kernel of its
    own and the result does not depend on timing), then rounds to ``dtype`` as the matmul would have."""

    parts: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    def resolve(self) -> torch.Tensor:
        return self.parts.sum(0).to(self.dtype).view(self.shape)


def split_config(x: torch.Tensor, weight: torch.Tensor) -> tuple | None:
    """The split-K tiling for ``x @ weight.T``, or None where the projection is not split."""
    if not switches.get("DEJAVU_SPLITK") or not skinny_enabled(x):
        return None
    n, k = weight.shape
    return tuning().split.get((bucket(x.numel() // k), n, k))


def skinny_mm_split(x: torch.Tensor, weight: torch.Tensor, config: tuple, static_weight: bool = False) -> SplitSum:
    """``x @ weight.T`` (no bias, no activation) as split-K partial sums; ``config`` from split_config.
    ``static_weight`` as in ``skinny_mm``."""
    splits, block_n, block_k, stages, warps = config
    shape = x.shape
    k = shape[-1]
    x2 = _rows(x)
    m, n = x2.shape[0], weight.shape[0]
    k_per = k // splits
    assert k_per * splits == k and k_per % block_k == 0, (k, config)
    tma_splits = skinny_tma.splits(splits)
    tma = _tma(x2, weight, k // tma_splits) if k % tma_splits == 0 else None
    if tma is not None:
        parts = torch.empty(tma_splits, m, n, dtype=torch.float32, device=x.device)
        skinny_tma.launch(x2, weight, None, parts, n, 0, tma_splits, tma, _pdl(x, "split"), static_weight)
        return SplitSum(parts, torch.Size((*shape[:-1], n)), x.dtype)
    parts = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _skinny_mm_kernel[(triton.cdiv(n, block_n), splits)](
        x2, weight, weight, parts, m, n, k, k_per, x2.stride(0), weight.stride(0), n, 0, HAS_BIAS=False, ACT=0,
        BLOCK_M=bucket(m), BLOCK_N=block_n, BLOCK_K=block_k, num_stages=stages, num_warps=warps,
        PREC="tf32", SPLIT=splits, **_pdl(x, "split"))
    return SplitSum(parts, torch.Size((*shape[:-1], n)), x.dtype)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (the fused gate/up projection's output)."""
    shape = x.shape
    n = shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(2048, _pow2(n))
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, y, x2.stride(0), y.stride(0), n, BLOCK=block,
                                                          num_warps=4, **_pdl(x))
    return y.view(*shape[:-1], n)
