"""stream_out / stream_in: run a plan's chunks through a transport, plus swap and replication.

The optimization ladder (paper §5.1), switchable one step at a time with :class:`StreamOptions`:

- ``naive``: one transfer per (layer, k/v) block of each chunk, straight from the strided cache view
  (the transport makes it contiguous however it can: on a GPU that is a kernel plus a copy, each);
- ``buffered``: each chunk gathered into a reusable staging buffer on the cache's device with one
  strided copy, then moved as one contiguous transfer;
- ``layerwise``: buffered, one transfer per layer, issued from :meth:`LayerwiseStreamer.on_layer_done`
  as soon as the stage has written that layer, on a side CUDA stream, so it overlaps the next layers'
  compute.

Sender and receiver must use the same options (they decide how chunks are cut into messages); both
derive the same ordered message list from the plan, and messages are tagged by their index in it.

Functions a worker calls:

- prompt -> token handover: :class:`LayerwiseStreamer` (prompt stage, passed as ``on_layer_done`` to
  the stage's forward) or :func:`stream_out`; :func:`stream_in` on the token stage.
- per-step replication to the next stage's host: :func:`replicate_step` (and :func:`replicate_box` for
  the prompt's cache); :func:`restore` reads replicas back into a cache after a failure.
- swap of a microbatch: :func:`swap_out` / :func:`swap_in`.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.config import dtype_name
from .plan import Box, Chunk, Partition, Plan
from .staging import StagingPool, StepSlice, gather, gather_step, scatter, scatter_step
from .stats import StreamStats
from .transports.base import ChunkError, Pending, Transport, nbytes, side_stream

LADDER = ("naive", "buffered", "layerwise")


@dataclass(frozen=True)
class StreamOptions:
    buffered: bool = True
    layerwise: bool = True
    # How many gathered messages may be in flight at once (each needs its own staging buffer); None:
    # all of an operation's messages, so a call never waits on its own transfers. A bound caps staging
    # memory; with point-to-point transports use it only when each process streams one partition.
    staging_slots: int | None = None

    @classmethod
    def named(cls, name: str, **kw) -> "StreamOptions":
        if name not in LADDER:
            raise ValueError(f"unknown streaming mode {name!r}; expected one of {LADDER}")
        return cls(buffered=name != "naive", layerwise=name == "layerwise", **kw)

    @property
    def mode(self) -> str:
        return "layerwise" if self.layerwise and self.buffered else "buffered" if self.buffered else "naive"


@dataclass(frozen=True)
class Message:
    """One contiguous transfer: a piece of a chunk, its key in stores and its tag on the wire."""

    chunk: Chunk
    box: Box
    tag: int
    key: str
    src_index: tuple  # where the box sits in the sender's buffer (slices, worked out once per plan)
    dst_index: tuple  # ... and in the receiver's

    @functools.cached_property
    def meta(self) -> dict:
        return {"box": self.box.to_meta()}


_MEMO_LIMIT = 512


def messages(plan: Plan, options: StreamOptions, prefix: str) -> tuple[Message, ...]:
    """The plan's chunks cut into transfers, in the order both sides issue them (kept in ``plan.memo``:
    a token step replays the same plan object every step)."""
    memo_key = ("messages", options.buffered, options.layerwise, prefix)
    found = plan.memo.get(memo_key)
    if found is not None:
        return found
    items: list[tuple[int, Box]] = []
    for ci, chunk in enumerate(plan.chunks):
        boxes = chunk.box.split_layers() if options.layerwise or not options.buffered else [chunk.box]
        if not options.buffered:
            boxes = [k for b in boxes for k in b.split_kv()]
        items += [(ci, b) for b in boxes]
    if options.layerwise:
        items.sort(key=lambda it: (it[1].layers[0], it[0]))  # stable: k before v within a layer
    out = []
    for tag, (ci, box) in enumerate(items):
        c = plan.chunks[ci]
        out.append(Message(c, box, tag, f"{prefix}/{box.name()}", plan.senders[c.src].local(box),
                           plan.receivers[c.dst].local(box)))
    if len(plan.memo) > _MEMO_LIMIT:  # a caller naming every stream anew (prefix) must not grow it forever
        plan.memo.clear()
    return plan.memo.setdefault(memo_key, tuple(out))


def _side_messages(plan: Plan, options: StreamOptions, prefix: str, side: str, index: int) -> tuple[Message, ...]:
    """The messages sender ``index`` issues (side "src") or receiver ``index`` posts (side "dst")."""
    memo_key = (side, index, options.buffered, options.layerwise, prefix)
    found = plan.memo.get(memo_key)
    if found is None:
        found = plan.memo.setdefault(memo_key, tuple(m for m in messages(plan, options, prefix)
                                                      if getattr(m.chunk, side) == index))
    return found


_EVENTS = threading.local()


def follow(waiter: "torch.cuda.Stream", stream: "torch.cuda.Stream") -> None:
    """``waiter.wait_stream(stream)`` through one reusable event per thread and device, where
    ``wait_stream`` makes (and later destroys) an event per call; a waiting stream holds on to the
    event's state at the time of the wait, so re-recording it afterwards is safe."""
    events = _EVENTS.__dict__
    event = events.get(stream.device_index)
    if event is None:
        event = events[stream.device_index] = torch.cuda.Event()
    event.record(stream)
    waiter.wait_event(event)


class on_side_stream:
    """``with on_side_stream(device):`` runs the body's GPU work on the streaming side stream, after
    everything already queued on the current (compute) stream; on the CPU it just runs the body.

    A class rather than a generator-based context manager, and ``set_stream`` rather than
    ``torch.cuda.stream``: this is entered once per streamed operation, up to every token step.
    """

    __slots__ = ("device", "_prev", "_ctx")

    def __init__(self, device: torch.device) -> None:
        self.device, self._prev, self._ctx = device, None, None

    def __enter__(self) -> None:
        if self.device.type != "cuda":
            return
        side = side_stream(self.device)
        if self.device.index is not None and self.device.index != torch.cuda.current_device():
            self._ctx = torch.cuda.stream(side)  # another device: let torch switch devices and back
            side.wait_stream(torch.cuda.current_stream(self.device))
            self._ctx.__enter__()
            return
        self._prev = torch.cuda.current_stream()
        follow(side, self._prev)
        torch.cuda.set_stream(side)

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            torch.cuda.set_stream(self._prev)
            self._prev = None
        elif self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None


class Handle:
    """Transfers of one operation; ``wait()`` blocks until all have landed and records the stats."""

    def __init__(self, transport: Transport, stats: StreamStats | None, path: str,
                 device: torch.device | None = None) -> None:
        self.transport, self.stats, self.path = transport, stats, path
        self.device = device if device is not None and device.type == "cuda" else None
        self.pending: list[Pending] = []
        self.nbytes = 0
        self.t0: float | None = None
        self.seconds: float | None = None

    def add(self, pending: Pending, size: int) -> Pending:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        self.pending.append(pending)
        self.nbytes += size
        return pending

    def wait(self) -> float:
        """Wait for every transfer; returns the seconds from the first issue to the last landing."""
        if self.seconds is None:
            for p in self.pending:
                p.wait()
            if self.device is not None:  # whatever the side stream wrote is visible to the compute
                follow(torch.cuda.current_stream(self.device), side_stream(self.device))
            self.seconds = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
            if self.stats is not None:
                self.stats.add(self.path, self.transport.name, self.nbytes, self.seconds)
        return self.seconds

    @property
    def done(self) -> bool:
        return all(p.done for p in self.pending)


class _Slots:
    """Round-robin staging slots; a slot is reused only after the transfer that used it finished."""

    def __init__(self, pool: StagingPool, count: int) -> None:
        self.pool, self.count, self.next = pool, max(1, count), 0
        self.users: dict[int, Pending] = {}

    def take(self, shape, dtype) -> tuple[int, torch.Tensor]:
        i = self.next % self.count
        self.next += 1
        if i in self.users:
            self.users.pop(i).wait()
        return i, self.pool.take(i, tuple(shape), dtype)


def _peer(peers: Sequence[int] | None, index: int) -> int:
    return -1 if peers is None else peers[index]


class LayerwiseStreamer:
    """Streams one sender partition's chunks while the stage computes.

    Pass :meth:`on_layer_done` as the stage's ``on_layer_done`` callback (it gets the local layer
    index); each message is issued as soon as every layer it covers has been written. Call
    :meth:`finish` after the forward; it issues whatever is left and returns the :class:`Handle`.

    ``staging``: a :class:`StagingPool` the caller keeps across microbatches (reuse it once the previous
    handle is waited), so that no call allocates device memory while the stage computes; without it each
    streamer takes fresh buffers from the caching allocator (a cudaMalloc when it has none cached).
    """

    def __init__(self, cache: torch.Tensor, plan: Plan, src: int, transport: Transport, *, prefix: str,
                 peers: Sequence[int] | None = None, options: StreamOptions = StreamOptions(),
                 stats: StreamStats | None = None, path: str = "prompt->token",
                 staging: StagingPool | None = None) -> None:
        self.cache, self.part, self.transport = cache, plan.senders[src], transport
        self.peers, self.options = peers, options
        self.todo = list(_side_messages(plan, options, prefix, "src", src))
        self.handle = Handle(transport, stats, path)
        pool = staging or StagingPool(cache.device)
        self.slots = _Slots(pool, options.staging_slots or len(self.todo))

    def on_layer_done(self, local_layer: int) -> None:
        if not self.options.layerwise and local_layer < self.part.layers[1] - self.part.layers[0] - 1:
            return  # below the top of the ladder, nothing moves until the stage's last layer is written
        done = self.part.layers[0] + local_layer + 1  # global layers [.., done) are written
        ready = [m for m in self.todo if m.box.layers[1] <= done]
        if not ready:
            return
        self.todo = [m for m in self.todo if m.box.layers[1] > done]
        # Gathers and copies go on the side stream, after the layer's writes, so the compute stream
        # runs on into the next layer meanwhile.
        with on_side_stream(self.cache.device):
            for m in ready:
                self._send(m)

    def _send(self, m: Message) -> None:
        view = self.cache[m.src_index]
        slot = None
        if self.options.buffered and not view.is_contiguous():
            slot, src = self.slots.take(view.shape, view.dtype)
            src.copy_(view, non_blocking=True)  # gather: one strided copy on the cache's device
        else:
            src = view
        pending = self.transport.flush(m.key, src, peer=_peer(self.peers, m.chunk.dst), tag=m.tag,
                                       meta=m.meta)
        self.handle.add(pending, nbytes(view))
        if slot is not None:
            self.slots.users[slot] = pending

    def finish(self, wait: bool = True) -> Handle:
        self.on_layer_done(self.part.layers[1] - self.part.layers[0] - 1)
        if wait:
            self.handle.wait()
        return self.handle


def stream_out(cache: torch.Tensor, plan: Plan, src: int, transport: Transport, *, prefix: str,
               peers: Sequence[int] | None = None, options: StreamOptions = StreamOptions(),
               stats: StreamStats | None = None, path: str = "prompt->token",
               staging: StagingPool | None = None) -> Handle:
    """Issue every chunk sender ``src`` owes (its cache already computed); ``wait()`` the handle.

    ``cache`` is the sender's buffer ``[layers, 2, slots, heads, max_seq, head_dim]`` for
    ``plan.senders[src]``; ``peers[dst]`` is the rank (or store index) of receiver ``dst``; ``prefix``
    names this stream (e.g. ``"mb3"``) so that stored chunks of different streams do not collide.
    """
    streamer = LayerwiseStreamer(cache, plan, src, transport, prefix=prefix, peers=peers, options=options,
                                 stats=stats, path=path, staging=staging)
    return streamer.finish(wait=False)


def stream_in(cache: torch.Tensor, plan: Plan, dst: int, transport: Transport, *, prefix: str,
              peers: Sequence[int] | None = None, options: StreamOptions = StreamOptions(),
              stats: StreamStats | None = None, path: str = "prompt->token",
              staging: StagingPool | None = None) -> Handle:
    """Post every fetch receiver ``dst`` is owed, scattering each into ``cache``; ``wait()`` the handle.

    ``peers[src]`` is the rank (or store index) of sender ``src``. Only the plan's positions are
    written; the rest of ``cache`` is left as it was.
    """
    todo = _side_messages(plan, options, prefix, "dst", dst)
    handle = Handle(transport, stats, path, cache.device)
    slots = _Slots(staging or StagingPool(cache.device), options.staging_slots or len(todo))

    def scatter_into(view: torch.Tensor, buf: torch.Tensor) -> None:
        with on_side_stream(cache.device):  # the staging buffer belongs to the side stream
            view.copy_(buf, non_blocking=True)

    with on_side_stream(cache.device):
        for m in todo:
            view = cache[m.dst_index]
            peer = _peer(peers, m.chunk.src)
            if options.buffered and not view.is_contiguous():
                slot, buf = slots.take(view.shape, view.dtype)
                got = transport.fetch(m.key, buf, peer=peer, tag=m.tag)
                # Scatter into the cache once the contiguous message has landed.
                pending = Pending(got.wait, then=lambda v=view, b=buf: scatter_into(v, b), keep=(buf,))
                slots.users[slot] = pending
            else:
                pending = transport.fetch(m.key, view, peer=peer, tag=m.tag)
            handle.add(pending, nbytes(view))
    return handle


# ---- swap ------------------------------------------------------------------------------------------
def swap_out(cache: torch.Tensor, transport: Transport, key: str, *, stats: StreamStats | None = None,
             path: str = "swap") -> Handle:
    """Copy a microbatch's whole cache buffer (one contiguous block) out under ``key``.

    With the local transport on a GPU this is one device->pinned-host copy on a side stream; the
    buffer may be reused for another microbatch once the handle is waited.
    """
    handle = Handle(transport, stats, path, cache.device)
    with on_side_stream(cache.device):
        handle.add(transport.flush(key, cache), nbytes(cache))
    return handle


def swap_in(cache: torch.Tensor, transport: Transport, key: str, *, stats: StreamStats | None = None,
            path: str = "swap") -> Handle:
    """Copy a swapped-out microbatch back into ``cache`` (prefetch: wait only before its turn)."""
    handle = Handle(transport, stats, path, cache.device)
    with on_side_stream(cache.device):
        handle.add(transport.fetch(key, cache), nbytes(cache))
    return handle


# ---- replication -----------------------------------------------------------------------------------
def replicate_step(cache: torch.Tensor, part: Partition, slots: Sequence[int], positions: Sequence[int],
                   transport: Transport, *, key: str, peer: int = -1, stats: StreamStats | None = None,
                   path: str = "replication", meta: dict | None = None) -> Handle:
    """Send one token step's slice (slot ``slots[i]`` wrote position ``positions[i]``, every layer).

    Gathered with one indexing kernel into ``[slots, layers, kv, heads, head_dim]`` and flushed under
    ``key`` (e.g. ``"rep/stage1/mb3/t17"``) with its region in the chunk's meta, so :func:`restore` can
    put it back. The handle completes when the peer's store has it.
    """
    step = StepSlice.of(part, slots, positions)
    handle = Handle(transport, stats, path)
    with on_side_stream(cache.device):  # the gather too: the compute stream only pays a wait_stream
        buf = gather_step(cache, part, step)
        handle.add(transport.flush(key, buf, peer=peer, meta={**(meta or {}), "step": step.to_meta()}), nbytes(buf))
    return handle


def replicate_box(cache: torch.Tensor, part: Partition, box: Box, transport: Transport, *, key: str,
                  peer: int = -1, stats: StreamStats | None = None, path: str = "replication",
                  meta: dict | None = None) -> Handle:
    """Send a box of the cache (e.g. a prompt's positions ``[0, P)`` after prefill) as one chunk."""
    handle = Handle(transport, stats, path)
    with on_side_stream(cache.device):
        buf = gather(cache, part, box)
        handle.add(transport.flush(key, buf, peer=peer, meta={**(meta or {}), "box": box.to_meta()}), nbytes(buf))
    return handle


def restore(cache: torch.Tensor, part: Partition, transport: Transport, *, prefix: str, peer: int = -1,
            stats: StreamStats | None = None, path: str = "recovery") -> int:
    """Write every replicated chunk stored under ``prefix`` back into ``cache``; returns how many.

    Chunks are boxes (:func:`replicate_box`, :meth:`StepReplicator.box`) or step slices
    (:func:`replicate_step`, :meth:`StepReplicator.step`); each carries its region, so order does not
    matter (they are disjoint, and a re-sent step replaced its key). A step slice's positions are in its
    meta, or (StepReplicator: the host never saw them) as int64 at byte ``positions_at`` of the chunk.
    """
    t0 = time.perf_counter()
    blobs = transport.fetch_all(prefix, peer=peer)
    want = dtype_name(cache.dtype)
    head_dim, itemsize = cache.shape[-1], cache.element_size()
    total = 0
    for blob in blobs:
        if blob.meta.get("dtype") != want:
            raise ChunkError(f"replica chunk {blob.key!r} holds {blob.meta.get('dtype')} data; the cache is {want}")
        if "box" in blob.meta:
            box = Box.from_meta(blob.meta["box"])
            size = box.count() * head_dim * itemsize
            _check_size(blob, size)
            scatter(cache, part, box, blob.data[:size].view(cache.dtype).to(cache.device))
        elif "step" in blob.meta:
            meta = blob.meta["step"]
            if "positions" not in meta:
                at, n = blob.meta.get("positions_at"), len(meta["slots"])
                if at is None:
                    raise ChunkError(f"replica chunk {blob.key!r} has no positions (neither in its meta "
                                     f"nor a 'positions_at')")
                _check_size(blob, at + 8 * n)
                meta = dict(meta, positions=blob.data[at:at + 8 * n].clone().view(torch.int64).tolist())
            step = StepSlice.from_meta(meta)
            size = math.prod(step.shape(head_dim)) * itemsize
            _check_size(blob, size)
            scatter_step(cache, part, step, blob.data[:size].view(cache.dtype))
        else:
            raise ChunkError(f"replica chunk {blob.key!r} names no region (neither 'box' nor 'step' in its meta)")
        total += size
    if cache.is_cuda:
        torch.cuda.current_stream(cache.device).synchronize()
    if stats is not None:
        stats.add(path, transport.name, total, time.perf_counter() - t0)
    return len(blobs)


def _check_size(blob, size: int) -> None:
    if blob.data.numel() < size:
        raise ChunkError(f"replica chunk {blob.key!r} holds {blob.data.numel()} bytes, its region needs {size}")
