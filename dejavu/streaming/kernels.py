"""A GPU kernel for the per-step replication path: gather one token step's slice straight into host memory.

The slice of a step is one ``head_dim`` row per (slot, layer, kv, head), each at its slot's position:
thousands of small strided rows. ``torch.gather`` into a device staging buffer and then one copy to
pinned host memory costs two dependent operations; this kernel reads the rows and writes them (and the
slots' positions) into the pinned buffer itself, over PCIe. Pinned memory is mapped into the GPU's
address space (unified addressing), so a kernel can store to it. On an H100, inside a CUDA graph, a
1.5 MB slice lands in 37.6 us against 45.5 us for gather + copy and 35.1 us for one plain copy of the
same bytes (``bench/NOTES-perf.md``).

Triton only; without it (or on the CPU) the replicator gathers with PyTorch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False

BLOCK_R = 64  # rows per program (a sweep of 32-256 on an H100 was flat; 16 was 9x slower)

if HAVE_TRITON:

    @triton.jit
    def _step_gather_kernel(SRC, POS, DST, DST_POS, s_slot, s_layer, s_kv, s_head, s_seq,
                            HEADS: tl.constexpr, ROWS: tl.constexpr, ROW: tl.constexpr, C: tl.constexpr,
                            BLOCK_R: tl.constexpr):
        # One program: BLOCK_R rows (layer, kv, head) of slot b, at that slot's position.
        b = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < ROWS
        layer = r // (2 * HEADS)
        kv = (r // HEADS) % 2
        head = r % HEADS
        p = tl.load(POS + b)
        c = tl.arange(0, C)
        m = rm[:, None] & (c < ROW)[None, :]
        src = SRC + b * s_slot + layer * s_layer + kv * s_kv + head * s_head + p * s_seq
        x = tl.load(src[:, None] + c[None, :], mask=m)
        tl.store(DST + (b * ROWS + r)[:, None] * ROW + c[None, :], x, mask=m)
        if tl.program_id(1) == 0:
            tl.store(DST_POS + b, p)  # the positions travel with the data (see replicator.py)


def usable(cache: torch.Tensor) -> bool:
    return HAVE_TRITON and cache.is_cuda


def gather_step(src: torch.Tensor, positions: torch.Tensor, dst: torch.Tensor, dst_positions: torch.Tensor) -> None:
    """``dst[b, l, kv, h, :] = src[b, l, kv, h, positions[b], :]`` for ``src`` [slots, layers, 2, heads, max_seq,
    row] (any strides, unit stride along ``row``), ``dst`` contiguous with the same element type (device or
    pinned host memory), and ``dst_positions[b] = positions[b]`` (int64)."""
    n, layers, two, heads, _, row = src.shape
    assert two == 2 and src.stride(-1) == 1 and dst.is_contiguous() and dst.dtype == src.dtype
    rows = layers * 2 * heads
    _step_gather_kernel[(n, triton.cdiv(rows, BLOCK_R))](
        src, positions, dst, dst_positions, src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        src.stride(4), HEADS=heads, ROWS=rows, ROW=row, C=triton.next_power_of_2(row), BLOCK_R=BLOCK_R,
        num_warps=4)
