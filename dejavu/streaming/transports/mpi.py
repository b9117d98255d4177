"""MPI point-to-point (mpi4py) between host buffers.

A flush is an ``Isend`` of the chunk's raw bytes to ``peer`` (a rank of ``comm``), a fetch the
matching ``Irecv``; MPI matches on (source, tag) and never overtakes within one. GPU tensors are
staged through pinned host memory (we do not assume a CUDA-aware MPI). mpi4py is imported on first
use, since importing it initializes MPI.
"""

from __future__ import annotations

import torch

from .base import Pending, Transport, as_bytes, host_copy


class MPITransport(Transport):
    name = "mpi"

    def __init__(self, comm=None) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        # The MPI standard guarantees tags up to at least 32767.
        self.tag_ub = int(self.comm.Get_attr(MPI.TAG_UB) or 32767)

    def _check(self, key: str, peer: int, tag: int) -> None:
        if not 0 <= peer < self.comm.Get_size():
            raise ValueError(f"chunk {key!r}: peer rank {peer} is not a rank of the MPI communicator "
                             f"(size {self.comm.Get_size()})")
        if not 0 <= tag <= self.tag_ub:
            raise ValueError(f"chunk {key!r}: tag {tag} is outside MPI's range 0..{self.tag_ub}")

    def flush(self, key: str, src: torch.Tensor, *, peer: int = -1, tag: int = 0,
              meta: dict | None = None) -> Pending:
        self._check(key, peer, tag)
        host, ready = host_copy(src)
        ready.wait()
        arr = as_bytes(host).numpy()
        req = self.comm.Isend([arr, self.MPI.BYTE], dest=peer, tag=tag)
        return Pending(req.Wait, keep=(host, arr))

    def fetch(self, key: str, out: torch.Tensor, *, peer: int = -1, tag: int = 0) -> Pending:
        self._check(key, peer, tag)
        direct = out.device.type == "cpu" and out.is_contiguous()
        host = out if direct else torch.empty(out.shape, dtype=out.dtype, pin_memory=out.is_cuda)
        arr = as_bytes(host).numpy()
        req = self.comm.Irecv([arr, self.MPI.BYTE], source=peer, tag=tag)
        if direct:
            return Pending(req.Wait, keep=(host, arr))
        return Pending(req.Wait, then=lambda: out.copy_(host), keep=(host, arr))
