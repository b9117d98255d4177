"""Remote host memory: copy a chunk to local (pinned) host memory, then send it to a peer's store.

This is how a stage replicates its cache into the host memory of the next stage's machine. The peer
runs a :class:`ReplicaStore` (a ZeroMQ ROUTER socket served by a thread of its worker process); the
sender's :class:`RemoteHostTransport` ships each chunk as two frames, a msgpack header and the raw
bytes, and ``Pending.wait()`` returns once the store has acknowledged it, so "replicated" means
"in the peer's memory". A replacement worker reads its replicas back with ``fetch_all(prefix)``.

Nothing is pickled; the store binds the interface it is given (127.0.0.1 by default).

    python -m dejavu.streaming.transports.remote --host 127.0.0.1 --port 0
serves a store in its own process and prints its address (used by the tests).
"""

from __future__ import annotations

import argparse
import itertools
import queue
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Callable, Mapping

import msgpack
import torch
import zmq

from ...model.config import dtype_name
from .base import Blob, ChunkError, Pending, Transport, as_bytes, host_copy, nbytes


def readonly_bytes(buf) -> torch.Tensor:
    """A uint8 tensor over a received (read-only) buffer, without a copy; we only ever read it."""
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buf, dtype=torch.uint8)


class ReplicaStore:
    """Chunks other workers flushed into this process's host memory, keyed by name."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
        else:
            self._sock.bind_to_random_port(f"tcp://{host}")
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._chunks: dict[str, tuple[dict, memoryview, object]] = {}  # key -> (meta, bytes, owner frame)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="replica-store", daemon=True)
        self._thread.start()

    # ---- local access (the holder's own worker) -----------------------------------------------------
    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [k for k in self._chunks if k.startswith(prefix)]

    def get(self, key: str) -> tuple[dict, memoryview]:
        with self._lock:
            if key not in self._chunks:
                raise ChunkError(f"chunk {key!r} is not in the replica store at {self.address}")
            meta, data, _ = self._chunks[key]
            return meta, data

    def nbytes(self) -> int:
        with self._lock:
            return sum(len(d) for _, d, _ in self._chunks.values())

    # ---- the server ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            ident, head, *payload = self._sock.recv_multipart(copy=False)
            req: dict = {}
            try:
                req = msgpack.unpackb(head.bytes)
                reply, frames = self._handle(req, payload)
            except Exception as e:  # a bad request must not kill the store; tell the client
                reply, frames = {"error": f"{type(e).__name__}: {e}"}, []
            reply["id"] = req.get("id") if isinstance(req, dict) else None
            self._sock.send_multipart([ident, msgpack.packb(reply), *frames], copy=False)
        self._sock.close(0)

    def _handle(self, req: dict, payload: list) -> tuple[dict, list]:
        op, key = req.get("op"), req.get("key", "")
        if op == "put":
            if len(payload) != 1 or len(payload[0].buffer) != req["nbytes"]:
                got = len(payload[0].buffer) if payload else 0
                return {"error": f"chunk {key!r} arrived with {got} bytes, header says {req['nbytes']}"}, []
            with self._lock:
                self._chunks[key] = (req.get("meta") or {}, payload[0].buffer, payload[0])
            return {"ok": True}, []
        if op == "get":
            with self._lock:
                hit = self._chunks.get(key)
            if hit is None:
                return {"error": f"chunk {key!r} is not in the replica store at {self.address}"}, []
            return {"ok": True, "meta": hit[0]}, [hit[1]]
        if op == "list":
            with self._lock:
                hits = [(k, m, d) for k, (m, d, _) in self._chunks.items() if k.startswith(req["prefix"])]
            return {"ok": True, "keys": [h[0] for h in hits], "metas": [h[1] for h in hits]}, [h[2] for h in hits]
        if op == "keys":  # the listing without the data
            with self._lock:
                hits = [(k, m) for k, (m, _, _) in self._chunks.items() if k.startswith(req["prefix"])]
            return {"ok": True, "keys": [h[0] for h in hits], "metas": [h[1] for h in hits]}, []
        if op == "drop":
            with self._lock:
                keys = [k for k in self._chunks if k.startswith(req["prefix"])]
                for k in keys:
                    del self._chunks[k]
            return {"ok": True, "count": len(keys)}, []
        return {"error": f"unknown replica-store operation {op!r}; expected put, get, list, keys or drop"}, []

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Acked(Pending):
    """A put in flight; done (without waiting) once the store has acknowledged it. ``seconds``: from the
    request's submission to its acknowledgement (set by the I/O thread)."""

    __slots__ = ("_fut", "nbytes")

    def __init__(self, fut: Future, keep: tuple, nbytes: int = 0) -> None:
        super().__init__(fut.result, keep=keep)
        self._fut, self.nbytes = fut, nbytes

    @property
    def done(self) -> bool:
        return self._done or self._fut.done()

    @property
    def seconds(self) -> float:
        f = self._fut
        return f.result()[0]["seconds"] if f.done() and f.exception() is None else 0.0


class RemoteHostTransport(Transport):
    """Client of peers' replica stores; ``peer`` is an index into ``addresses``."""

    name = "remote-host"
    BATCH = 32  # requests sent back to back before their answers are read

    def __init__(self, addresses: Mapping[int, str], timeout_s: float = 30.0) -> None:
        self.addresses = dict(addresses)
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._jobs: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        # One thread owns the sockets (zmq sockets are not thread-safe) and runs requests in order.
        self._thread = threading.Thread(target=self._run, name="remote-host-io", daemon=True)
        self._thread.start()

    def _address(self, key: str, peer: int) -> str:
        if peer not in self.addresses:
            raise ValueError(f"chunk {key!r}: no replica-store address for peer {peer}; "
                             f"known peers: {sorted(self.addresses)}")
        return self.addresses[peer]

    def _run(self) -> None:
        """Requests go out in order; those queued together are sent back to back and their answers read
        after (a store answers one connection in order), so a token step's put does not wait for the
        previous one's round trip."""
        socks: dict[str, zmq.Socket] = {}
        stop = False
        while not stop:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < self.BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            sent = []
            for address, header, frames, ready, fut, t0 in batch:
                try:
                    ready()  # the device->host copy of the chunk has landed
                    sock = socks.get(address)
                    if sock is None:
                        sock = socks[address] = self._ctx.socket(zmq.DEALER)
                        sock.setsockopt(zmq.LINGER, 0)
                        sock.connect(address)
                    sock.send_multipart([msgpack.packb(header), *frames], copy=False)
                    sent.append((address, sock, header, fut, t0))
                except BaseException as e:
                    fut.set_exception(e)
            for address, sock, header, fut, t0 in sent:
                try:
                    reply, payload = self._answer(socks, address, sock, header)
                    reply["seconds"] = time.perf_counter() - t0
                    fut.set_result((reply, payload))
                except BaseException as e:
                    fut.set_exception(e)
        for sock in socks.values():
            sock.close(0)

    def _answer(self, socks: dict, address: str, sock, header: dict) -> tuple[dict, list]:
        if socks.get(address) is not sock:
            raise ChunkError(f"replica store at {address}: {header['op']} of "
                             f"{header.get('key') or header.get('prefix')!r} was sent on a connection dropped "
                             f"after an earlier request timed out")
        while True:
            if not sock.poll(int(self.timeout_s * 1000)):
                # The reply may still come later; a fresh socket keeps it from being taken for the
                # answer to the next request.
                sock.close(0)
                del socks[address]
                raise TimeoutError(f"replica store at {address} did not answer {header['op']} of "
                                   f"{header.get('key') or header.get('prefix')!r} within {self.timeout_s} s")
            head, *payload = sock.recv_multipart(copy=False)
            reply = msgpack.unpackb(head.bytes)
            if reply.get("id") == header["id"]:
                break
        if "error" in reply:
            raise ChunkError(reply["error"])
        return reply, payload

    def _submit(self, address: str, header: dict, frames=(), ready=lambda: None) -> Future:
        fut: Future = Future()
        header["id"] = next(self._ids)
        self._jobs.put((address, header, list(frames), ready, fut, time.perf_counter()))
        return fut

    def put(self, key: str, data: torch.Tensor, meta: dict, *, peer: int = -1,
            ready: Callable[[], None] = lambda: None) -> _Acked:
        """Send the host bytes ``data`` (flat uint8) under ``key`` with ``meta`` as given, once ``ready()``
        returns (called on the I/O thread: e.g. a wait for the device copy that fills ``data``). ``data``
        must not change until the returned handle is done; its ``seconds`` then say how long the put took
        from now to the store's acknowledgement."""
        address = self._address(key, peer)
        header = {"op": "put", "key": key, "meta": meta, "nbytes": data.numel()}
        fut = self._submit(address, header, [memoryview(data.numpy())], ready)
        return _Acked(fut, keep=(data,), nbytes=data.numel())

    def flush(self, key: str, src: torch.Tensor, *, peer: int = -1, tag: int = 0,
              meta: dict | None = None) -> Pending:
        host, ready = host_copy(src)
        meta = dict(meta or {}, dtype=dtype_name(src.dtype), shape=list(src.shape))
        return self.put(key, as_bytes(host), meta, peer=peer, ready=ready.wait)

    def fetch(self, key: str, out: torch.Tensor, *, peer: int = -1, tag: int = 0) -> Pending:
        fut = self._submit(self._address(key, peer), {"op": "get", "key": key})

        def land() -> None:
            _, payload = fut.result()
            data = payload[0].buffer
            if len(data) != nbytes(out):
                raise ChunkError(f"chunk {key!r} holds {len(data)} bytes but the destination needs {nbytes(out)}")
            out.copy_(readonly_bytes(data).view(out.dtype).view(out.shape))

        return Pending(land)

    def fetch_all(self, prefix: str, *, peer: int = -1) -> list[Blob]:
        reply, payload = self._submit(self._address(prefix, peer), {"op": "list", "prefix": prefix}).result()
        return [Blob(k, m, readonly_bytes(f.buffer)) for k, m, f in zip(reply["keys"], reply["metas"], payload)]

    def drop(self, prefix: str, *, peer: int = -1) -> int:
        reply, _ = self._submit(self._address(prefix, peer), {"op": "drop", "prefix": prefix}).result()
        return int(reply["count"])

    def drop_later(self, prefix: str, *, peer: int = -1) -> Future:
        """Drop without waiting for the answer (in order with this transport's other requests)."""
        return self._submit(self._address(prefix, peer), {"op": "drop", "prefix": prefix})

    def keys(self, prefix: str, *, peer: int = -1) -> tuple[list[str], list[dict]]:
        """The keys under ``prefix`` in the peer's store, with each chunk's meta (no data moves)."""
        reply, _ = self._submit(self._address(prefix, peer), {"op": "keys", "prefix": prefix}).result()
        return list(reply["keys"]), list(reply["metas"])

    def close(self, wait: bool = True) -> None:
        """Stop the I/O thread after the requests queued so far; ``wait=False``: do not wait for it (its
        peer may be dead, and a request in flight then takes up to ``timeout_s``)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            if wait:
                self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a replica store in this process until stdin closes.")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    args = ap.parse_args(argv)
    store = ReplicaStore(args.host, args.port)
    print(store.address, flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    store.close()


if __name__ == "__main__":
    main()
