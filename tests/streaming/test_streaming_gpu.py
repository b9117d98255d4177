"""The GPU code paths (side stream + events, pinned host memory, gloo/MPI staging through the host,
NCCL): the same bit-identical round trips with caches on CUDA. Skipped where there is no GPU."""

from __future__ import annotations

import contextlib
import gc
import shutil
import subprocess
import sys
import time

import pytest
import torch

import streaming_cases as cases
from dejavu.streaming import driver
from dejavu.streaming import (LADDER, LocalTransport, Partition, StepReplicator, StreamOptions, StreamStats,
                              replicate_box, replicate_step, restore, stream_in, stream_out, swap_in, swap_out)
from test_streaming_procs import PEER, env, free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("layout", list(cases.LAYOUTS))
def test_local_round_trip_on_gpu(layout):
    transport, plan = LocalTransport(), cases.plan_for(layout)
    for dname, dtype in cases.DTYPES.items():
        for mode in LADDER:
            opts = StreamOptions.named(mode)
            handles = [stream_out(c, plan, i, transport, prefix=f"{dname}/{mode}", options=opts)
                       for i, c in enumerate(cases.sender_caches(plan, dtype, device="cuda"))]
            for h in handles:  # all in flight at once, on the side stream
                h.wait()
            received = cases.receiver_caches(plan, dtype, device="cuda")
            for j, c in enumerate(received):
                stream_in(c, plan, j, transport, prefix=f"{dname}/{mode}", options=opts).wait()
            torch.cuda.synchronize()
            cases.check_received(plan, received, dtype)


def test_swap_and_replication_on_gpu():
    transport, stats = LocalTransport(), StreamStats()
    cache = cases.global_cache(torch.bfloat16).cuda()
    original = cache.clone()
    swap_out(cache, transport, "swap/mb0", stats=stats).wait()
    cache.zero_()
    swap_in(cache, transport, "swap/mb0", stats=stats).wait()
    torch.cuda.synchronize()
    assert torch.equal(cache.view(torch.int16), original.view(torch.int16))
    assert transport._store["swap/mb0"].buf.is_pinned()

    part = cases.WHOLE
    replicate_box(cache, part, part.box((0, 4)), transport, key="rep/prompt").wait()
    for t in range(3):
        replicate_step(cache, part, range(cases.SLOTS), [4 + t + s % 2 for s in range(cases.SLOTS)], transport,
                       key=f"rep/t{t}").wait()
    fresh = torch.zeros_like(cache)
    assert restore(fresh, part, transport, prefix="rep/") == 4
    assert torch.equal(fresh[..., :4, :].view(torch.int16), cache[..., :4, :].view(torch.int16))
    for s in range(cases.SLOTS):
        for t in range(3):
            p = 4 + t + s % 2
            assert torch.equal(fresh[:, :, s, :, p].view(torch.int16), cache[:, :, s, :, p].view(torch.int16))


@contextlib.contextmanager
def _no_gc():
    """No garbage collection pause inside a timed region (it would read as a blocked call)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _timed_calls(calls) -> list[tuple[str, float]]:
    """Run each (name, call), timing how long the host spends in it."""
    out = []
    for name, call in calls:
        t0 = time.perf_counter()
        call()
        out.append((name, time.perf_counter() - t0))
    return out


def _never_blocked(issued: float, total: float, calls: list[tuple[str, float]]) -> None:
    """The host issued everything long before the queued compute finished, and no single call waited
    for it (on failure: the calls, slowest first, name the one that blocked)."""
    slowest = sorted(calls, key=lambda c: -c[1])
    report = f"issued in {issued * 1e3:.2f} ms of {total * 1e3:.2f} ms; slowest calls (ms): " + ", ".join(
        f"{name} {t * 1e3:.3f}" for name, t in slowest[:6])
    assert issued < total / 4 and slowest[0][1] < total / 20, report


def test_step_replicator_on_gpu():
    """The fast path with device positions (no host sync), host positions and prompt boxes: host buffers
    and graphs set up front, the host never blocked by queued compute, bit-identical restore.

    Like a worker, the test first runs everything once (its warm-up): CUDA loads a kernel on its first
    launch, and loading waits for all queued work, so a first launch (here the test's own matmul,
    division and ``lengths + t``) while compute is queued blocks the host whatever streaming does."""
    part = cases.WHOLE
    cache = cases.global_cache(torch.bfloat16).cuda()
    transport, stats = LocalTransport(), StreamStats()
    rep = StepReplicator(cache, part, transport, prefix="f/", depth=16, box_depth=6, reserve=7, stats=stats)
    assert rep.graph_error is None and rep.reserved_steps == 16, rep.graph_error
    boxes = [part.box((0, 4)).with_(layers=(l, l + 1)) for l in range(cases.LAYERS)]
    rep.reserve(boxes=boxes + boxes[:1])
    lengths = torch.tensor([[4], [5], [4], [6]], device="cuda")
    a = torch.randn(4096, 4096, device="cuda")

    def compute():
        x = a
        for _ in range(40):  # tens of ms (fp32, or TF32 where enabled): still queued while the steps are issued
            x = x @ x.T / 4096
        return x

    def issue(prefix):
        calls = []
        for t in range(5):  # lengths + t: a temporary, snapshotted on the compute stream
            calls += [(f"step {t} (device positions)", lambda t=t: rep.step(lengths + t, key=f"{prefix}t{t}")),
                      (f"box {t}", lambda t=t: rep.box(boxes[t], key=f"{prefix}prompt/{t}"))]
        calls.append(("step 5 (host positions)", lambda: rep.step([1, 1, 2, 2], key=f"{prefix}t5")))
        return _timed_calls(calls)

    compute()  # the warm-up
    issue("warm/")
    rep.wait()
    assert transport.drop("warm/") == 11  # the steps' buffers go back to the replicator
    torch.cuda.synchronize()
    stats.reset()
    allocs, replays, by_driver = transport.pinned_allocs, rep.graph_replays, rep.driver_issues
    with _no_gc():
        t0 = time.perf_counter()
        compute()
        calls = issue("f/")
        issued = time.perf_counter() - t0
        rep.wait()
        total = time.perf_counter() - t0
    _never_blocked(issued, total, calls)
    assert rep.graph_replays - replays == 6 and rep.overflow_steps == 0  # each step one graph replay
    assert rep.driver_issues - by_driver == (5 if driver.load() else 0)  # device positions: driver calls
    assert transport.pinned_allocs == allocs  # nothing pinned while streaming
    assert transport._store["f/t0"].buf.is_pinned()
    rep.box(boxes[5], key="f/prompt/5")
    rep.wait()
    fresh = torch.zeros_like(cache)
    assert restore(fresh, part, transport, prefix="f/") == 12
    written = torch.zeros(cache.shape[:5], dtype=torch.bool, device="cuda")
    written[..., :4] = True
    for t in range(5):
        for s in range(cases.SLOTS):
            written[:, :, s, :, int(lengths[s]) + t] = True
    for s, p in enumerate([1, 1, 2, 2]):
        written[:, :, s, :, p] = True
    assert torch.equal(fresh[written].view(torch.int16), cache[written].view(torch.int16))
    assert (fresh[~written].view(torch.int16) == 0).all()
    assert stats.as_dict()["replication"]["local"]["count"] == 12


@pytest.mark.parametrize("by_driver", ["1", "0"])
def test_step_replicator_graphs_restore_every_step(by_driver, monkeypatch):
    """Graph replays through a ring shallower than the steps: re-sent keys, a device positions buffer
    overwritten right after each step (as a CUDA-graph decode does), int32 positions, and steps past
    the reserve (filled eagerly): every stored step restores exactly, whether the steps with int64
    device positions are issued as driver calls or through PyTorch."""
    monkeypatch.setenv("DEJAVU_DRIVER_ISSUE", by_driver)
    part = cases.WHOLE
    cache = cases.global_cache(torch.float16).cuda()
    transport = LocalTransport()
    rep = StepReplicator(cache, part, transport, prefix="g/", depth=3, reserve=9)
    assert rep.graph_error is None and rep.reserved_steps == 9, rep.graph_error
    positions = torch.zeros(cases.SLOTS, 1, dtype=torch.long, device="cuda")  # the decode's static buffer
    stored = {}
    for t in range(13):
        pos = [(t + 3 * s) % cases.MAX_SEQ for s in range(cases.SLOTS)]
        if t % 3 == 0:
            given = pos
        elif t % 3 == 1:
            positions.copy_(torch.tensor(pos).view(-1, 1), non_blocking=True)
            given = positions
        else:
            given = torch.tensor(pos, dtype=torch.int32, device="cuda")
        key = f"g/t{t % 7}" if t < 10 else f"g/x{t}"  # t7..t9 re-send t0..t2
        rep.step(given, key=key)
        positions.fill_(cases.MAX_SEQ - 1)  # overwritten right after: the step must have its snapshot
        stored[key] = pos
        if t == 9:
            assert rep.graph_replays == 10 and rep.overflow_steps == 0
            assert rep.driver_issues == (3 if by_driver == "1" and driver.load() else 0)  # t = 1, 4, 7
    rep.wait()
    assert rep.overflow_steps == 1  # 10 keys in 9 reserved buffers
    assert sorted(transport.keys()) == sorted(stored)
    for key, pos in stored.items():
        one = torch.zeros_like(cache)
        assert restore(one, part, transport, prefix=key) == 1
        for s, p in enumerate(pos):
            assert torch.equal(one[:, :, s, :, p].view(torch.int16), cache[:, :, s, :, p].view(torch.int16)), (key, s)


def test_layerwise_overlaps_the_compute_stream():
    """on_layer_done only queues work on the side stream: the host does not wait for the compute.

    As a worker does: a staging pool kept across microbatches (no device allocation per call), and a
    first microbatch that loads every kernel (the test's matmul, division and add included)."""
    from dejavu.streaming import LayerwiseStreamer, StagingPool, make_plan

    part = Partition((0, 4), (0, 8), (0, 8))
    cache = torch.randn(part.cache_shape(1024, 128), device="cuda", dtype=torch.float16)
    plan = make_plan([part], [part], (0, 1000))
    transport, pool = LocalTransport(), StagingPool(cache.device)
    a = [torch.randn(8192, 8192, device="cuda", dtype=torch.float16)]

    def matmul():
        a[0] = a[0] @ a[0].T / 8192

    def microbatch(streamer):
        calls = []
        for layer in range(4):
            for _ in range(20):
                calls.append(("matmul", matmul))  # the layer's "compute": 20 of them are tens of ms
            calls.append((f"layer {layer} writes", lambda layer=layer: cache[layer].add_(1)))
            calls.append((f"on_layer_done({layer})", lambda layer=layer: streamer.on_layer_done(layer)))
        return _timed_calls(calls)

    # The warm-up microbatch: the first flush of a key also pins its host buffer (a worker pins up
    # front with LocalTransport.reserve, or reuses keys as here).
    warm = LayerwiseStreamer(cache, plan, 0, transport, prefix="x", staging=pool)
    microbatch(warm)
    warm.finish()
    torch.cuda.synchronize()
    s = LayerwiseStreamer(cache, plan, 0, transport, prefix="x", staging=pool)
    with _no_gc():
        t0 = time.perf_counter()
        calls = microbatch(s)
        issued = time.perf_counter() - t0
        s.finish()
        total = time.perf_counter() - t0
    _never_blocked(issued, total, [c for c in calls if c[0] != "matmul"] + [max(calls, key=lambda c: c[1])])
    back = torch.empty_like(cache)
    stream_in(back, plan, 0, transport, prefix="x").wait()
    torch.cuda.synchronize()
    assert torch.equal(back[..., :1000, :], cache[..., :1000, :])  # the copies saw the layers' writes


def test_gloo_with_gpu_tensors():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(PEER), "gloo", str(r), str(port), "cuda"], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs


def test_mpi_with_gpu_tensors():
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed")
    run = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", sys.executable, str(PEER), "mpi", "cuda"],
                         env=env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL point-to-point needs two GPUs")
def test_nccl_between_two_gpus():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(PEER), "nccl", str(r), str(port)], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "transport=dist-nccl cases=45" in "".join(outs)
