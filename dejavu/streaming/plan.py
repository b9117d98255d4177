"""Which piece of KV cache goes from which sender partition to which receiver partition.

Everything here is in *global* coordinates: model layer, model KV head, batch slot and absolute token
position. A :class:`Partition` says which block of that space one cache buffer holds (a pipeline stage's
layer range, a tensor-parallel shard of the KV heads, the slots of a microbatch) and turns a global
:class:`Box` into indices of its own buffer ``data[layer, kv, slot, head, position, head_dim]``.

:func:`make_plan` intersects every sender with every receiver. Because each side's partitions tile the
same block (checked), the non-empty intersections deliver every layer x head x slot x position exactly
once, whatever the stage counts or TP degrees on either side.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

Range = tuple[int, int]  # half-open [lo, hi)


def _check_range(name: str, r: Range) -> Range:
    lo, hi = r
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
        raise ValueError(f"{name} range {r!r} is invalid; need integers 0 <= lo < hi")
    return (lo, hi)


def _overlap(a: Range, b: Range) -> Range | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


@dataclass(frozen=True)
class Box:
    """A box of the global cache index space; head_dim is always whole."""

    layers: Range
    heads: Range
    slots: Range
    positions: Range
    kv: Range = (0, 2)

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "slots", "positions", "kv"):
            object.__setattr__(self, name, _check_range(name, tuple(getattr(self, name))))
        if self.kv[1] > 2:
            raise ValueError(f"kv range {self.kv} is outside (0 = keys, 1 = values)")

    def intersect(self, other: "Box") -> "Box | None":
        parts = [_overlap(getattr(self, n), getattr(other, n)) for n in ("layers", "heads", "slots", "positions", "kv")]
        return None if any(p is None for p in parts) else Box(*parts)

    def count(self) -> int:
        """Number of (layer, kv, slot, head, position) cells, i.e. elements / head_dim."""
        n = 1
        for lo, hi in (self.layers, self.kv, self.slots, self.heads, self.positions):
            n *= hi - lo
        return n

    def shape(self, head_dim: int) -> tuple[int, ...]:
        """Shape of the box in cache layout [layers, kv, slots, heads, positions, head_dim]."""
        return tuple(hi - lo for lo, hi in (self.layers, self.kv, self.slots, self.heads, self.positions)) + (head_dim,)

    def with_(self, **ranges: Range) -> "Box":
        return Box(**{**self.to_meta(), **ranges})

    def split_layers(self) -> list["Box"]:
        return [self.with_(layers=(l, l + 1)) for l in range(*self.layers)]

    def split_kv(self) -> list["Box"]:
        return [self.with_(kv=(k, k + 1)) for k in range(*self.kv)]

    def name(self) -> str:
        """Stable, file-name-safe name, e.g. ``L0-4.K0-2.S0-8.H0-4.P0-128`` (parsed back by :meth:`parse`)."""
        return ".".join(f"{t}{lo}-{hi}" for t, (lo, hi) in
                        zip("LKSHP", (self.layers, self.kv, self.slots, self.heads, self.positions)))

    @classmethod
    def parse(cls, name: str) -> "Box":
        m = re.fullmatch(r"L(\d+)-(\d+)\.K(\d+)-(\d+)\.S(\d+)-(\d+)\.H(\d+)-(\d+)\.P(\d+)-(\d+)", name)
        if not m:
            raise ValueError(f"{name!r} is not a box name like 'L0-4.K0-2.S0-8.H0-4.P0-128'")
        v = [int(x) for x in m.groups()]
        return cls(layers=(v[0], v[1]), kv=(v[2], v[3]), slots=(v[4], v[5]), heads=(v[6], v[7]), positions=(v[8], v[9]))

    def to_meta(self) -> dict[str, Range]:
        return {"layers": self.layers, "heads": self.heads, "slots": self.slots, "positions": self.positions,
                "kv": self.kv}

    @classmethod
    def from_meta(cls, meta: dict) -> "Box":
        return cls(**{k: tuple(v) for k, v in meta.items()})


@dataclass(frozen=True)
class Partition:
    """The block of the global (layer, head, slot) space one cache buffer holds; all positions are held.

    Local index = global index - range start, on every axis: layer ``layers[0]`` is the buffer's layer 0,
    slot ``slots[0]`` its slot 0, head ``heads[0]`` its head 0. Positions are absolute on both sides.
    """

    layers: Range
    heads: Range
    slots: Range

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "slots"):
            object.__setattr__(self, name, _check_range(name, tuple(getattr(self, name))))

    @classmethod
    def shard(cls, layers: Range, *, num_kv_heads: int, tp_rank: int = 0, tp_size: int = 1,
              slots: Range) -> "Partition":
        """A pipeline stage's layer range and one tensor-parallel shard of the KV heads."""
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank={tp_rank} is not a rank of tp_size={tp_size}")
        if num_kv_heads % tp_size:
            raise ValueError(f"tp_size={tp_size} does not divide num_kv_heads={num_kv_heads}; "
                             f"each TP shard must hold whole KV heads")
        per = num_kv_heads // tp_size
        return cls(layers=layers, heads=(tp_rank * per, (tp_rank + 1) * per), slots=slots)

    def box(self, positions: Range) -> Box:
        return Box(layers=self.layers, heads=self.heads, slots=self.slots, positions=positions)

    def holds(self, box: Box) -> bool:
        return all(getattr(self, n)[0] <= getattr(box, n)[0] and getattr(box, n)[1] <= getattr(self, n)[1]
                   for n in ("layers", "heads", "slots"))

    def local(self, box: Box) -> tuple[slice, ...]:
        """Index of ``box`` in this partition's buffer ``data[layer, kv, slot, head, position]``."""
        if not self.holds(box):
            raise ValueError(f"box {box.name()} is not inside partition {self}")
        l, s, h = self.layers[0], self.slots[0], self.heads[0]
        return (slice(box.layers[0] - l, box.layers[1] - l), slice(*box.kv),
                slice(box.slots[0] - s, box.slots[1] - s), slice(box.heads[0] - h, box.heads[1] - h),
                slice(*box.positions))

    def cache_shape(self, max_seq: int, head_dim: int) -> tuple[int, ...]:
        return (self.layers[1] - self.layers[0], 2, self.slots[1] - self.slots[0],
                self.heads[1] - self.heads[0], max_seq, head_dim)


def pipeline(layer_ranges: Sequence[Range], *, num_kv_heads: int, tp_size: int = 1,
             slots: Range) -> list[Partition]:
    """Partitions of a pipeline: stage-major, TP rank minor (index = stage * tp_size + tp_rank)."""
    return [Partition.shard(r, num_kv_heads=num_kv_heads, tp_rank=t, tp_size=tp_size, slots=slots)
            for r in layer_ranges for t in range(tp_size)]


@dataclass(frozen=True)
class Chunk:
    src: int  # index into the plan's senders
    dst: int  # index into the plan's receivers
    box: Box


@dataclass(frozen=True)
class Plan:
    senders: tuple[Partition, ...]
    receivers: tuple[Partition, ...]
    positions: Range
    chunks: tuple[Chunk, ...]

    def outgoing(self, src: int) -> list[Chunk]:
        return [c for c in self.chunks if c.src == src]

    def incoming(self, dst: int) -> list[Chunk]:
        return [c for c in self.chunks if c.dst == dst]

    @functools.cached_property
    def memo(self) -> dict:
        """What callers derive from this plan, kept with it (stream.py's message lists): a token step
        replays the same plan object every step, and looking it up by identity costs nothing, where
        hashing a frozen plan walks every chunk. (cached_property writes the instance dict directly,
        so this works on a frozen dataclass and takes no part in equality or hashing.)"""
        return {}


def _bounds(parts: Sequence[Partition]) -> tuple[Range, Range, Range]:
    return tuple((min(getattr(p, n)[0] for p in parts), max(getattr(p, n)[1] for p in parts))
                 for n in ("layers", "heads", "slots"))


def _check_tiling(parts: Sequence[Partition], side: str) -> tuple[Range, Range, Range]:
    if not parts:
        raise ValueError(f"no {side} partitions")
    for i, a in enumerate(parts):
        for j in range(i + 1, len(parts)):
            b = parts[j]
            if all(_overlap(getattr(a, n), getattr(b, n)) for n in ("layers", "heads", "slots")):
                raise ValueError(f"{side} partitions {i} and {j} overlap: {a} and {b}; "
                                 f"each cache cell must have exactly one {side}")
    bounds = _bounds(parts)
    volume = 1
    for lo, hi in bounds:
        volume *= hi - lo
    covered = sum((p.layers[1] - p.layers[0]) * (p.heads[1] - p.heads[0]) * (p.slots[1] - p.slots[0]) for p in parts)
    if covered != volume:
        raise ValueError(f"{side} partitions leave holes: they cover {covered} of the {volume} "
                         f"(layer, head, slot) cells of layers {bounds[0]}, heads {bounds[1]}, slots {bounds[2]}")
    return bounds


def make_plan(senders: Iterable[Partition], receivers: Iterable[Partition], positions: Range) -> Plan:
    """Chunks from every sender to every receiver for the positions ``[lo, hi)``.

    Both sides must tile the same block of (layers, heads, slots), each without overlap or holes.
    Chunks are ordered by (src, dst), so both sides enumerate them identically.
    """
    senders, receivers = tuple(senders), tuple(receivers)
    positions = _check_range("positions", tuple(positions))
    sb, rb = _check_tiling(senders, "sender"), _check_tiling(receivers, "receiver")
    if sb != rb:
        raise ValueError(f"sender partitions cover layers {sb[0]}, heads {sb[1]}, slots {sb[2]} but receiver "
                         f"partitions cover layers {rb[0]}, heads {rb[1]}, slots {rb[2]}; both must cover the same")
    chunks = []
    for i, s in enumerate(senders):
        for j, r in enumerate(receivers):
            box = s.box(positions).intersect(r.box(positions))
            if box is not None:
                chunks.append(Chunk(i, j, box))
    return Plan(senders, receivers, positions, tuple(chunks))
