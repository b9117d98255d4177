"""Local disk: one file per chunk, written atomically and verified on read.

File layout: the 8-byte magic ``DJVCHUNK``, a 4-byte little-endian header length, a msgpack header
(key, payload size, CRC-32 of the payload, dtype, shape, caller's meta), then the raw payload bytes.
A writer writes ``<file>.tmp-<pid>`` and renames it into place, so a reader never sees a half-written
file under the chunk's name; a file damaged later (truncated, flipped bits) fails the size or checksum
check and is reported with the chunk's key and path, never used.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import msgpack
import torch

from ...model.config import dtype_name
from .base import DONE, Blob, ChunkError, Pending, Transport, as_bytes, nbytes

MAGIC = b"DJVCHUNK"
_SAFE = re.compile(r"[A-Za-z0-9_.,=+>-]+")


class DiskTransport(Transport):
    name = "disk"

    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # fsync makes a flushed chunk survive a machine crash, not only a process crash.
        self.fsync = fsync

    def path(self, key: str) -> Path:
        parts = key.split("/")
        bad = [p for p in parts if not _SAFE.fullmatch(p) or p in (".", "..")]
        if bad:
            raise ValueError(f"chunk key {key!r} has a component {bad[0]!r} that is not a safe file name "
                             f"(letters, digits and _ . , = + > - only)")
        return self.root.joinpath(*parts[:-1], parts[-1] + ".chunk")

    def flush(self, key: str, src: torch.Tensor, *, peer: int = -1, tag: int = 0,
              meta: dict | None = None) -> Pending:
        path = self.path(key)
        host = src.detach().to("cpu").contiguous()
        payload = as_bytes(host).numpy()
        header = msgpack.packb({"key": key, "nbytes": payload.nbytes, "crc32": zlib.crc32(payload),
                                "dtype": dtype_name(src.dtype), "shape": list(src.shape),
                                "meta": meta or {}})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            f.write(payload.data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return DONE

    def _read(self, key: str, path: Path) -> tuple[dict, memoryview]:
        if not path.is_file():
            raise ChunkError(f"disk chunk {key!r} is missing: no file {path}")
        raw = bytearray(path.stat().st_size)  # writable, so torch.frombuffer can use it without a copy
        with open(path, "rb") as f:
            f.readinto(raw)
        if len(raw) < 12 or raw[:8] != MAGIC:
            raise ChunkError(f"disk chunk {key!r} at {path} is corrupt: not a chunk file (bad magic or truncated header)")
        hlen = struct.unpack("<I", raw[8:12])[0]
        try:
            header = msgpack.unpackb(raw[12:12 + hlen])
            size, crc = int(header["nbytes"]), int(header["crc32"])
        except Exception as e:  # a damaged header can fail in many ways; all mean the same here
            raise ChunkError(f"disk chunk {key!r} at {path} is corrupt: unreadable header ({e})") from None
        payload = memoryview(raw)[12 + hlen:]
        if header.get("key") != key:
            raise ChunkError(f"disk chunk {key!r} at {path} holds chunk {header.get('key')!r} instead")
        if len(payload) != size:
            raise ChunkError(f"disk chunk {key!r} at {path} is torn: {len(payload)} payload bytes, header says {size}")
        if zlib.crc32(payload) != crc:
            raise ChunkError(f"disk chunk {key!r} at {path} is corrupt: CRC-32 of the payload does not match")
        return header, payload

    def fetch(self, key: str, out: torch.Tensor, *, peer: int = -1, tag: int = 0) -> Pending:
        header, payload = self._read(key, self.path(key))
        if len(payload) != nbytes(out):
            raise ChunkError(f"disk chunk {key!r} holds {len(payload)} bytes but the destination needs {nbytes(out)}")
        out.copy_(torch.frombuffer(payload, dtype=torch.uint8).view(out.dtype).view(out.shape))
        return DONE

    def fetch_all(self, prefix: str, *, peer: int = -1) -> list[Blob]:
        blobs = []
        for path in sorted(self.root.rglob("*.chunk")):
            key = path.relative_to(self.root).as_posix().removesuffix(".chunk")
            if key.startswith(prefix):
                header, payload = self._read(key, path)
                meta = dict(header["meta"], dtype=header["dtype"], shape=header["shape"])
                blobs.append(Blob(key, meta, torch.frombuffer(payload, dtype=torch.uint8)))
        return blobs

    def drop(self, prefix: str, *, peer: int = -1) -> int:
        n = 0
        for path in self.root.rglob("*.chunk"):
            if path.relative_to(self.root).as_posix().startswith(prefix):
                path.unlink(missing_ok=True)
                n += 1
        return n
