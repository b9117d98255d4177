"""The data plane between workers: messages of (small msgpack header, tensors) over torch.distributed or MPI.

A message is a header (a msgpack map: what the tensors are for, plus their dtypes and shapes) and zero
or more tensors. Headers always travel on the CPU — gloo, or MPI — so a receiver learns what comes next
without touching the device; the tensors travel on the device backend (NCCL for CUDA tensors; gloo or
MPI otherwise). Channels keep unrelated streams of messages between the same two ranks apart (tags).

Besides the in-order stage-to-stage messages, a few *side channels* carry small headers that a stage
must be able to wait for while it waits for other things too (the next-token feedback into the entry
stage, the prompt pipeline's hand-over notices into the token pipeline). Those are received by a
listener thread (``side_recv``), so they get their own communicator (a gloo pair group, or a duplicated
MPI communicator) that the main thread's traffic never shares. The KV hand-over of a disaggregated run
goes through the streaming library, on one more communicator of its own (``kv_transport``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import timedelta

import msgpack
import torch

from ..model.config import dtype_name
from .topology import Topology

# Channel -> tag. Tags only need to be distinct per (sender, receiver) pair.
ACT, TP, FEEDBACK, HANDOVER = 1, 2, 4, 5
CHANNEL_NAMES = {ACT: "act", TP: "tp", FEEDBACK: "feedback", HANDOVER: "handover"}

_DTYPES = {dtype_name(d): d for d in
           (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
            torch.bool)}


def _pack(meta: dict, tensors) -> bytes:
    meta = dict(meta)
    meta["_t"] = [[dtype_name(t.dtype), list(t.shape)] for t in tensors]
    return msgpack.packb(meta, use_bin_type=True)


def _unpack(buf: bytes) -> tuple[dict, list]:
    meta = msgpack.unpackb(buf, raw=False, strict_map_key=False)
    specs = meta.pop("_t", [])
    return meta, [(_DTYPES[d], tuple(shape)) for d, shape in specs]


class DataPlane:
    """What every backend provides; counters of bytes and seconds per channel live here."""

    rank: int
    world_size: int
    device: torch.device

    def __init__(self) -> None:
        self.bytes_sent: Counter = Counter()
        self.bytes_received: Counter = Counter()
        self.seconds: Counter = Counter()

    def _count(self, counter: Counter, channel: int, tensors) -> None:
        counter[CHANNEL_NAMES[channel]] += sum(t.numel() * t.element_size() for t in tensors)

    # -- provided by backends
    def send(self, dst: int, meta: dict, tensors=(), channel: int = ACT) -> None: ...
    def recv(self, src: int, channel: int = ACT) -> tuple[dict, list[torch.Tensor]]: ...
    def kv_transport(self):
        """The streaming library's transport for the prompt -> token KV hand-over (disaggregated runs)."""
    def side_send(self, dst: int, meta: dict, channel: int) -> None: ...
    def side_recv(self, src: int, channel: int) -> dict: ...
    def tp_comm(self): ...
    def close(self) -> None: ...


# ---- torch.distributed (gloo on CPU; gloo for headers + NCCL for CUDA tensors) ---------------------------

class TorchDataPlane(DataPlane):
    def __init__(self, topo: Topology, rank: int, backend: str, device: torch.device,
                 timeout_s: float = 24 * 3600) -> None:
        super().__init__()
        import torch.distributed as dist

        self.dist, self.topo, self.rank, self.world_size = dist, topo, rank, topo.world_size
        self.device = device
        self._wire = device if backend == "nccl" else torch.device("cpu")
        # One group, two transports: CPU tensors (headers) go over gloo, CUDA tensors over NCCL.
        spec = "gloo" if backend == "gloo" else "cpu:gloo,cuda:nccl"
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise RuntimeError(f"{var} is not set; the {backend} data plane rendezvous needs MASTER_ADDR "
                                   f"and MASTER_PORT (the address and a free port of rank 0)")
        if backend == "nccl" and os.environ.pop("NCCL_COMM_ID", None):
            # The seed's single-communicator bootstrap address; torch.distributed bootstraps every NCCL
            # communicator (TP groups, pairs) through MASTER_ADDR's store, and one fixed root address
            # shared by several communicators would collide.
            print(f"[worker {rank}] ignoring NCCL_COMM_ID: torch.distributed bootstraps NCCL through "
                  f"MASTER_ADDR/MASTER_PORT", flush=True)
        dist.init_process_group(spec, init_method="env://", rank=rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))
        # Every rank must create every group, in the same order.
        self._tp_group = None
        for pipeline, n in (("prompt", topo.prompt_stages), ("token", topo.token_stages)):
            for s in range(n):
                ranks = topo.stage_ranks(pipeline, s)
                g = dist.new_group(ranks, backend=spec) if topo.tp > 1 else None
                if rank in ranks:
                    self._tp_group = g
        # The KV hand-over gets a group of its own, so its tags (message indices) meet no other traffic;
        # pure NCCL on GPUs, so the streaming library sends device buffers directly.
        self._kv_group = (dist.new_group(list(range(self.world_size)), backend="gloo" if backend == "gloo" else "nccl")
                          if topo.disaggregated else None)
        self._side: dict[tuple[int, int], object] = {}
        for a, b in side_pairs(topo):
            g = dist.new_group(sorted({a, b}), backend="gloo")
            if rank in (a, b):
                self._side[(a, b)] = g
        if self._kv_group is not None and backend == "nccl":
            self._warm_up_kv()

    def _warm_up_kv(self) -> None:
        # NCCL builds a pair's communicator on its first send/recv, and that blocks until both ranks
        # get there. A prompt stage's first KV send happens inside its forward, long before the token
        # stage posts the receive (after the hand-over notice that follows the forward): build them now,
        # one pair at a time in one global order (deadlock-free), while everyone is waiting anyway.
        one = torch.zeros(1, device=self.device)
        for a, b in kv_pairs(self.topo):
            if self.rank == a:
                self.dist.send(one, b, group=self._kv_group)
            elif self.rank == b:
                self.dist.recv(one, a, group=self._kv_group)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _send_header(self, dst: int, buf: bytes, channel: int, group=None) -> None:
        payload = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
        self.dist.send(torch.tensor([len(buf)], dtype=torch.int64), dst, group=group, tag=channel)
        self.dist.send(payload, dst, group=group, tag=channel)

    def _recv_header(self, src: int, channel: int, group=None) -> bytes:
        n = torch.zeros(1, dtype=torch.int64)
        self.dist.recv(n, src, group=group, tag=channel)
        payload = torch.empty(int(n), dtype=torch.uint8)
        self.dist.recv(payload, src, group=group, tag=channel)
        return payload.numpy().tobytes()

    def send(self, dst, meta, tensors=(), channel=ACT):
        t0 = time.perf_counter()
        # With NCCL, payloads travel from this rank's device; gloo takes host tensors only (a CUDA tensor
        # fails its send with "Bad address"), so GPU workers on gloo stage through host memory.
        tensors = [t.to(self._wire).contiguous() for t in tensors]
        self._send_header(dst, _pack(meta, tensors), channel)
        for t in tensors:
            self.dist.send(t, dst, tag=channel)
        self._count(self.bytes_sent, channel, tensors)
        self.seconds[CHANNEL_NAMES[channel] + "_send"] += time.perf_counter() - t0

    def recv(self, src, channel=ACT):
        t0 = time.perf_counter()
        meta, specs = _unpack(self._recv_header(src, channel))
        tensors = []
        for dtype, shape in specs:
            t = torch.empty(shape, dtype=dtype, device=self._wire)
            self.dist.recv(t, src, tag=channel)
            tensors.append(t.to(self.device))
        self._count(self.bytes_received, channel, tensors)
        self.seconds[CHANNEL_NAMES[channel] + "_recv"] += time.perf_counter() - t0
        return meta, tensors

    def kv_transport(self):
        from ..streaming.transports.dist import DistTransport

        return DistTransport(self._kv_group)

    def side_send(self, dst, meta, channel):
        self._send_header(dst, msgpack.packb(meta, use_bin_type=True), channel, group=self._side[(self.rank, dst)])

    def side_recv(self, src, channel):
        buf = self._recv_header(src, channel, group=self._side[(src, self.rank)])
        return msgpack.unpackb(buf, raw=False, strict_map_key=False)

    def tp_comm(self):
        from ..model.tp import SingleProcess, TorchDistributed

        return TorchDistributed(self._tp_group) if self._tp_group is not None else SingleProcess()

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:
            pass


# ---- MPI (mpi4py; rank and size from mpirun) ----------------------------------------------------------

class MPIDataPlane(DataPlane):
    """Host buffers over MPI; device tensors are staged through the host. bf16 travels as raw bytes."""

    def __init__(self, topo: Topology, device: torch.device) -> None:
        super().__init__()
        from mpi4py import MPI

        self.MPI, self.comm, self.topo, self.device = MPI, MPI.COMM_WORLD, topo, device
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        if self.world_size != topo.world_size:
            raise RuntimeError(f"mpirun started {self.world_size} processes but the topology needs "
                               f"{topo.world_size}; use mpirun -n {topo.world_size}")
        role = topo.role(self.rank)
        color = (0 if role.pipeline == "prompt" else topo.prompt_stages) + role.stage
        self._tp = self.comm.Split(color, role.tp_rank)
        # The listener threads receive on their own communicator (needs MPI_THREAD_MULTIPLE).
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("the MPI library does not provide MPI_THREAD_MULTIPLE, which the side-channel "
                               "listener threads need")
        self._side = self.comm.Dup()
        self._kv = self.comm.Dup() if topo.disaggregated else None

    @staticmethod
    def _bytes(t: torch.Tensor):
        return t.detach().to("cpu").contiguous().view(torch.uint8).numpy()

    def _recv_bytes(self, comm, src: int, tag: int) -> bytearray:
        status = self.MPI.Status()
        msg = comm.Mprobe(src, tag, status)  # matched probe: safe with other threads receiving
        buf = bytearray(status.Get_count(self.MPI.BYTE))
        msg.Recv([buf, self.MPI.BYTE])
        return buf

    def send(self, dst, meta, tensors=(), channel=ACT):
        t0 = time.perf_counter()
        self.comm.Send([_pack(meta, tensors), self.MPI.BYTE], dst, channel)
        for t in tensors:
            self.comm.Send([self._bytes(t), self.MPI.BYTE], dst, channel)
        self._count(self.bytes_sent, channel, tensors)
        self.seconds[CHANNEL_NAMES[channel] + "_send"] += time.perf_counter() - t0

    def recv(self, src, channel=ACT):
        t0 = time.perf_counter()
        meta, specs = _unpack(bytes(self._recv_bytes(self.comm, src, channel)))
        tensors = []
        for dtype, shape in specs:
            host = torch.empty(shape, dtype=dtype)
            self.comm.Recv([host.view(torch.uint8).numpy(), self.MPI.BYTE], src, channel)
            tensors.append(host.to(self.device))
        self._count(self.bytes_received, channel, tensors)
        self.seconds[CHANNEL_NAMES[channel] + "_recv"] += time.perf_counter() - t0
        return meta, tensors

    def kv_transport(self):
        from ..streaming.transports.mpi import MPITransport

        return MPITransport(self._kv)

    def side_send(self, dst, meta, channel):
        self._side.Send([msgpack.packb(meta, use_bin_type=True), self.MPI.BYTE], dst, channel)

    def side_recv(self, src, channel):
        return msgpack.unpackb(bytes(self._recv_bytes(self._side, src, channel)), raw=False, strict_map_key=False)

    def tp_comm(self):
        from ..model.tp import MPIAllReduce, SingleProcess

        return MPIAllReduce(self._tp) if self.topo.tp > 1 else SingleProcess()

    def close(self) -> None:
        pass  # mpi4py finalizes at exit


def side_pairs(topo: Topology) -> list[tuple[int, int]]:
    """(sender, receiver) of every side channel; a pair with itself is handled in-process."""
    pairs = [(topo.sampler_rank, topo.token_leader)]  # next-token feedback
    if topo.disaggregated:
        pairs.append((topo.prompt_sampler_rank, topo.token_leader))  # hand-over notices
    return [(a, b) for a, b in pairs if a != b]


def kv_pairs(topo: Topology) -> list[tuple[int, int]]:
    """(prompt rank, token rank) pairs that exchange KV chunks: same TP rank, overlapping layers."""
    pairs = []
    for ps, (pa, pb) in enumerate(topo.layer_ranges("prompt")):
        for ts, (ta, tb) in enumerate(topo.layer_ranges("token")):
            if max(pa, ta) < min(pb, tb):
                pairs += [(topo.rank_of("prompt", ps, r), topo.rank_of("token", ts, r)) for r in range(topo.tp)]
    return sorted(pairs)


def make_dataplane(backend: str, topo: Topology, rank: int, device: torch.device) -> DataPlane:
    if backend == "mpi":
        return MPIDataPlane(topo, device)
    return TorchDataPlane(topo, rank, backend, device)
