"""Communicators for the tensor-parallel all-reduce, injected into a stage.

A stage never imports a distributed backend itself: it calls ``comm.all_reduce_(t)`` and the worker
decides what that means (nothing at degree 1, torch.distributed, MPI, or threads in one process).
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch


class Communicator(Protocol):
    rank: int
    size: int

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` across the group, in place, and return it."""


class SingleProcess:
    """Degree 1: the all-reduce is the identity."""

    rank = 0
    size = 1

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        return t


class ThreadGroup:
    """Shards run as threads of one process and sum through shared memory (tests, CPU experiments).

    Create one ``ThreadGroup`` per degree and call ``member(rank)`` in each thread.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots: list[torch.Tensor | None] = [None] * size

    def member(self, rank: int) -> "_ThreadMember":
        return _ThreadMember(self, rank)

    def run(self, fn, timeout: float = 300.0) -> list:
        """Run ``fn(member)`` for every rank in its own thread; return the results in rank order.

        A shard that raises breaks the barrier, so the others fail fast instead of waiting forever.
        """
        results: list = [None] * self.size
        errors: list[BaseException] = []

        def shard(rank: int) -> None:
            try:
                results[rank] = fn(self.member(rank))
            except BaseException as e:
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=shard, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout)
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"tensor-parallel shards did not finish within {timeout} s")
        return results


class _ThreadMember:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        g = self.group
        g._slots[self.rank] = t.clone()
        g._barrier.wait()
        # Sum in rank order on every member so all shards get bit-identical results.
        total = g._slots[0].clone()
        for other in g._slots[1:]:
            total += other
        g._barrier.wait()
        t.copy_(total)
        return t


class TorchDistributed:
    """torch.distributed all-reduce over a process group (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._dist.all_reduce(t, group=self.group)
        return t


class MPIAllReduce:
    """MPI all-reduce through mpi4py on host buffers (the seed's MPI build)."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return t
        from mpi4py import MPI

        # Sum in fp32 at least (fp16/bf16 partial sums would round), fp64 when that is the model's dtype.
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        host = t.detach().to("cpu", wide).contiguous()
        out = torch.empty_like(host)
        self.comm.Allreduce(host.numpy(), out.numpy(), op=MPI.SUM)
        t.copy_(out.to(t.dtype))
        return t
