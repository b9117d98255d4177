"""flush / fetch transports behind one interface (see base.py), selected by name."""

from __future__ import annotations

from .base import DONE, Blob, ChunkError, Pending, Transport
from .disk import DiskTransport
from .local import LocalTransport

TRANSPORTS = ("local", "disk", "dist", "mpi", "remote")


def make_transport(kind: str, **kwargs) -> Transport:
    """Build a transport from its config name: local, disk (root=...), dist (group=...), mpi (comm=...),
    remote (addresses={peer: "tcp://host:port"})."""
    if kind == "local":
        return LocalTransport(**kwargs)
    if kind == "disk":
        if "root" not in kwargs:
            raise ValueError("the disk transport needs root=<folder for chunk files>")
        return DiskTransport(**kwargs)
    if kind == "dist":
        from .dist import DistTransport
        return DistTransport(**kwargs)
    if kind == "mpi":
        from .mpi import MPITransport
        return MPITransport(**kwargs)
    if kind == "remote":
        from .remote import RemoteHostTransport
        return RemoteHostTransport(**kwargs)
    raise ValueError(f"unknown streaming transport {kind!r}; expected one of {TRANSPORTS}")


__all__ = ["DONE", "Blob", "ChunkError", "DiskTransport", "LocalTransport", "Pending", "TRANSPORTS", "Transport",
           "make_transport"]
