"""A worker that survives its peers' failures: it serves one generation of the data plane at a time.

Generation 0 starts with the run. When a worker fails, the controller sends every survivor a Reset
for generation g+1 (on the heartbeat socket, which a busy serving thread never blocks). The survivor
then (DESIGN.md §5):

1. marks the serving thread's generation stale and waits until that thread has left or sits blocked in
   the data plane — it never touches a cache or a socket again (``StageWorker.comm`` checks on return);
2. drops the old data plane, keeps its model, its KV buffers and the replicas it holds for its
   predecessor;
3. joins generation g+1's rendezvous (a fresh prefix of the controller's store; it runs in a thread of
   its own, so a newer Reset — another failure during recovery — abandons it too);
4. reports what it holds (``Rejoin``) and waits for ``Resume``: which microbatches every stage forgets
   (their prompts come again), which ranks re-send their replicas (their holder was replaced), and, for
   the pipeline's leader, which microbatches continue from which decode step;
5. serves again.

A replacement (``--restart``, a restarted process or a hot spare) first restores its own caches from the
replicas its holder keeps, then joins at step 3.
"""

from __future__ import annotations

import threading
import time

import torch

from ..model.kv_cache import KVCache
from ..protocol import PeerLost, Rejoin, Resume, Submit
from .pipeline import Stale, StageWorker

# Errors of a serving thread that mean "a peer is gone", not "this worker is broken".
PEER_ERRORS = ("connection closed by peer", "connection reset", "broken pipe", "channel from rank",
               "gloo", "nccl", "timed out", "timeout")


class Superseded(Exception):
    """A newer failure generation started while this one was being set up."""


class Recovery:
    def __init__(self, worker: StageWorker, ctl, make_dataplane, *, comm, store=None, log=print) -> None:
        self.w, self.ctl, self.make_dataplane, self.comm, self.store, self.log = worker, ctl, make_dataplane, comm, store, log
        self.rank = worker.role.rank
        self.restored_bytes, self.restore_s = 0, 0.0
        self.dp = None
        self.stores: dict[int, str] = {}  # rank -> replica store address, as of the last Resume

    # ---- the loop over generations -------------------------------------------------------------------
    def serve(self, generation: int, *, rejoin: bool) -> None:
        """Serve until the stop comes down the pipeline. ``rejoin``: this generation is not the run's
        first for this worker (a replacement, or after a reset), so it reports what it holds first."""
        g = generation
        while True:
            try:
                self.dp = self._rendezvous(g)
                self.comm.target = self.dp.tp_comm()
                self.w.attach(self.dp, g)
                if rejoin:
                    self.ctl.send(Rejoin(self.rank, g, self.store.address if self.store else "", self.w.holdings(),
                                         self.restored_bytes, self.restore_s))
                # Every generation starts with the controller's word: the replica stores' addresses
                # and, after a failure, what to forget, re-send and resume.
                self._apply(self._wait_resume(g))
            except Superseded:
                g, rejoin = self._drop_generation(), True
                continue
            ended = self._run_generation()
            if ended is None:
                return
            if not isinstance(ended, Stale):
                why = f"{type(ended).__name__}: {ended}"
                if not any(e in why.lower() for e in PEER_ERRORS):
                    raise ended
                self.log(f"data plane of generation {g} broke ({why[:200]}); waiting for the controller")
                try:
                    self.ctl.send(PeerLost(self.rank, g, why[:500]))
                except Exception:  # noqa: BLE001 — the heartbeat still tells the controller we live
                    pass
            g, rejoin = self._drop_generation(wait_for=g), True

    def _drop_generation(self, wait_for: int | None = None) -> int:
        """Wait for the Reset past ``wait_for`` (if not here yet), abandon the old generation; the new one."""
        if wait_for is not None:
            self.ctl.wait_for_reset(wait_for)
        if self.w.stale is not None:
            self.w.stale.set()
        if self.dp is not None:
            self.dp.close()
            self.dp = None
        if self.w.replicator is not None:
            self.w.replicator.close(wait=False)  # its holder may be the dead one: never wait on it
            self.w.replicator = None
        self.w.initial_items = []
        self.log(f"reset for failure generation {self.ctl.reset_generation}: caches kept, rejoining")
        return self.ctl.reset_generation

    def _rendezvous(self, g: int):
        """Build generation ``g``'s data plane in a thread; a newer Reset abandons it (Superseded)."""
        box: dict = {}

        def build() -> None:
            try:
                box["dp"] = self.make_dataplane(g)
            except BaseException as e:  # noqa: BLE001 — handed to the waiting thread
                box["error"] = e

        t = threading.Thread(target=build, name=f"rendezvous-{g}", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            if self.ctl.reset_generation > g:
                raise Superseded()
        if "error" in box:
            if self.ctl.reset_generation > g:
                raise Superseded()
            raise box["error"]
        return box["dp"]

    def _wait_resume(self, g: int) -> Resume:
        while True:
            if self.ctl.reset_generation > g:
                raise Superseded()
            msgs = self.ctl.poll(100)
            for i, msg in enumerate(msgs):
                if isinstance(msg, Resume) and msg.generation == g:
                    # What came after it (new Submits) is the new generation's: the leader's mailbox.
                    if self.w.mailbox is not None:
                        self.w.mailbox.local.extend(("ctl", m) for m in msgs[i + 1:])
                    return msg
                # Anything older (a Submit the dead generation never read) is superseded: the
                # controller submits again every microbatch that no stage holds.
                if not isinstance(msg, (Resume, Submit)):
                    self.log(f"ignoring {type(msg).__name__} while waiting to resume")

    def _run_generation(self) -> BaseException | None:
        """Run the serving loop in a thread until it ends (None), fails, or a Reset abandons it."""
        box: dict = {}

        def serve() -> None:
            try:
                if self.w.device.type == "cuda":  # a new thread starts on GPU 0: this worker's may be another
                    torch.cuda.set_device(self.w.device)
                self.w.run()
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        g = self.w.generation
        t = threading.Thread(target=serve, name=f"serve-{g}", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            if self.ctl.reset_generation > g:
                self.w.stale.set()
                # Let the thread reach a safe point: gone, or blocked in the data plane.
                deadline = time.monotonic() + 60
                while t.is_alive() and not (self.w.in_comm or self.comm.waiting) and time.monotonic() < deadline:
                    t.join(0.01)
                return Stale(f"generation {g} abandoned")
        return box.get("error")

    # ---- replication ---------------------------------------------------------------------------------
    def _make_replicator(self) -> None:
        if self.w.replicator is not None:
            self.w.replicator.close(wait=False)
        self.w.replicator = None
        holder = self.w.topo.replica_holder(self.rank)
        address = self.stores.get(holder) if holder is not None else None
        if self.store is None or not address:
            return
        from .replication import Replicator

        self.w.replicator = Replicator(self.rank, holder, address, self.w.model, self.w.role.tp_rank,
                                       self.w.topo.tp, self.w.kv_stats, acked=self.ctl.replicated)

    def _apply(self, resume: Resume) -> None:
        self.stores = {int(k): v for k, v in resume.stores.items()}
        self._make_replicator()
        for u in resume.drop:
            self.w.forget(u)
        rep = self.w.replicator
        if rep is not None and self.rank in resume.resend:
            for u, ub in sorted(self.w.states.items()):
                if ub.prompt:
                    # Wherever it lives now: a resident buffer, or its host block when swapped out.
                    cache = KVCache.from_tensor(self.w.pool.cache_of(u)[:, :, : len(ub.lens)])
                    rep.prompt(u, cache, ub.lens, ub.max_seq, steps=ub.written)
        if self.w.role.is_leader and self.w.role.pipeline == "token":
            self.w.initial_items = [({**it, "kind": "resume"},
                                     torch.tensor([o[-1] for o in it["outputs"]]).view(-1, 1)) for it in resume.items]
        self.log(f"resuming generation {resume.generation}: {len(resume.items)} microbatches continue, "
                 f"{len(resume.drop)} dropped (the controller submits their requests again)")
