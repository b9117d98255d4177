"""torch.distributed point-to-point: NCCL between GPUs, gloo between CPU processes.

A flush is an ``isend`` to ``peer`` (a rank of ``group``), a fetch the matching ``irecv``. gloo matches
messages on (peer, tag); NCCL ignores tags and matches in issue order, so both sides must issue the
chunks for one peer in the same order (the stream plan guarantees it). Payloads travel as raw uint8,
so bf16 needs no backend support. With gloo, GPU tensors are staged through host memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .base import DONE, Pending, Transport, as_bytes, host_copy


class DistTransport(Transport):
    def __init__(self, group=None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_process_group before "
                               "building the torch.distributed transport")
        self.group = group
        self.backend = str(dist.get_backend(group))
        self.name = f"dist-{self.backend}"
        self.on_gpu = self.backend == "nccl"

    def _isend(self, buf: torch.Tensor, peer: int, tag: int):
        return dist.isend(buf, dst=peer, group=self.group, tag=tag)

    def _irecv(self, buf: torch.Tensor, peer: int, tag: int):
        return dist.irecv(buf, src=peer, group=self.group, tag=tag)

    def _check_peer(self, key: str, peer: int) -> None:
        if not 0 <= peer < dist.get_world_size():
            raise ValueError(f"chunk {key!r}: peer rank {peer} is not a rank of the process group "
                             f"(world size {dist.get_world_size()})")

    def flush(self, key: str, src: torch.Tensor, *, peer: int = -1, tag: int = 0,
              meta: dict | None = None) -> Pending:
        self._check_peer(key, peer)
        if self.on_gpu:
            payload, ready = src.contiguous(), DONE
        else:
            payload, ready = host_copy(src)
        ready.wait()
        work = self._isend(as_bytes(payload), peer, tag)
        return Pending(work.wait, keep=(payload,))

    def fetch(self, key: str, out: torch.Tensor, *, peer: int = -1, tag: int = 0) -> Pending:
        self._check_peer(key, peer)
        want_cuda = self.on_gpu
        direct = out.is_contiguous() and out.is_cuda == want_cuda
        buf = out if direct else torch.empty(out.shape, dtype=out.dtype,
                                             device=out.device if want_cuda else "cpu")
        work = self._irecv(as_bytes(buf), peer, tag)
        if direct:
            return Pending(work.wait, keep=(buf,))
        return Pending(work.wait, then=lambda: out.copy_(buf), keep=(buf,))


