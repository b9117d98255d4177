"""StepReplicator, the per-step replication fast path: what it stores restores bit-identically, a ring
slot's reuse never touches an earlier step, and bad input is refused with a clear message."""

from __future__ import annotations

import pytest
import torch

import streaming_cases as cases
from dejavu.streaming import (ChunkError, LocalTransport, Partition, StepReplicator, StreamStats,
                              replicate_box, replicate_step, restore)

# Stage 1 of 2 (layers 3..5), TP shard 1 of 2 (heads 2..3), slot group 1 of 2 (global slots 2..3): every
# local index differs from its global one.
PART = Partition((3, 6), (2, 4), (2, 4))


def stage_cache(dtype, seed=0):
    return cases.global_cache(dtype, seed)[cases.WHOLE.local(PART.box((0, cases.MAX_SEQ)))].clone()


def equal(a, b):
    return torch.equal(a.view(cases.BITS[a.dtype]), b.view(cases.BITS[b.dtype]))


@pytest.mark.parametrize("dname", list(cases.DTYPES))
def test_steps_and_prompt_restore_bit_identically(dname):
    dtype = cases.DTYPES[dname]
    cache = stage_cache(dtype)
    transport, stats = LocalTransport(), StreamStats()
    rep = StepReplicator(cache, PART, transport, prefix="rep/s1/mb0/", depth=2, stats=stats)
    lengths = [5, 3]  # right-padded prompts: the two slots write different positions every step
    written = torch.zeros(cache.shape[:5], dtype=torch.bool)
    for layer in range(3):  # the prompt, one layer per step, through the same ring
        box = PART.box((0, 5)).with_(layers=(3 + layer, 4 + layer))
        rep.box(box, key=f"rep/s1/mb0/prompt/L{layer}")
        written[layer, ..., :5] = True
    steps = 5  # more than the ring holds
    for t in range(steps):
        pos = [n + t for n in lengths]
        # Host lists, [b, 1] int32 tensors (the shape of a decode's positions) and int64 tensors alike.
        given = [pos, torch.tensor(pos, dtype=torch.int32).view(2, 1), torch.tensor(pos)][t % 3]
        assert rep.step(given) == t
        for s, p in enumerate(pos):
            written[:, :, s, :, p] = True
    rep.wait()
    assert sorted(transport.keys()) == sorted([f"rep/s1/mb0/prompt/L{i}" for i in range(3)] +
                                              [f"rep/s1/mb0/t{t}" for t in range(steps)])
    fresh = torch.zeros_like(cache)
    assert restore(fresh, PART, transport, prefix="rep/s1/mb0/") == 3 + steps
    assert equal(fresh[written], cache[written])
    assert (fresh[~written].view(cases.BITS[dtype]) == 0).all()
    tally = stats.as_dict()["replication"]["local"]
    slice_bytes = 2 * 3 * 2 * 2 * cases.HEAD_DIM * dtype.itemsize  # slots x layers x kv x heads x head_dim
    prompt_bytes = 3 * 2 * 2 * 2 * 5 * cases.HEAD_DIM * dtype.itemsize
    assert tally["count"] == 3 + steps and tally["bytes"] == steps * slice_bytes + prompt_bytes


def test_ring_reuse_keeps_every_earlier_step():
    """depth=1: every step reuses the one staging slot; each stored step must still hold the values the
    cache had when it was replicated, although the cache has changed since."""
    cache = stage_cache(torch.bfloat16)
    transport = LocalTransport()
    rep = StepReplicator(cache, PART, transport, prefix="r/", depth=1)
    seen = []
    for t in range(4):
        pos = [7 - t, 2 + t]
        rep.step(pos)
        rep.wait()
        seen.append((pos, [cache[:, :, s, :, p].clone() for s, p in enumerate(pos)]))
        cache.view(torch.int16).add_(1)  # the stage goes on writing the cache
    fresh = torch.zeros_like(cache)
    assert restore(fresh, PART, transport, prefix="r/") == 4
    # Later steps rewrote no earlier step's positions here except where they coincide; check each step
    # against its own snapshot by restoring it alone.
    for t, (pos, rows) in enumerate(seen):
        one = torch.zeros_like(cache)
        assert restore(one, PART, transport, prefix=f"r/t{t}") == 1
        for s, p in enumerate(pos):
            assert equal(one[:, :, s, :, p], rows[s]), (t, s, p)


def test_subset_of_slots_and_a_resent_step():
    cache = stage_cache(torch.float16)
    transport = LocalTransport()
    rep = StepReplicator(cache, PART, transport, slots=[3], depth=3)  # global slot 3 = local slot 1
    rep.step([4], key="k")
    cache.view(torch.int16)[:, :, 1, :, 4] += 1
    rep.step([4], key="k")  # the same key again: replaced, not duplicated
    rep.wait()
    assert transport.keys() == ["k"]
    fresh = torch.zeros_like(cache)
    restore(fresh, PART, transport, prefix="k")
    assert equal(fresh[:, :, 1, :, 4], cache[:, :, 1, :, 4])
    assert (fresh[:, :, 0].view(torch.int16) == 0).all()


def test_mixes_with_generic_replication_chunks():
    cache = stage_cache(torch.float32)
    transport = LocalTransport()
    replicate_box(cache, PART, PART.box((0, 4)), transport, key="p/prompt").wait()
    replicate_step(cache, PART, [2, 3], [4, 6], transport, key="p/t0").wait()
    rep = StepReplicator(cache, PART, transport, prefix="p/", depth=4)
    rep.step([5, 7], key="p/t1")
    rep.wait()
    fresh = torch.zeros_like(cache)
    assert restore(fresh, PART, transport, prefix="p/") == 3
    assert equal(fresh[..., :4, :], cache[..., :4, :])
    for s, p in ((0, 4), (1, 6), (0, 5), (1, 7)):
        assert equal(fresh[:, :, s, :, p], cache[:, :, s, :, p])


def test_bad_input_is_refused_clearly():
    cache = stage_cache(torch.bfloat16)
    transport = LocalTransport()
    rep = StepReplicator(cache, PART, transport)
    with pytest.raises(ValueError, match=r"positions \[3, 12\] are outside the cache's 12 positions"):
        rep.step([3, cases.MAX_SEQ])
    with pytest.raises(ValueError, match="outside the cache"):
        rep.step(torch.tensor([-1, 2]))
    with pytest.raises(TypeError, match="positions must be integers"):
        rep.step([3.0, 4.0])
    with pytest.raises(TypeError, match="positions must be integers, got a torch.float32 tensor"):
        rep.step(torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match=r"got 3 positions for 2 slots \[2, 3\]"):
        rep.step([1, 2, 3])
    assert transport.keys() == [] and rep.steps == 0  # nothing half-done was stored
    with pytest.raises(ValueError, match="must be consecutive slots"):
        StepReplicator(cache, PART, transport, slots=[0, 1])  # global slots 0, 1 are not this partition's
    with pytest.raises(ValueError, match=r"cache holds \(layers, slots, heads\) = \(3, 2, 2\)"):
        StepReplicator(cache, Partition((0, 6), (2, 4), (2, 4)), transport)
    with pytest.raises(TypeError, match="copies straight into a host store"):
        StepReplicator(cache, PART, _NotAStore())
    rep.step([3, 4])
    rep.wait()
    wrong = torch.zeros(cache.shape, dtype=torch.float16)
    with pytest.raises(ChunkError, match="holds bfloat16 data; the cache is float16"):
        restore(wrong, PART, transport, prefix="t")


class _NotAStore:  # a point-to-point transport: nothing to copy into
    name = "dist"


@pytest.mark.parametrize("head_dim", [2, 3])  # rows of 4 bytes (moved as int32) and 6 (as fp16 itself)
def test_odd_row_sizes(head_dim):
    part = Partition((0, 1), (0, 1), (0, 3))  # 36-byte slices at head_dim 3: the positions are padded to 8
    cache = torch.randn(part.cache_shape(5, head_dim)).to(torch.float16)
    transport = LocalTransport()
    rep = StepReplicator(cache, part, transport)
    rep.step([4, 0, 2])
    fresh = torch.zeros_like(cache)
    assert restore(fresh, part, transport, prefix="t") == 1
    for s, p in enumerate([4, 0, 2]):
        assert equal(fresh[:, :, s, :, p], cache[:, :, s, :, p])


def test_reserved_buffers_are_the_stored_replicas():
    """reserve(): the steps land in buffers set up front (on a GPU each has its captured graph), which go
    back to the replicator when their key is dropped or re-sent; past them the transport gives buffers.
    Every stored step must restore exactly, whichever buffer it landed in."""
    cache = stage_cache(torch.bfloat16)
    transport = LocalTransport()
    rep = StepReplicator(cache, PART, transport, prefix="r/", depth=2, reserve=3)
    assert rep.reserved_steps == 4  # rounded up to whole rounds of the ring

    def address(key):
        return {b.key: b.data.data_ptr() for b in transport.fetch_all(key)}[key]

    snapshots = {}

    def step(t, key=None):
        pos = [(t + 2 * s) % cases.MAX_SEQ for s in range(2)]
        key = key or f"r/t{t}"
        rep.step(pos, key=key)
        rep.wait()
        snapshots[key] = (pos, [cache[:, :, s, :, p].clone() for s, p in enumerate(pos)])
        cache.view(torch.int16).add_(1)  # the stage goes on writing the cache

    for t in range(4):
        step(t)
    assert rep.overflow_steps == 0
    reserved = {address(f"r/t{t}") for t in range(4)}
    assert len(reserved) == 4
    step(4)  # past the reserve: the transport's own buffer
    assert rep.overflow_steps == 1 and address("r/t4") not in reserved
    old = address("r/t0")
    assert transport.drop("r/t0") == 1
    step(5)  # lands in the buffer t0 gave back
    assert rep.overflow_steps == 1 and address("r/t5") == old
    step(6, key="r/t5")  # re-sent: replaced, its old buffer handed back and reused
    assert rep.overflow_steps == 1 and sorted(transport.keys()) == ["r/t1", "r/t2", "r/t3", "r/t4", "r/t5"]
    del snapshots["r/t0"]
    for key, (pos, rows) in snapshots.items():
        one = torch.zeros_like(cache)
        assert restore(one, PART, transport, prefix=key) == 1
        for s, p in enumerate(pos):
            assert equal(one[:, :, s, :, p], rows[s]), (key, s, p)
    transport.drop("r/")
    for t in range(7, 11):  # every reserved buffer is back
        step(t)
    assert rep.overflow_steps == 1
