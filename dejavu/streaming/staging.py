"""Gather / scatter: non-contiguous regions of a cache buffer <-> contiguous buffers.

A transfer is cheapest as one contiguous copy. Most regions we ship are not contiguous in
``data[layer, kv, slot, head, position, head_dim]``: one token step's slice is one position out of
``max_seq`` in every (layer, kv, slot, head); a prompt of P < max_seq positions is P rows out of every
``max_seq``; a TP shard or a slot subset cuts the other axes. Gathering such a region into a staging
buffer is one strided copy on the device (one kernel on a GPU), after which the transfer is one copy.

Two kinds of region:

- :class:`~dejavu.streaming.plan.Box`: ranges on every axis (handover chunks, prompt caches, swaps);
  gathered in cache layout ``[layers, kv, slots, heads, positions, head_dim]``.
- :class:`StepSlice`: one token step, where slot ``b`` wrote position ``positions[b]`` (slots are
  right-padded, so their positions differ); gathered as ``[slots, layers, kv, heads, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Box, Partition, Range


def region(data: torch.Tensor, part: Partition, box: Box) -> torch.Tensor:
    """The (usually strided) view of ``box`` in a cache buffer that holds ``part``."""
    return data[part.local(box)]


def gather(data: torch.Tensor, part: Partition, box: Box, out: torch.Tensor | None = None) -> torch.Tensor:
    """``box`` as a contiguous tensor: the view itself when already contiguous, else copied into ``out``."""
    view = region(data, part, box)
    if out is None:
        return view.contiguous()
    out.copy_(view, non_blocking=True)
    return out


def scatter(data: torch.Tensor, part: Partition, box: Box, src: torch.Tensor) -> None:
    region(data, part, box).copy_(src.view(box.shape(data.shape[-1])), non_blocking=True)


@dataclass(frozen=True)
class StepSlice:
    """One token step of a stage's cache: slot ``slots[i]`` at position ``positions[i]``, every layer."""

    layers: Range
    heads: Range
    slots: tuple[int, ...]
    positions: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(int(s) for s in self.slots))
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if not self.slots or len(self.slots) != len(self.positions):
            raise ValueError(f"a step slice needs one position per slot, got {len(self.slots)} slots and "
                             f"{len(self.positions)} positions")

    @classmethod
    def of(cls, part: Partition, slots, positions) -> "StepSlice":
        """The step slice of every layer and head ``part`` holds (slots are global)."""
        return cls(part.layers, part.heads, tuple(slots), tuple(positions))

    def shape(self, head_dim: int) -> tuple[int, ...]:
        return (len(self.slots), self.layers[1] - self.layers[0], 2, self.heads[1] - self.heads[0], head_dim)

    def _local(self, part: Partition) -> tuple[slice, slice, list[int]]:
        box = Box(self.layers, self.heads, (min(self.slots), max(self.slots) + 1),
                  (min(self.positions), max(self.positions) + 1))
        if not part.holds(box):
            raise ValueError(f"step slice {self} is not inside partition {part}")
        lo, ho = self.layers[0] - part.layers[0], self.heads[0] - part.heads[0]
        return (slice(lo, lo + self.layers[1] - self.layers[0]), slice(ho, ho + self.heads[1] - self.heads[0]),
                [x - part.slots[0] for x in self.slots])

    def _index(self, data: torch.Tensor, part: Partition):
        layers, heads, slots = self._local(part)
        # One [2, n] index tensor, moved through pinned memory without blocking: a pageable copy would
        # make the host wait for the GPU, and a token step must never stall the stage's queued work.
        idx = torch.tensor([slots, list(self.positions)], dtype=torch.long)
        if data.is_cuda:
            idx = idx.pin_memory().to(data.device, non_blocking=True)
        # Two index tensors separated by a slice: advanced indexing puts the paired (slot, position)
        # dimension first, giving [n, layers, kv, heads, head_dim] in one gather kernel.
        return (layers, slice(None), idx[0], heads, idx[1])

    def to_meta(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "slots": list(self.slots),
                "positions": list(self.positions)}

    @classmethod
    def from_meta(cls, meta: dict) -> "StepSlice":
        return cls(tuple(meta["layers"]), tuple(meta["heads"]), tuple(meta["slots"]), tuple(meta["positions"]))


def gather_step(data: torch.Tensor, part: Partition, step: StepSlice) -> torch.Tensor:
    """The step slice as a new contiguous tensor [slots, layers, kv, heads, head_dim]."""
    if data.is_cuda:
        return data[step._index(data, part)]  # one gather kernel
    # On the CPU one strided copy per slot beats the generic index kernel by far.
    layers, heads, slots = step._local(part)
    out = torch.empty(step.shape(data.shape[-1]), dtype=data.dtype)
    for i, (s, p) in enumerate(zip(slots, step.positions)):
        out[i].copy_(data[layers, :, s, heads, p])
    return out


def scatter_step(data: torch.Tensor, part: Partition, step: StepSlice, src: torch.Tensor) -> None:
    src = src.view(step.shape(data.shape[-1]))
    if data.is_cuda:
        data[step._index(data, part)] = src.to(data.device)
        return
    layers, heads, slots = step._local(part)
    for i, (s, p) in enumerate(zip(slots, step.positions)):
        data[layers, :, s, heads, p].copy_(src[i])


class StagingPool:
    """Reusable flat byte buffers on one device, handed out as typed views.

    Slot ``i`` is one buffer that grows to the largest request it has seen; callers index slots
    round-robin and make sure the transfer that last used a slot has finished before reusing it.
    """

    def __init__(self, device: torch.device | str, pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.pin_memory = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        self._slots: list[torch.Tensor] = []
        self._views: dict[tuple, torch.Tensor] = {}

    def take(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        view = self._views.get((index, shape, dtype))  # a token step asks for the same views every step
        if view is not None:
            return view
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        while len(self._slots) <= index:
            self._slots.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._slots[index].numel() < nbytes:
            self._slots[index] = torch.empty(nbytes, dtype=torch.uint8, device=self.device,
                                             pin_memory=self.pin_memory)
            self._views = {k: v for k, v in self._views.items() if k[0] != index}
        view = self._slots[index][:nbytes].view(dtype).view(shape)
        self._views[(index, shape, dtype)] = view
        return view

    def nbytes(self) -> int:
        return sum(s.numel() for s in self._slots)
