"""The worker's KV buffer pool: buffers reused across microbatches give the engine's tokens.

A reused buffer still holds the previous microbatch's keys and values, and a microbatch smaller than
the buffer runs in part of it; neither may change a token. On a GPU the same is checked through the
pool's CUDA graphs, decode and prefill (skipped without one).
"""

from __future__ import annotations

import pytest
import torch

from dejavu.engine import Engine
from dejavu.sampling import SamplingParams
from dejavu.worker.cache_pool import CachePool
from pool_harness import decode, one_stage, prefill


def _greedy_through_pool(pool: CachePool, ubatch: int, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Prefill and decode one microbatch the way a single-stage worker does, through a leased buffer."""
    lease, lens, outs = prefill(pool, ubatch, prompts, new)
    for k in range(new - 1):
        decode(pool, lease, lens, k, outs)
    pool.release(ubatch)
    return outs


def _workload(vocab: int):
    g = torch.Generator().manual_seed(3)
    big = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 4, 12, 7)]
    small = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 11, 3)]
    return big, small


def _check(stage, pool: CachePool) -> None:
    eng = Engine([stage], cuda_graphs=False)
    big, small = _workload(stage.cfg.vocab_size)
    for ubatch, prompts in enumerate([big, small, big, small]):
        got = _greedy_through_pool(pool, ubatch, prompts, new=6)
        want = [g.output_ids for g in eng.generate(prompts, SamplingParams(max_new_tokens=6))]
        assert got == want, f"microbatch {ubatch} ({len(prompts)} of {pool.batch} slots)"
    assert pool.allocated == 1, "one buffer should have served every microbatch in turn"


def test_reused_and_partly_filled_buffers_give_the_engine_tokens(tiny_checkpoint):
    stage = one_stage(tiny_checkpoint("llama-gqa-bias"))
    _check(stage, CachePool(stage, batch=4))


def test_pool_refuses_what_does_not_fit(tiny_checkpoint):
    stage = one_stage(tiny_checkpoint("opt-pre"))
    pool = CachePool(stage, batch=2, round_to=16)
    assert pool.acquire(0, 2, 16).cache.shape.max_seq == 16
    with pytest.raises(ValueError, match="already holds"):
        pool.acquire(0, 1, 16)
    with pytest.raises(ValueError, match="--ubatch_size"):
        pool.acquire(1, 3, 16)
    pool.release(0)
    # A longer microbatch than the free buffer holds gets a new, longer buffer.
    lease = pool.acquire(2, 2, 100)
    assert lease.cache.shape.max_seq >= 100 and pool.allocated == 2 and not pool.free
    with pytest.raises(ValueError, match="CUDA"):
        CachePool(stage, batch=2, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["llama-gqa-bias", "opt-pre"])
def test_graph_decode_in_pooled_buffers_gives_the_engine_tokens(tiny_checkpoint, name):
    stage = one_stage(tiny_checkpoint(name), device="cuda")
    pool = CachePool(stage, batch=4, cuda_graphs=True)
    _check(stage, pool)
    # Every prefill was short: each ran through the buffer's one graph for its padded length (the
    # 3-request microbatches with a spare slot of padding).
    graphs = pool.free[0].prefill
    assert graphs.replays == 4 and list(graphs.graphs) == [(4, 64)]
