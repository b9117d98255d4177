"""The chunk planner delivers every layer x head x slot x position exactly once, for any partitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dejavu.streaming import (LADDER, Box, LocalTransport, Partition, StreamOptions, make_plan, messages,
                              stream_in, stream_out)


def cuts(draw, n: int, max_parts: int) -> list[tuple[int, int]]:
    inner = draw(st.sets(st.integers(1, n - 1), max_size=max_parts - 1)) if n > 1 else set()
    edges = [0, *sorted(inner), n]
    return list(zip(edges, edges[1:]))


@st.composite
def side(draw, layers: int, heads: int, slots: int) -> list[Partition]:
    tp = draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0]))
    per = heads // tp
    layer_ranges = cuts(draw, layers, 5)
    slot_ranges = cuts(draw, slots, 3)
    parts = [Partition(l, (t * per, (t + 1) * per), s) for l in layer_ranges for t in range(tp) for s in slot_ranges]
    return draw(st.permutations(parts))  # the planner must not rely on any order


@st.composite
def problems(draw):
    layers, heads = draw(st.integers(1, 12)), draw(st.sampled_from([1, 2, 4, 8]))
    slots_lo = draw(st.integers(0, 3))
    slots = draw(st.integers(1, 6))
    lo = draw(st.integers(0, 10))
    hi = draw(st.integers(lo + 1, 16))
    shift = lambda ps: [Partition(p.layers, p.heads, (p.slots[0] + slots_lo, p.slots[1] + slots_lo)) for p in ps]  # noqa: E731
    return (layers, heads, (slots_lo, slots_lo + slots), (lo, hi),
            shift(draw(side(layers, heads, slots))), shift(draw(side(layers, heads, slots))))


@settings(max_examples=300, deadline=None)
@given(problems())
def test_plan_is_an_exact_cover(problem):
    layers, heads, slots, positions, senders, receivers = problem
    plan = make_plan(senders, receivers, positions)
    count = np.zeros((layers, 2, heads, slots[1], positions[1]), dtype=np.int64)
    for c in plan.chunks:
        assert plan.senders[c.src].holds(c.box) and plan.receivers[c.dst].holds(c.box)
        b = c.box
        count[slice(*b.layers), slice(*b.kv), slice(*b.heads), slice(*b.slots), slice(*b.positions)] += 1
    region = count[:, :, :, slots[0]:slots[1], positions[0]:positions[1]]
    assert (region == 1).all(), "some cell is delivered zero or several times"
    assert count.sum() == region.sum(), "a chunk strays outside the region"
    # No empty or duplicate (src, dst) pairs: intersections are boxes, one per overlapping pair.
    assert len({(c.src, c.dst) for c in plan.chunks}) == len(plan.chunks)


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(LADDER))
def test_messages_cut_chunks_exactly_and_round_trip(problem, mode):
    layers, heads, slots, positions, senders, receivers = problem
    plan = make_plan(senders, receivers, positions)
    opts = StreamOptions.named(mode)
    msgs = messages(plan, opts, "p")
    assert [m.tag for m in msgs] == list(range(len(msgs)))
    assert len({m.key for m in msgs}) == len(msgs)
    for ci, c in enumerate(plan.chunks):
        assert sum(m.box.count() for m in msgs if m.chunk == c) == c.box.count()
    if mode == "layerwise":  # issued in layer order, so a stage can ship layer l while computing l+1
        assert [m.box.layers[0] for m in msgs] == sorted(m.box.layers[0] for m in msgs)

    # And the bytes land where they belong (local transport, one process).
    max_seq, dim = positions[1] + 1, 2
    whole = Partition((0, layers), (0, heads), slots)
    g = torch.arange(layers * 2 * (slots[1] - slots[0]) * heads * max_seq * dim, dtype=torch.float32)
    g = g.view(layers, 2, slots[1] - slots[0], heads, max_seq, dim)
    t = LocalTransport()
    for i, p in enumerate(plan.senders):
        stream_out(g[whole.local(p.box((0, max_seq)))].clone(), plan, i, t, prefix="x", options=opts).wait()
    for j, p in enumerate(plan.receivers):
        c = torch.full(p.cache_shape(max_seq, dim), -1.0)
        stream_in(c, plan, j, t, prefix="x", options=opts).wait()
        want = g[whole.local(p.box((0, max_seq)))]
        lo, hi = positions
        assert torch.equal(c[..., lo:hi, :], want[..., lo:hi, :])
        assert (c[..., :lo, :] == -1).all() and (c[..., hi:, :] == -1).all()


def test_overlapping_senders_are_rejected():
    a = Partition((0, 3), (0, 4), (0, 2))
    b = Partition((2, 4), (0, 4), (0, 2))
    with pytest.raises(ValueError, match="sender partitions 0 and 1 overlap"):
        make_plan([a, b], [Partition((0, 4), (0, 4), (0, 2))], (0, 5))


def test_holes_are_rejected():
    with pytest.raises(ValueError, match="receiver partitions leave holes"):
        make_plan([Partition((0, 4), (0, 4), (0, 2))],
                  [Partition((0, 2), (0, 4), (0, 2)), Partition((3, 4), (0, 4), (0, 2))], (0, 5))


def test_sides_must_cover_the_same_model():
    with pytest.raises(ValueError, match="both must cover the same"):
        make_plan([Partition((0, 4), (0, 4), (0, 2))], [Partition((0, 6), (0, 4), (0, 2))], (0, 5))


def test_bad_ranges_and_shards_are_named():
    with pytest.raises(ValueError, match="positions range"):
        make_plan([Partition((0, 4), (0, 4), (0, 2))], [Partition((0, 4), (0, 4), (0, 2))], (5, 5))
    with pytest.raises(ValueError, match="does not divide num_kv_heads=4"):
        Partition.shard((0, 4), num_kv_heads=4, tp_rank=0, tp_size=3, slots=(0, 2))
    with pytest.raises(ValueError, match="layers range"):
        Partition((4, 2), (0, 4), (0, 2))
    with pytest.raises(ValueError, match="unknown streaming mode 'fast'"):
        StreamOptions.named("fast")


def test_box_names_round_trip():
    b = Box(layers=(2, 5), heads=(0, 4), slots=(1, 3), positions=(7, 9), kv=(1, 2))
    assert Box.parse(b.name()) == b and Box.from_meta(b.to_meta()) == b
    with pytest.raises(ValueError, match="not a box name"):
        Box.parse("L0-1")
