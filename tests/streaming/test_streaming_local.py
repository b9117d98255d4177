"""Round trips through the in-process transports (local host memory, disk) and a peer's replica store."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import streaming_cases as cases
from dejavu.streaming import (LADDER, ChunkError, DiskTransport, LocalTransport, Partition, StagingPool,
                              StepSlice, StreamOptions, StreamStats, gather_step, replicate_box, replicate_step,
                              restore, scatter_step, stream_in, stream_out, swap_in, swap_out)


def remote_transport():
    pytest.importorskip("zmq", reason="pyzmq is not installed")
    from dejavu.streaming.transports.remote import RemoteHostTransport

    return RemoteHostTransport


def make(kind, tmp_path):
    return LocalTransport() if kind == "local" else DiskTransport(tmp_path / "chunks", fsync=False)


@pytest.mark.parametrize("kind", ["local", "disk"])
@pytest.mark.parametrize("layout", list(cases.LAYOUTS))
def test_round_trip_is_bit_identical(tmp_path, kind, layout):
    transport, stats = make(kind, tmp_path), StreamStats()
    plan = cases.plan_for(layout)
    for dname, dtype in cases.DTYPES.items():
        for mode in LADDER:
            opts = StreamOptions.named(mode)
            prefix = f"{dname}/{mode}"
            for i, c in enumerate(cases.sender_caches(plan, dtype)):
                stream_out(c, plan, i, transport, prefix=prefix, options=opts, stats=stats).wait()
            received = cases.receiver_caches(plan, dtype)
            for j, c in enumerate(received):
                stream_in(c, plan, j, transport, prefix=prefix, options=opts, stats=stats).wait()
            cases.check_received(plan, received, dtype)
    # Accounting: every region counted once out and once in, one operation per partition and case.
    cells = sum(c.box.count() for c in plan.chunks) * cases.HEAD_DIM
    itemsizes = sum(torch.empty((), dtype=d).element_size() for d in cases.DTYPES.values())
    tally = stats.as_dict()["prompt->token"][transport.name]
    assert tally["bytes"] == 2 * len(LADDER) * cells * itemsizes
    assert tally["count"] == len(cases.DTYPES) * len(LADDER) * (len(plan.senders) + len(plan.receivers))


def test_bounded_staging_reuses_buffers():
    plan = cases.plan_for("3->2")
    transport, pool = LocalTransport(), StagingPool("cpu")
    opts = StreamOptions(staging_slots=2)
    for i, c in enumerate(cases.sender_caches(plan, torch.float16)):
        stream_out(c, plan, i, transport, prefix="b", options=opts, staging=pool).wait()
    assert len(pool._slots) == 2  # never more buffers than slots, however many layers were sent
    received = cases.receiver_caches(plan, torch.float16)
    for j, c in enumerate(received):
        stream_in(c, plan, j, transport, prefix="b", options=opts).wait()
    cases.check_received(plan, received, torch.float16)


def test_step_slice_gathers_each_slots_own_position():
    dtype = torch.bfloat16
    g = cases.global_cache(dtype)
    part = Partition((2, 5), (0, 4), (0, 4))  # a stage holding layers 2..4
    cache = g[cases.WHOLE.local(part.box((0, cases.MAX_SEQ)))].clone()
    step = StepSlice.of(part, slots=[0, 1, 3], positions=[4, 9, 2])  # right-padded slots differ
    buf = gather_step(cache, part, step)
    assert buf.shape == (3, 3, 2, 4, cases.HEAD_DIM) and buf.is_contiguous()
    for i, (s, p) in enumerate(zip(step.slots, step.positions)):
        assert torch.equal(buf[i].view(torch.int16), cache[:, :, s, :, p].view(torch.int16))
    other = torch.zeros_like(cache)
    scatter_step(other, part, step, buf)
    mask = torch.zeros(cache.shape[:5], dtype=torch.bool)
    for s, p in zip(step.slots, step.positions):
        mask[:, :, s, :, p] = True
    assert torch.equal(other[mask].view(torch.int16), cache[mask].view(torch.int16))
    assert (other[~mask].view(torch.int16) == 0).all()


@pytest.mark.parametrize("kind", ["local", "disk"])
def test_swap_out_and_in(tmp_path, kind):
    transport, stats = make(kind, tmp_path), StreamStats()
    for dtype in cases.DTYPES.values():
        cache = cases.global_cache(dtype)
        original = cache.clone()
        swap_out(cache, transport, f"swap/mb0/{dtype}", stats=stats).wait()
        cache.zero_()  # the buffer now serves another microbatch
        swap_in(cache, transport, f"swap/mb0/{dtype}", stats=stats).wait()
        assert torch.equal(cache.view(torch.uint8), original.view(torch.uint8))
    assert stats.as_dict()["swap"][transport.name]["count"] == 6


def _replicate_and_restore(transport, peer, dtype):
    """Prompt box + 3 token steps replicated, then restored into an empty cache of a replacement."""
    part = Partition((0, 3), (2, 4), (0, 4))  # stage 0, TP shard 1 of 2
    g = cases.global_cache(dtype)
    cache = g[cases.WHOLE.local(part.box((0, cases.MAX_SEQ)))].clone()
    prompt_len = torch.tensor([5, 3, 6, 2])
    written = torch.zeros(cache.shape[:5], dtype=torch.bool)
    handles = [replicate_box(cache, part, part.box((0, 6)), transport, key="rep/s0/mb1/prompt", peer=peer)]
    written[..., :6] = True
    for t in range(3):
        pos = (prompt_len + t).tolist()
        handles.append(replicate_step(cache, part, range(4), pos, transport, key=f"rep/s0/mb1/t{t}", peer=peer))
        for s, p in enumerate(pos):
            written[:, :, s, :, p] = True
    for h in handles:
        h.wait()
    fresh = torch.zeros_like(cache)
    assert restore(fresh, part, transport, prefix="rep/s0/mb1/", peer=peer) == 4
    bits = cases.BITS[dtype]
    assert torch.equal(fresh[written].view(bits), cache[written].view(bits))
    assert (fresh[~written].view(bits) == 0).all()
    assert transport.drop("rep/s0/mb1/", peer=peer) == 4


@pytest.mark.parametrize("kind", ["local", "disk"])
def test_replication_restores_a_cache(tmp_path, kind):
    transport = make(kind, tmp_path)
    for dtype in cases.DTYPES.values():
        _replicate_and_restore(transport, -1, dtype)


def test_replication_to_a_peer_process_replica_store():
    """The store runs in another process; chunks travel over a real TCP socket (msgpack + raw bytes)."""
    RemoteHostTransport = remote_transport()
    server = subprocess.Popen([sys.executable, "-m", "dejavu.streaming.transports.remote"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), address
        with RemoteHostTransport({1: address}, timeout_s=20) as transport:
            for dtype in cases.DTYPES.values():
                _replicate_and_restore(transport, 1, dtype)
            # fetch of one named chunk, and a clear error for a missing one
            x = torch.arange(10, dtype=torch.float16)
            transport.flush("one", x, peer=1).wait()
            y = torch.empty_like(x)
            transport.fetch("one", y, peer=1).wait()
            assert torch.equal(x, y)
            with pytest.raises(ChunkError, match="'nope' is not in the replica store"):
                transport.fetch("nope", y, peer=1).wait()
            with pytest.raises(ValueError, match="no replica-store address for peer 7"):
                transport.flush("x", x, peer=7)
    finally:
        server.stdin.close()
        server.wait(timeout=10)


def test_dead_replica_store_times_out_with_its_address():
    import socket

    RemoteHostTransport = remote_transport()

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with RemoteHostTransport({1: f"tcp://127.0.0.1:{port}"}, timeout_s=0.3) as transport:
        with pytest.raises(TimeoutError, match=f"127.0.0.1:{port} did not answer put of 'k'"):
            transport.flush("k", torch.ones(4), peer=1).wait()


def test_torn_or_corrupt_disk_chunk_is_an_error_naming_the_chunk(tmp_path):
    transport = DiskTransport(tmp_path, fsync=False)
    x = cases.global_cache(torch.bfloat16)[0, 0]
    key = "mb2/L0-1.K0-1.S0-4.H0-4.P0-12"
    transport.flush(key, x).wait()
    path = transport.path(key)
    good = path.read_bytes()
    out = torch.empty_like(x)
    transport.fetch(key, out).wait()
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))

    path.write_bytes(good[:-7])  # torn write
    with pytest.raises(ChunkError, match=rf"disk chunk '{key}' at .* is torn"):
        transport.fetch(key, out)
    flipped = bytearray(good)
    flipped[-100] ^= 0x10  # one bit of the payload
    path.write_bytes(bytes(flipped))
    with pytest.raises(ChunkError, match=rf"disk chunk '{key}' at .* is corrupt: CRC-32"):
        transport.fetch(key, out)
    path.write_bytes(good[:10])
    with pytest.raises(ChunkError, match=rf"disk chunk '{key}' .* not a chunk file"):
        transport.fetch(key, out)
    path.unlink()
    with pytest.raises(ChunkError, match=rf"disk chunk '{key}' is missing"):
        transport.fetch(key, out)
    # No temp file is ever left under a chunk's name, and unsafe keys are refused.
    assert not list(tmp_path.rglob("*.tmp-*"))
    with pytest.raises(ValueError, match="not a safe file name"):
        transport.flush("../escape", x)


def test_missing_local_chunk_names_the_key():
    with pytest.raises(ChunkError, match="'mb9/x' is not in local host memory"):
        LocalTransport().fetch("mb9/x", torch.empty(3))


def test_queued_puts_go_out_back_to_back_and_each_is_acknowledged():
    """Requests queued together are sent before their answers are read: 40 puts held behind one ``ready``
    all land, in order (a drop queued after them finds them all), each with its own acknowledgement."""
    import threading

    from dejavu.streaming.transports.remote import ReplicaStore

    RemoteHostTransport = remote_transport()
    store = ReplicaStore()
    gate = threading.Event()
    try:
        with RemoteHostTransport({1: store.address}, timeout_s=20) as transport:
            data = [torch.full((64,), i, dtype=torch.uint8) for i in range(40)]
            puts = [transport.put(f"b/{i}", d, {"i": i}, peer=1, ready=gate.wait if i == 0 else (lambda: None))
                    for i, d in enumerate(data)]
            dropped = transport.drop_later("b/", peer=1)
            assert not any(p.done for p in puts)  # the first one's copy has not "landed" yet
            threading.Timer(0.3, gate.set).start()
            keys = transport.keys("b/", peer=1)  # queued behind the gate too: answered once it opens
            for p in puts:
                p.wait()
                assert p.done and p.nbytes == 64 and p.seconds > 0
            assert dropped.result()[0]["count"] == 40
            assert keys == ([], [])  # asked after the drop, answered in order
    finally:
        store.close()
