"""Microbatch swapping (dejavu/worker/swap.py): more microbatches in flight than KV buffers on the device.

In-process: the swapping pool gives the engine's tokens with microbatches entering and leaving, its
swaps are counted, a swapped-out cache can be read wherever it lives, and the start-up memory plan
refuses what does not fit with the numbers. End to end: tests/runners/test_swapping_runs.py.
"""

from __future__ import annotations

import pytest
import torch

from dejavu.engine import Engine
from dejavu.sampling import SamplingParams
from dejavu.streaming import StreamStats
from dejavu.worker.cache_pool import CachePool, KVPoolOptions, make_pool
from dejavu.worker.swap import SwappingPool, fmt_bytes
from pool_harness import decode, one_stage, prefill

MODEL = "llama-gqa-bias"
NEW = 8


def _serve(pool, ubatches: list[list[list[int]]], inflight: int, new: int = NEW) -> dict[int, list[list[int]]]:
    """One stage serving microbatches the way a leader schedules them: up to ``inflight`` at once, a decode
    step each in turn, a new one entering as soon as one finishes."""
    queue, active, state, outs = list(range(len(ubatches))), [], {}, {}
    while queue or active:
        while queue and len(active) < inflight:
            u = queue.pop(0)
            lease, lens, outs[u] = prefill(pool, u, ubatches[u], new)
            state[u], active = (lease, lens, 0), active + [u]
        u = active.pop(0)
        lease, lens, k = state[u]
        decode(pool, lease, lens, k, outs[u])
        state[u] = (lease, lens, k + 1)
        if k + 2 >= new:
            pool.release(u)
        else:
            active.append(u)
    return outs


def _ubatches(vocab: int):
    g = torch.Generator().manual_seed(3)
    return [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in ns]
            for ns in ((9, 4), (12, 7), (5,), (11, 3), (6, 6))]


def test_swapping_pool_gives_the_engine_tokens_with_two_resident_buffers(tiny_checkpoint):
    stage = one_stage(tiny_checkpoint(MODEL))
    ubatches = _ubatches(stage.cfg.vocab_size)
    eng = Engine([stage], cuda_graphs=False)
    want = {u: [g.output_ids for g in eng.generate(p, SamplingParams(max_new_tokens=NEW))]
            for u, p in enumerate(ubatches)}
    stats = StreamStats()
    pool = make_pool(stage, 2, options=KVPoolOptions(swapping=True, resident=2, inflight=4), stats=stats)
    assert isinstance(pool, SwappingPool) and pool.warm_buffers(4) == 2
    pool.plan(40)
    assert _serve(pool, ubatches, inflight=4) == want
    r = pool.report()
    assert r["buffers"] == 2 and r["peak_device_kv_bytes"] == 2 * r["buffer_bytes"]
    assert r["swaps_out"] > 0 and r["swaps_in"] > 0 and r["swap_jobs"] > 0
    assert 0 < r["peak_host_swap_bytes"] <= 4 * r["buffer_bytes"]
    assert r["decode_steps"] > 0 and r["swap_to_step"] is not None and 0 <= r["hidden_share"] <= 1
    tally = stats.as_dict()["swap"]["local"]
    assert tally["count"] == r["swaps_out"] + r["swaps_in"]
    assert tally["bytes"] == r["swap_out_bytes"] + r["swap_in_bytes"]
    assert not pool.leases and not pool.homes and pool.host.keys() == []  # every host block returned
    # Without swapping the same schedule needs a buffer per microbatch in flight.
    base = CachePool(stage, 2, options=KVPoolOptions(inflight=4))
    assert _serve(base, ubatches, inflight=4) == want and base.allocated == 4


def test_a_swapped_out_cache_can_be_read_and_brought_back(tiny_checkpoint):
    stage = one_stage(tiny_checkpoint(MODEL))
    pool = SwappingPool(stage, 2, options=KVPoolOptions(swapping=True, resident=2, inflight=3))
    pool.plan(32)
    for u in range(3):  # each microbatch writes its own number into its cache during its turn
        pool.acquire(u, 2, 32).cache.data.fill_(float(u + 1))
    pool.acquire(3, 2, 32)  # a fourth enters: the caches of the others move to host memory
    for u in range(3):
        whole = pool.cache_of(u)
        assert bool((whole[:, :, :2] == u + 1).all()), f"microbatch {u}: {whole.device}"
    assert sum(u in pool.where for u in range(4)) == 2 and any(u in pool.homes for u in range(3))
    lease = pool.make_resident(0)
    assert 0 in pool.where and lease.buffer is pool.where[0].buffer
    assert bool((lease.cache.data == 1).all())


def test_the_memory_plan_refuses_what_does_not_fit_with_the_numbers(tiny_checkpoint):
    stage = one_stage(tiny_checkpoint(MODEL))
    buf = stage.cache_shape(2, 128).numel() * 4  # one microbatch of 2 at 128 positions (the model's), fp32
    # Three in flight, room for two: refused without swapping, with the numbers and the way out.
    pool = CachePool(stage, 2, options=KVPoolOptions(inflight=3, budget_bytes=int(2.5 * buf)))
    with pytest.raises(ValueError) as e:
        pool.plan(40)
    msg = str(e.value)
    for part in ("3 microbatches in flight", "--kv_memory_gb", "--swapping", "room for 2", fmt_bytes(3 * buf)):
        assert part in msg, (part, msg)
    SwappingPool(stage, 2, options=KVPoolOptions(swapping=True, inflight=3, budget_bytes=int(2.5 * buf))).plan(40)
    with pytest.raises(ValueError, match="less than one microbatch"):
        CachePool(stage, 2, options=KVPoolOptions(inflight=3, budget_bytes=buf // 2)).plan(40)
    with pytest.raises(ValueError, match="resident KV buffers"):
        SwappingPool(stage, 2, options=KVPoolOptions(swapping=True, resident=3, inflight=4,
                                                     budget_bytes=int(2.5 * buf))).plan(40)
    swap = SwappingPool(stage, 2, options=KVPoolOptions(swapping=True, inflight=10 ** 9))
    with pytest.raises(ValueError, match="MemAvailable"):
        swap.plan(40)
    # The resident buffers are sized once: a longer microbatch is refused naming --max_seq_len.
    swap = SwappingPool(stage, 2, round_to=16, options=KVPoolOptions(swapping=True, inflight=3))
    swap.plan(32)
    with pytest.raises(ValueError, match="--max_seq_len"):
        swap.acquire(0, 2, 64)


def test_worker_flags():
    from dejavu.cli_serving import worker_parser
    from dejavu.worker.main import WorkerOptions, check_options

    text = worker_parser().format_help()
    for flag in ("--swapping", "--resident_buffers", "--inflight_ubatches", "--kv_memory_gb"):
        assert flag in text
    args = vars(worker_parser().parse_args(["--ckpt_path", "x", "--swapping", "--resident_buffers", "3"]))
    check_options(WorkerOptions(**args))
    for bad, name in ((["--resident_buffers", "1"], "--resident_buffers"), (["--kv_memory_gb", "0"], "--kv_memory_gb"),
                      (["--inflight_ubatches", "0"], "--inflight_ubatches")):
        with pytest.raises(ValueError, match=name):
            check_options(WorkerOptions(**vars(worker_parser().parse_args(["--ckpt_path", "x", *bad]))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["llama-gqa-bias", "opt-pre"])
def test_swapping_with_cuda_graphs_gives_the_engine_tokens(tiny_checkpoint, name):
    folder = tiny_checkpoint(name)
    stage = one_stage(folder, device="cuda")
    ubatches = _ubatches(stage.cfg.vocab_size)
    eng = Engine([stage], cuda_graphs=False)
    want = {u: [g.output_ids for g in eng.generate(p, SamplingParams(max_new_tokens=NEW))]
            for u, p in enumerate(ubatches)}
    pool = SwappingPool(stage, 2, cuda_graphs=True, options=KVPoolOptions(swapping=True, resident=2, inflight=4))
    pool.plan(40)
    # As a worker warms up: capture the decode graph of each resident buffer once.
    leases = [pool.acquire(-1 - i, 2, 40) for i in range(pool.warm_buffers(4))]
    for lease in leases:
        pool.decode(lease, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), None)
    for i in range(len(leases)):
        pool.release(-1 - i)
    assert all(s.buffer.graph is not None for s in pool.slots)
    graphs = [s.buffer.graph for s in pool.slots]
    assert _serve(pool, ubatches, inflight=4) == want
    assert [s.buffer.graph for s in pool.slots] == graphs  # swapped into, never re-captured
    r = pool.report()
    assert r["swaps_in"] > 0 and r["peak_device_kv_bytes"] == 2 * r["buffer_bytes"] and r["swap_in_GBps"] > 0
    assert pool.host.pinned_allocs >= 1  # the host blocks were pinned at start-up (plan)
