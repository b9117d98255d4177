"""The data plane of a run that survives failures: rebuilt on a fresh rendezvous per failure generation.

``TorchDataPlane`` lives in torch.distributed's global state (one default process group per process), and
a worker whose peer died cannot build a second one next to it while a thread of the first is still stuck
in a receive. This plane holds its process groups as plain objects instead (``ProcessGroupGloo`` /
``ProcessGroupNCCL`` built on a ``PrefixStore``): generation ``g`` rendezvous under ``gen{g}/`` of a
TCP store that the controller serves (it outlives any worker), and an abandoned generation's groups are
simply dropped, with whatever thread is blocked in them.

Headers travel over gloo; tensors over gloo (staged through host memory) or, with ``nccl``, over an NCCL
group of their own. The message format and channels are those of ``dataplane.py``.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from .dataplane import ACT, CHANNEL_NAMES, DataPlane, _pack, _unpack, kv_pairs, side_pairs
from .topology import Topology
from ..streaming.transports.dist import DistTransport


def _group(store, prefix: str, rank: int, size: int, timeout: timedelta, nccl: bool = False):
    sub = dist.PrefixStore(prefix, store)
    if nccl:
        return dist.ProcessGroupNCCL(sub, rank, size)
    return dist.ProcessGroupGloo(sub, rank, size, timeout)


class RecoverableDataPlane(DataPlane):
    def __init__(self, topo: Topology, rank: int, backend: str, device: torch.device, *, generation: int,
                 rendezvous_timeout_s: float = 300.0, timeout_s: float = 24 * 3600) -> None:
        super().__init__()
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"a data plane that survives failures needs gloo or nccl, not {backend}")
        self.topo, self.rank, self.world_size, self.device = topo, rank, topo.world_size, device
        self.generation, self.nccl = generation, backend == "nccl"
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            raise RuntimeError("MASTER_ADDR and MASTER_PORT must point at the controller's rendezvous store")
        # The controller serves the store: every generation meets there under a prefix of its own.
        store = dist.TCPStore(host, int(port), None, False, timeout=timedelta(seconds=rendezvous_timeout_s))
        base = f"gen{generation}/"
        t = timedelta(seconds=timeout_s)
        self.world = _group(store, base + "world/", rank, self.world_size, t)
        self.tensors = _group(store, base + "nccl/", rank, self.world_size, t, nccl=True) if self.nccl else self.world
        self._tp, self._tp_ranks = None, []
        if topo.tp > 1:
            role = topo.role(rank)
            ranks = topo.stage_ranks(role.pipeline, role.stage)
            self._tp_ranks = ranks
            self._tp = _group(store, base + f"tp-{ranks[0]}/", ranks.index(rank), len(ranks), t, nccl=self.nccl)
        self._side: dict[tuple[int, int], object] = {}
        for a, b in side_pairs(topo):
            if rank in (a, b):
                self._side[(a, b)] = _group(store, base + f"side-{a}-{b}/", 0 if rank == min(a, b) else 1, 2, t)
        self._kv = (_group(store, base + "kv/", rank, self.world_size, t, nccl=self.nccl)
                    if topo.disaggregated else None)
        if self._kv is not None and self.nccl:
            one = torch.zeros(1, device=device)
            for a, b in kv_pairs(topo):  # build NCCL's pair communicators now (see TorchDataPlane)
                if rank == a:
                    self._kv.send([one], b, 0).wait()
                elif rank == b:
                    self._kv.recv([one], a, 0).wait()

    # ---- messages ------------------------------------------------------------------------------------
    def _send_header(self, group, dst: int, buf: bytes, channel: int) -> None:
        n = torch.tensor([len(buf)], dtype=torch.int64)
        group.send([n], dst, channel).wait()
        group.send([torch.frombuffer(bytearray(buf), dtype=torch.uint8)], dst, channel).wait()

    def _recv_header(self, group, src: int, channel: int) -> bytes:
        n = torch.zeros(1, dtype=torch.int64)
        group.recv([n], src, channel).wait()
        payload = torch.empty(int(n), dtype=torch.uint8)
        group.recv([payload], src, channel).wait()
        return payload.numpy().tobytes()

    def send(self, dst, meta, tensors=(), channel=ACT):
        t0 = time.perf_counter()
        on = self.device if self.nccl else torch.device("cpu")
        tensors = [t.to(on).contiguous() for t in tensors]
        self._send_header(self.world, dst, _pack(meta, tensors), channel)
        for t in tensors:
            self.tensors.send([t], dst, channel).wait()
        self._count(self.bytes_sent, channel, tensors)
        self.seconds[CHANNEL_NAMES[channel] + "_send"] += time.perf_counter() - t0

    def recv(self, src, channel=ACT):
        t0 = time.perf_counter()
        meta, specs = _unpack(self._recv_header(self.world, src, channel))
        on = self.device if self.nccl else torch.device("cpu")
        tensors = []
        for dtype, shape in specs:
            t = torch.empty(shape, dtype=dtype, device=on)
            self.tensors.recv([t], src, channel).wait()
            tensors.append(t.to(self.device))
        self._count(self.bytes_received, channel, tensors)
        self.seconds[CHANNEL_NAMES[channel] + "_recv"] += time.perf_counter() - t0
        return meta, tensors

    def side_send(self, dst, meta, channel):
        group = self._side[(self.rank, dst)]
        self._send_header(group, 0 if dst < self.rank else 1, msgpack.packb(meta, use_bin_type=True), channel)

    def side_recv(self, src, channel):
        group = self._side[(src, self.rank)]
        buf = self._recv_header(group, 0 if src < self.rank else 1, channel)
        return msgpack.unpackb(buf, raw=False, strict_map_key=False)

    def kv_transport(self):
        return GroupTransport(self._kv, nccl=self.nccl)

    def tp_comm(self):
        from ..model.tp import SingleProcess

        return GroupAllReduce(self._tp, len(self._tp_ranks), self._tp_ranks.index(self.rank),
                              staged=not self.nccl) if self._tp is not None else SingleProcess()

    def close(self) -> None:
        """Drop this generation's groups. NCCL's are aborted, so kernels waiting on a dead peer end;
        gloo's are left to the garbage collector (a thread blocked in one keeps it alive, harmlessly)."""
        if self.nccl:
            for g in (self.tensors, self._tp, self._kv):
                if g is not None:
                    try:
                        g.abort()
                    except Exception:  # noqa: BLE001 — already broken
                        pass


class unbound:
    """The TP communicator before the first generation's group exists (the model only reads its shape)."""

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return t
        raise RuntimeError("tensor-parallel all-reduce before the data plane exists")


class Rebindable:
    """The model's TP communicator across failure generations: built once into the model, pointed at
    each new generation's group; ``waiting`` says a thread is blocked in it (safe to abandon)."""

    def __init__(self, target) -> None:
        self.target, self.waiting = target, False
        self.size, self.rank = target.size, target.rank

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.waiting = True
        try:
            return self.target.all_reduce_(t)
        finally:
            self.waiting = False


class GroupAllReduce:
    """The tensor-parallel all-reduce over a process-group object (``dejavu.model.tp`` Communicator)."""

    def __init__(self, group, size: int, rank: int, *, staged: bool) -> None:
        self.group, self.size, self.rank, self.staged = group, size, rank, staged

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return t
        buf = t.cpu() if self.staged and t.is_cuda else t
        self.group.allreduce([buf]).wait()
        if buf is not t:
            t.copy_(buf)
        return t


class GroupTransport(DistTransport):
    """The streaming library's point-to-point transport over a process-group object (the KV hand-over):
    ``DistTransport`` with the group's own send/recv instead of torch.distributed's registered groups."""

    def __init__(self, group, *, nccl: bool) -> None:
        # Not DistTransport.__init__: it asks torch.distributed about a registered group.
        self.group, self.on_gpu = group, nccl
        self.backend = "nccl" if nccl else "gloo"
        self.name = f"dist-{self.backend}"

    def _check_peer(self, key: str, peer: int) -> None:
        if not 0 <= peer < self.group.size():
            raise ValueError(f"chunk {key!r}: peer rank {peer} is not a rank of the group (size {self.group.size()})")

    def _isend(self, buf: torch.Tensor, peer: int, tag: int):
        return self.group.send([buf], peer, tag)

    def _irecv(self, buf: torch.Tensor, peer: int, tag: int):
        return self.group.recv([buf], peer, tag)
