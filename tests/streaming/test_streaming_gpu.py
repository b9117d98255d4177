"""The GPU code paths (side stream + events, pinned host memory, gloo/MPI staging through the host,
NCCL): the same bit-identical round trips with caches on CUDA. Skipped where there is no GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import streaming_cases as cases
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


def test_step_replicator_on_gpu():
    """The fast path with device positions (no host sync), host positions and prompt boxes: pinned
    buffers reserved up front, host never blocked by queued compute, bit-identical restore."""
    import time

    part = cases.WHOLE
    cache = cases.global_cache(torch.bfloat16).cuda()
    transport, stats = LocalTransport(), StreamStats()
    rep = StepReplicator(cache, part, transport, prefix="f/", depth=16, reserve=7, stats=stats)
    boxes = [part.box((0, 4)).with_(layers=(l, l + 1)) for l in range(cases.LAYERS)]
    rep.reserve(boxes=boxes + boxes[:1])
    rep.step([0, 0, 0, 0], key="warm/t")  # first use: the allocator's blocks for the box temporaries
    rep.box(boxes[0], key="warm/box")
    rep.wait()
    stats.reset()
    allocs = transport.pinned_allocs
    lengths = torch.tensor([[4], [5], [4], [6]], device="cuda")
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a = a @ a.T / 4096  # compute still queued while the steps are issued
    for t in range(5):
        rep.step(lengths + t, key=f"f/t{t}")  # a temporary: snapshotted on the compute stream
        rep.box(boxes[t], key=f"f/prompt/{t}")
    rep.step([1, 1, 2, 2], key="f/t5")  # host positions
    issued = time.perf_counter() - t0
    rep.wait()
    total = time.perf_counter() - t0
    assert issued < total / 4, (issued, total)
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


def test_layerwise_overlaps_the_compute_stream():
    """on_layer_done only queues work on the side stream: the host does not wait for the compute."""
    import time

    from dejavu.streaming import LayerwiseStreamer, make_plan

    part = Partition((0, 4), (0, 8), (0, 8))
    cache = torch.randn(part.cache_shape(1024, 128), device="cuda", dtype=torch.float16)
    plan = make_plan([part], [part], (0, 1000))
    transport = LocalTransport()
    # Steady state: the first flush of a key pins its host buffer, and pinning may synchronize the
    # device (a worker pins up front with LocalTransport.reserve, or reuses keys as here).
    LayerwiseStreamer(cache, plan, 0, transport, prefix="x").finish()
    s = LayerwiseStreamer(cache, plan, 0, transport, prefix="x")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for layer in range(4):
        for _ in range(20):
            a = a @ a.T / 8192  # the layer's "compute", tens of milliseconds
        cache[layer].add_(1)  # the layer writes its cache
        s.on_layer_done(layer)
    issued = time.perf_counter() - t0
    s.finish()
    total = time.perf_counter() - t0
    assert issued < total / 4, (issued, total)
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
