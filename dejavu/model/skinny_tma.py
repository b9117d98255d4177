"""The decode matmul with its weight staged into shared memory by TMA, the first tiles before the PDL wait.

``fused.skinny_mm`` streams each weight row-slab through Triton's pipeliner, which issues a loop's first
loads only after the kernel's ``griddepcontrol.wait``: every projection's programs sit resident for
~1.7 us while the add+norm before them runs, then spend ~2 us ramping up after it (docs/PERFORMANCE.md,
where the gap is). Here a program (Gluon, Hopper) owns a ring of shared-memory stages filled by TMA
bulk copies and counted by mbarriers, and fills the weight half of its first stages *before* the wait,
since no kernel of a decode step writes the model's weights. The activations are copied only after it.

The product is computed transposed, ``acc[n, m] = w[n, :] . x[m, :]``, so that the weight tile is the
64-row operand of a warpgroup MMA and the few decode rows (padded to 8-32) are its narrow side.

``fused.skinny_mm`` / ``fused.skinny_mm_split`` run it wherever it applies (``tiling``) unless
``DEJAVU_MATMUL=triton``. On an H200 it took 4-10% off every fp16 decode step of OPT-1.3B and Llama-1B at
batch 1, 8 and 32 against the Triton kernel (docs/PERFORMANCE.md).

Switches (``switches.py``), read at each call, so one process can A/B them (a CUDA graph keeps what it
captured): ``DEJAVU_TMA_TILE`` sets the tiling (``tile``), ``DEJAVU_TMA_SPLITS`` the split-K slices,
``DEJAVU_TMA_EARLY=0`` loads the weight only after the wait (the A/B of the early tiles alone). GPU only
(sm_90+); where it does not apply the Triton kernel runs.
"""

from __future__ import annotations

import torch

from dejavu.model import switches
from dejavu.model.kernel_tuning import bucket

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except Exception:  # no Triton, or one without Gluon (< 3.4)
    HAVE_GLUON = False

SMEM_BYTES = 220 * 1024  # of the H100/H200's 227 KB a block, leaving room for the barriers


# Rows bucket (as kernel_tuning.bucket) -> (BLOCK_N, BLOCK_K, stages): the fastest of six tilings in the
# whole decode step on an H200 (docs/PERFORMANCE.md).
TILES = {16: (64, 256, 4), 32: (64, 128, 8)}


def wanted() -> bool:
    return switches.get("DEJAVU_MATMUL") == "tma"


def tile(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, stages, warps) for ``m`` rows: ``TILES``, or ``DEJAVU_TMA_TILE`` "BLOCK_N,BLOCK_K,stages"
    for every row count (BLOCK_N 64 or 128, one warpgroup per 64 rows)."""
    block_n, block_k, stages = switches.get("DEJAVU_TMA_TILE") or TILES[bucket(m)]
    return block_n, block_k, stages, block_n // 16


def splits(tuned: int) -> int:
    """K slices of a split-K projection: the split table's (tuned for the Triton kernel), or
    ``DEJAVU_TMA_SPLITS`` (a probe of other counts; bench/generate.py --variants)."""
    return switches.get("DEJAVU_TMA_SPLITS") or tuned


def _readable(t: torch.Tensor) -> bool:
    """TMA's rules: unit stride along the row, 16-byte aligned rows and base."""
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def takes_rows(x2: torch.Tensor) -> bool:
    """Can the kernels take these activations: a Hopper GPU, fp16/bf16, at most 32 TMA-readable rows."""
    return (HAVE_GLUON and x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16) and x2.shape[0] <= 32
            and torch.cuda.get_device_capability(x2.device)[0] >= 9 and _readable(x2))


def tiling(x2: torch.Tensor, weight: torch.Tensor, k_per: int) -> tuple[int, int, int, int] | None:
    """The ``tile`` for ``x2 @ weight.T`` where the kernel applies: ``takes_rows`` (so a row count that
    ``TILES`` has a tiling for) and a weight of x2's dtype that TMA can read, in whole K tiles."""
    if not takes_rows(x2):
        return None
    t = tile(x2.shape[0])
    return t if weight.dtype == x2.dtype and k_per % t[1] == 0 and _readable(weight) else None


if HAVE_GLUON:

    @gluon.jit
    def _gdc_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _load_weight(w_desc, bar, w_smem, stage, n0, k, GATE_OFF, NW: gl.constexpr, pred):
        tma.async_copy_global_to_shared(w_desc, [n0, k], bar, w_smem.index(stage * NW), pred=pred)
        if NW == 2:  # SwiGLU: the up rows GATE_OFF below the gate rows, into the stage's second slot
            tma.async_copy_global_to_shared(w_desc, [n0 + GATE_OFF, k], bar, w_smem.index(stage * NW + 1), pred=pred)

    @gluon.jit
    def _first_weights(w_desc, w_smem, bars, n0, k_lo, n_k, GATE_OFF, NW: gl.constexpr, STAGES: gl.constexpr,
                       STAGE_BYTES: gl.constexpr):
        for s in gl.static_range(STAGES):
            mbarrier.expect(bars.index(s), STAGE_BYTES, pred=s < n_k)
            _load_weight(w_desc, bars.index(s), w_smem, s, n0, k_lo + s * w_desc.block_type.shape[1], GATE_OFF, NW,
                         s < n_k)

    @gluon.jit
    def _start(w_desc, w_smem, bars, n0, k_lo, n_k, GATE_OFF, NW: gl.constexpr, STAGES: gl.constexpr,
               STAGE_BYTES: gl.constexpr, PDL: gl.constexpr, EARLY: gl.constexpr):
        """Barriers set up, the weight halves of the first stages in flight (before the PDL wait when
        ``EARLY``: the caller says no kernel writes the weight), then the wait."""
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        if EARLY:
            _first_weights(w_desc, w_smem, bars, n0, k_lo, n_k, GATE_OFF, NW, STAGES, STAGE_BYTES)
        if PDL:
            _gdc_wait()
            if PDL == 1:
                _gdc_launch_dependents()
        if not EARLY:
            _first_weights(w_desc, w_smem, bars, n0, k_lo, n_k, GATE_OFF, NW, STAGES, STAGE_BYTES)

    @gluon.jit
    def _mma_loop(w_desc, x_desc, w_smem, x_smem, bars, n0, k_lo, n_k, GATE_OFF, mma: gl.constexpr,
                  NW: gl.constexpr, STAGES: gl.constexpr, STAGE_BYTES: gl.constexpr):
        """acc[n, m] (and acc2 for SwiGLU's up rows) over the K tiles, which come through the ring."""
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = w_desc.block_type.shape[1]
        BM: gl.constexpr = mma.instr_shape[1]
        acc = gl.zeros([BN, BM], gl.float32, mma)
        acc2 = gl.zeros([BN, BM], gl.float32, mma)
        for i in range(n_k):
            cur = i % STAGES
            mbarrier.wait(bars.index(cur), (i // STAGES) & 1)
            xt = x_smem.index(cur).permute((1, 0))
            acc = warpgroup_mma(w_smem.index(cur * NW), xt, acc, is_async=True)
            if NW == 2:
                acc2 = warpgroup_mma(w_smem.index(cur * NW + 1), xt, acc2, is_async=True)
                acc, acc2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc2))
            else:
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # Tile i - 1's MMAs are done: its stage takes tile i - 1 + STAGES.
            j = i - 1 + STAGES
            refill = (i > 0) & (j < n_k)
            ps = j % STAGES
            mbarrier.expect(bars.index(ps), STAGE_BYTES, pred=refill)
            _load_weight(w_desc, bars.index(ps), w_smem, ps, n0, k_lo + j * BK, GATE_OFF, NW, refill)
            tma.async_copy_global_to_shared(x_desc, [0, k_lo + j * BK], bars.index(ps), x_smem.index(ps), pred=refill)
        if NW == 2:
            acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))
        return acc, acc2

    @gluon.jit
    def _store(acc, acc2, B, Y, M, N, n0, stride_ym, mma: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
               SPLIT: gl.constexpr):
        """y[m, n] = acc[n, m] (+ bias, activation), or the fp32 partial sums of K slice program_id(1)."""
        n = n0 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, mma))
        m = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, mma))
        mask = (n < N)[:, None] & (m < M)[None, :]
        if SPLIT > 1:
            gl.store(Y + (gl.program_id(1) * M + m[None, :]) * stride_ym + n[:, None], acc, mask=mask)
        else:
            out_ty: gl.constexpr = Y.dtype.element_ty
            if HAS_BIAS:
                acc += gl.load(B + n, mask=n < N, other=0.0).to(gl.float32)[:, None]
            if ACT == 1:
                acc = gl.maximum(acc, 0.0)
            if ACT == 2:
                # As the reference: gate and up rounded, silu(gate) rounded, the product rounded.
                g = acc.to(out_ty).to(gl.float32)
                a = (g / (1.0 + gl.exp(-g))).to(out_ty).to(gl.float32)
                acc = a * acc2.to(out_ty).to(gl.float32)
            gl.store(Y + m[None, :] * stride_ym + n[:, None], acc.to(out_ty), mask=mask)

    @gluon.jit
    def _skinny_tma_kernel(w_desc, x_desc, B, Y, M, N, K_PER, stride_ym, GATE_OFF,
                           HAS_BIAS: gl.constexpr, ACT: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr,
                           PDL: gl.constexpr, EARLY: gl.constexpr, num_warps: gl.constexpr):
        # y[m, n] = x[m, :] . w[n, :] (+ b[n]) as in fused._skinny_mm_kernel (ACT 0 none, 1 relu, 2 SwiGLU;
        # SPLIT > 1: program (i, s) sums K slice s and stores fp32 partials y[s, m, n]).
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = w_desc.block_type.shape[1]
        BM: gl.constexpr = x_desc.block_type.shape[0]
        NW: gl.constexpr = 2 if ACT == 2 else 1
        STAGE_BYTES: gl.constexpr = NW * w_desc.block_type.nbytes + x_desc.block_type.nbytes
        n0 = gl.program_id(0) * BN
        k_lo = gl.program_id(1) * K_PER
        n_k = K_PER // BK
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * NW, BN, BK], w_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        _start(w_desc, w_smem, bars, n0, k_lo, n_k, GATE_OFF, NW, STAGES, STAGE_BYTES, PDL, EARLY)
        for s in gl.static_range(STAGES):  # x's halves of the first stages: x is the kernel before's output
            tma.async_copy_global_to_shared(x_desc, [0, k_lo + s * BK], bars.index(s), x_smem.index(s), pred=s < n_k)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BM, 16])
        acc, acc2 = _mma_loop(w_desc, x_desc, w_smem, x_smem, bars, n0, k_lo, n_k, GATE_OFF, mma, NW, STAGES,
                              STAGE_BYTES)
        if PDL == 2:  # let the next kernel launch only once the weights are streamed
            _gdc_launch_dependents()
        _store(acc, acc2, B, Y, M, N, n0, stride_ym, mma, HAS_BIAS, ACT, SPLIT)


def _gl_dtype(dtype: torch.dtype):
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


def stages_that_fit(block_n: int, block_k: int, block_m: int, act: int, want: int, elem: int = 2) -> int:
    stage = ((2 if act == 2 else 1) * block_n + block_m) * block_k * elem
    return max(1, min(want, SMEM_BYTES // stage))


def launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, n_out: int,
           act: int, splits: int, config: tuple, pdl: dict, early: bool) -> None:
    """``out`` = x2 @ weight.T (+ bias, act) as ``fused._skinny_mm_kernel`` computes it; with ``splits`` > 1,
    ``out`` [splits, m, n] takes fp32 partial sums over K slices. ``config``: (BLOCK_N, BLOCK_K, stages,
    warps), BLOCK_N = 16 x warps (one warpgroup MMA row block per 4 warps). ``early``: the weight is not
    written by any kernel of the graph, so its first tiles may be read before the PDL wait."""
    block_n, block_k, stages, warps = config
    m, k = x2.shape
    block_m = max(8, 1 << (m - 1).bit_length())
    dt = _gl_dtype(x2.dtype)
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k],
                                          gl.NVMMASharedLayout.get_default_for([block_n, block_k], dt))
    x_desc = TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [block_m, block_k],
                              gl.NVMMASharedLayout.get_default_for([block_m, block_k], dt))
    # No more stages than K tiles: the smaller ring lets other kernels' programs share the SM.
    stages = stages_that_fit(block_n, block_k, block_m, act, min(stages, k // splits // block_k))
    _skinny_tma_kernel[(-(-n_out // block_n), splits)](
        w_desc, x_desc, bias if bias is not None else weight, out, m, n_out, k // splits, out.stride(-2),
        n_out if act == 2 else 0, HAS_BIAS=bias is not None, ACT=act, SPLIT=splits, STAGES=stages,
        EARLY=bool(early and pdl.get("PDL") and switches.get("DEJAVU_TMA_EARLY")), num_warps=warps,
        **pdl)

