"""State replication for fault tolerance: a stage's KV cache, kept in the host memory of its ring successor.

Every decoding stage streams its cache into the replica store (``streaming/transports/remote.py``) of
the rank ``Topology.replica_holder`` names — the same TP shard of the next stage, the last stage's to the
first's: a microbatch's prompt once (after its prefill or hand-over), then each token step's new slice.
Transfers run on the streaming library's side stream and the transport's I/O thread, so compute never
waits for them; a chunk is replicated once the holder's store has acknowledged it.

Keys: ``rep/r{rank}/u{ubatch}/p`` (the prompt box, or, after a re-send, everything written so far) and
``rep/r{rank}/u{ubatch}/t{k}`` (decode step k). The prompt chunk's meta carries the microbatch's shape
(``slots``, ``max_seq``, ``lens``) and how many decode steps its box already covers, so a replacement
rebuilds its buffers from the replicas alone (:func:`restore_from_holder`).
"""

from __future__ import annotations

import re
from collections import deque

from ..model.kv_cache import KVCache
from ..streaming import Partition, StepReplicator, StreamStats, replicate_box, restore
from ..streaming.transports.local import LocalTransport
from ..streaming.transports.remote import RemoteHostTransport
from .cache_pool import CachePool

PATH = "replication"


def prefix(rank: int, ubatch: int | None = None) -> str:
    return f"rep/r{rank}/" + (f"u{ubatch}/" if ubatch is not None else "")


def partition(model, tp_rank: int, tp: int, slots: int) -> Partition:
    return Partition.shard(model_layers(model), num_kv_heads=model.cfg.num_kv_heads, tp_rank=tp_rank, tp_size=tp,
                           slots=(0, slots))


def model_layers(model) -> tuple[int, int]:
    return (model.first, model.last)


class Replicator:
    """One stage's replication into its holder's store.

    A token step runs through a :class:`~dejavu.streaming.StepReplicator` per KV buffer (set up once: the
    gather, a ring of staging buffers, host landing buffers and, on a GPU, a CUDA graph per landing
    buffer), which lands the step's slice in a host buffer of ``self.landing`` without the stage's thread
    waiting for anything; the transport's I/O thread then waits for the copy and sends the buffer, which
    goes back to the ring once the holder has acknowledged it (:meth:`poll`)."""

    # A buffer's next step comes a pipeline round after its last (every stage in between), far longer
    # than a copy or an acknowledgement takes: a few of each suffice. A step that finds no landing
    # buffer free takes one from the transport's pinned pool (counted in overflow_steps).
    DEPTH = 4  # token steps of one buffer whose device->host copies may be in flight at once
    LANDING = 4  # host buffers per KV buffer (one CUDA graph each): steps not yet acknowledged

    def __init__(self, rank: int, holder: int, address: str, model, tp_rank: int, tp: int, stats: StreamStats,
                 acked: dict | None = None) -> None:
        self.rank, self.holder, self.model, self.tp_rank, self.tp = rank, holder, model, tp_rank, tp
        self.stats = stats
        self.transport = RemoteHostTransport({holder: address})
        # Each step's bytes, until the holder has them (overflow: pinned in blocks of 8 MB, not 64).
        self.landing = LocalTransport(pin_memory=True, pinned_batch_bytes=8 << 20)
        self._steppers: dict[tuple, StepReplicator] = {}
        self.in_flight: deque = deque()  # (ubatch, step, handle, landing key or None); step -1 is the prompt
        # ubatch -> last step (-1: the prompt) its holder acknowledged; shared with the heartbeat, which
        # tells the controller.
        self.acked: dict[int, int] = {} if acked is None else acked
        self.acked.clear()

    def _part(self, cache: KVCache) -> Partition:
        return partition(self.model, self.tp_rank, self.tp, cache.shape.batch)

    def _stepper(self, cache: KVCache) -> StepReplicator:
        """The step replicator of the buffer ``cache`` views (a pool's buffers are few and fixed; swapping
        only rebinds a microbatch's cache to one of them). It keeps that buffer alive: a pool that replaces
        a buffer by a longer one (a longer microbatch came) leaves the old one to this replicator, which
        the next failure generation drops."""
        data = cache.data
        key = (data.data_ptr(), tuple(data.shape), tuple(data.stride()))
        stepper = self._steppers.get(key)
        if stepper is None:
            stepper = StepReplicator(data, self._part(cache), self.landing, depth=self.DEPTH, reserve=self.LANDING)
            self._steppers[key] = stepper
        return stepper

    def prompt(self, ubatch: int, cache: KVCache, lens: list[int], max_seq: int, steps: int = 0) -> None:
        """The microbatch's cache up to its prompt (plus ``steps`` decode steps, on a re-send) as one chunk."""
        part = self._part(cache)
        end = min(max(lens) + steps, cache.shape.max_seq)
        meta = {"ubatch": {"id": ubatch, "slots": cache.shape.batch, "max_seq": max_seq, "lens": list(lens),
                           "steps": steps}}
        h = replicate_box(cache.data, part, part.box((0, end)), self.transport, key=prefix(self.rank, ubatch) + "p",
                          peer=self.holder, stats=None, path=PATH, meta=meta)
        self._stepper(cache)  # set up now, before its first step, where a prefill was just paid for
        self._track(ubatch, steps - 1, h)

    def step(self, ubatch: int, cache: KVCache, k: int, positions) -> None:
        """Decode step ``k``'s slice: slot i wrote position ``positions[i]``: host integers, or a device
        tensor that the compute stream has just read them from (snapshotted there, see StepReplicator)."""
        key = prefix(self.rank, ubatch) + f"t{k}"
        if self.landing.holds(key):  # re-sent after a recovery while the first send is unacknowledged
            self.wait()
        stepper = self._stepper(cache)
        stepper.step(positions, key=key)
        chunk = self.landing.stored(key)
        h = self.transport.put(key, chunk.data, chunk.meta, peer=self.holder, ready=stepper.landed())
        self._track(ubatch, k, h, key)

    @property
    def overflow_steps(self) -> int:
        """Steps that found none of their buffer's landing buffers free (the holder acknowledged slowly)."""
        return sum(s.overflow_steps for s in self._steppers.values())

    def drop(self, ubatch: int) -> None:
        self.acked.pop(ubatch, None)
        self.transport.drop_later(prefix(self.rank, ubatch), peer=self.holder)

    def _track(self, ubatch: int, step: int, handle, key: str | None = None) -> None:
        self.in_flight.append((ubatch, step, handle, key))
        self.poll()

    def poll(self) -> None:
        """Count what the holder has acknowledged and give its landing buffers back (never waits)."""
        while self.in_flight and self.in_flight[0][2].done:
            self._retire(*self.in_flight.popleft())

    def wait(self) -> None:
        """Until every chunk sent so far is acknowledged (or failed)."""
        while self.in_flight:
            self._retire(*self.in_flight.popleft())

    def _retire(self, u: int, k: int, h, key: str | None) -> None:
        try:
            h.wait()
        except Exception:  # noqa: BLE001 — a holder that died: recovery re-sends everything
            return
        finally:
            if key is not None:
                self.landing.discard(key)  # its host buffer goes back to its step replicator
        self.stats.add(PATH, self.transport.name, h.nbytes, h.seconds or 0.0)
        self.acked[u] = max(self.acked.get(u, -2), k)

    def close(self, wait: bool = True) -> None:
        for stepper in self._steppers.values():
            stepper.wait()  # device copies into the landing buffers: they land whatever the holder does
        self.transport.close(wait=wait)


def restore_from_holder(pool: CachePool, model, rank: int, tp_rank: int, tp: int, holder: int, address: str,
                        stats: StreamStats, timeout_s: float = 60.0) -> tuple[dict[int, dict], int]:
    """A replacement's own caches, back from its holder's store into fresh buffers of ``pool``.

    Returns ({ubatch: {"prompt": True, "steps": n, "lens": [...], "max_seq": m}}, bytes restored): the
    prompt and the first ``n`` decode steps are back (steps replicated past a gap are written too, and
    harmless: recovery recomputes from step n and overwrites them)."""
    transport = RemoteHostTransport({holder: address}, timeout_s=timeout_s)
    try:
        keys, metas = transport.keys(prefix(rank), peer=holder)
        out, total = {}, 0
        by_ubatch: dict[int, dict] = {}
        for key, meta in zip(keys, metas):
            m = re.fullmatch(rf"rep/r{rank}/u(-?\d+)/(p|t(\d+))", key)
            if not m:
                continue
            u = int(m.group(1))
            entry = by_ubatch.setdefault(u, {"meta": None, "steps": set()})
            if m.group(2) == "p":
                entry["meta"] = meta.get("ubatch")
            else:
                entry["steps"].add(int(m.group(3)))
        for u, entry in sorted(by_ubatch.items()):
            info = entry["meta"]
            if info is None:
                continue  # steps without their prompt cannot be used
            pool.acquire(u, int(info["slots"]), int(info["max_seq"]))
            lease = pool.make_resident(u)  # with swapping: in a device buffer, copied out when evicted
            part = partition(model, tp_rank, tp, lease.cache.shape.batch)
            restore(lease.cache.data, part, transport, prefix=prefix(rank, u), peer=holder, stats=stats, path="recovery")
            n = int(info["steps"])
            while n in entry["steps"]:
                n += 1
            out[u] = {"prompt": True, "steps": n, "lens": list(info["lens"]), "max_seq": int(info["max_seq"])}
        total = sum(t["bytes"] for t in stats.as_dict().get("recovery", {}).values())
        return out, int(total)
    finally:
        transport.close()
