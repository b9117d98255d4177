"""The controller process: admit workers, submit microbatches on time, collect tokens, notice failures.

One ZeroMQ ROUTER socket, bound to ``--controller_ip:--port``, serves every worker's two DEALERs (main
and heartbeat, see ``dejavu.protocol``). The run goes through three phases:

1. start-up — every rank says Hello (the reply syncs its clock to ours) and, once it holds its layers
   and has joined the data plane, Ready;
2. serving — microbatches (``--ubatch_size`` requests, in arrival order) go to the entry rank when
   their last request has arrived; tokens come back from the samplers; when every request has ended,
   the entry rank is told to Shutdown and the stop travels down the pipelines;
3. wrap-up — each worker sends its timeline (Stats); the results folder is written.

A worker that reports an Error, misses its heartbeat deadline, or a run that stops making progress ends
the run: every worker is told to Abort, and the results folder still records which requests finished
(``ok``), which were in flight (``failed``) and which never started (``unfinished``).
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..protocol import (Abort, Error, FaultPoint, Heartbeat, HeartbeatAck, Hello, PeerLost, ProcessGone, ProtocolError, Ready,
                        Rejoin, Shutdown, Stats, Submit, Tokens, Welcome, from_msg, to_msg)
from ..records import Request, RequestRecord, StageEvent
from ..worker.topology import Topology
from .options import ControllerOptions


class RunFailed(RuntimeError):
    pass


@dataclass
class WorkerInfo:
    rank: int
    hello: Hello | None = None
    ready: Ready | None = None
    stats: Stats | None = None
    last_heartbeat: float = 0.0  # controller clock
    errors: list[Error] = field(default_factory=list)
    lost_host: str | None = None  # where its last process ran, once it failed
    replicated: dict = field(default_factory=dict)  # ubatch -> last step its replica holder acknowledged

    def label(self, topo: Topology) -> str:
        r = topo.role(self.rank)
        where = f"{r.name}" + (f" tp{r.tp_rank}" if topo.tp > 1 else "")
        host = f" on {self.hello.host} pid {self.hello.pid}" if self.hello else ""
        return f"worker {self.rank} ({where}{host})"


@dataclass
class RunResult:
    ok: bool
    records: list[RequestRecord]
    events: list[StageEvent]
    worker_stats: dict[int, dict]
    error: str | None = None
    summary: dict | None = None
    failures: list[dict] | None = None  # one entry per failure generation (fault-tolerant runs)


class Controller:
    def __init__(self, opts: ControllerOptions, topo: Topology, requests: list[Request], *, log=print) -> None:
        self.opts, self.topo, self.requests, self.log = opts, topo, requests, log
        self.t0 = time.perf_counter()
        self.run_start: float | None = None  # controller clock when every worker was ready
        self.workers = {r: WorkerInfo(r) for r in range(topo.world_size)}
        self.records = {r.id: RequestRecord(r.id, list(r.prompt_ids), arrival_s=r.arrival_s) for r in requests}
        self._steps: dict[int, dict[int, int]] = {r.id: {} for r in requests}
        self._final_step: dict[int, int] = {}
        self.submitted: set[int] = set()
        self.done: set[int] = set()
        self.last_progress = 0.0
        self.progress = None  # the terminal progress line (dejavu.results.progress), while serving
        self.failure: tuple[float, str] | None = None  # (when, why) of the first sign of failure
        self.interrupted: str | None = None
        self.tokens_total = 0
        self._suspected_at = -1e9  # when a survivor last reported a broken data plane
        self.ft = None  # recovery.FaultTolerance, when the run survives failures
        if opts.recoverable:
            from .recovery import FaultTolerance, Injection

            self.ft = FaultTolerance(self, [Injection.from_dict(d) for d in opts.injections])
        self.store = self._rendezvous_store() if self.ft is not None else None
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises, not drops
        # A replacement connects under its rank's identity while its hung predecessor's connection may
        # still be open: the newer connection takes the identity over.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        address = f"tcp://{opts.controller_ip}:{opts.port}"
        try:
            self.sock.bind(address)
        except zmq.ZMQError as e:
            raise RunFailed(f"cannot listen on {address} (--controller_ip / --port): {e}") from None
        self.log(f"controller listening on {address}, waiting for {topo.world_size} workers")

    def _rendezvous_store(self):
        """A run that survives failures rebuilds the workers' data plane per failure generation; the
        rendezvous store lives here, in the one process that is never replaced (MASTER_PORT)."""
        import os
        from datetime import timedelta

        import torch.distributed as dist

        port = int(os.environ.get("MASTER_PORT") or 0)
        if not port:
            raise RunFailed("a run that survives failures serves the workers' rendezvous store from the controller: "
                            "set MASTER_PORT (and the workers' MASTER_ADDR to --controller_ip)")
        try:
            return dist.TCPStore(self.opts.controller_ip, port, None, True, timeout=timedelta(seconds=60),
                                 wait_for_workers=False)
        except Exception as e:  # noqa: BLE001 — the port is taken, most likely
            raise RunFailed(f"cannot serve the rendezvous store on {self.opts.controller_ip}:{port} (MASTER_PORT): {e}")

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ---- sockets --------------------------------------------------------------------------------------
    def send(self, identity: bytes, msg) -> bool:
        try:
            self.sock.send_multipart([identity, to_msg(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # the worker is gone (ROUTER_MANDATORY) or its queue is full
            return False

    def receive(self, timeout_s: float) -> None:
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return
        while True:
            try:
                identity, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not [identity, frame]: ignore
            try:
                msg = from_msg(frame)
            except ProtocolError as e:
                self.log(f"warning: ignoring a malformed message from {identity!r}: {e}")
                continue
            self.handle(identity, msg)

    def handle(self, identity: bytes, msg) -> None:
        rank = getattr(msg, "rank", None)
        if isinstance(msg, Heartbeat):
            if rank in self.workers and self.workers[rank].hello is not None:
                self.workers[rank].last_heartbeat = self.now()
                self.workers[rank].replicated = msg.replicated
                self.send(identity, HeartbeatAck(msg.seq, self.now()))
            return
        if isinstance(msg, Hello) and msg.spare:
            if self.ft is None:
                self.send(identity, Abort("this run does not survive failures (no --with_ft / failure scenario), "
                                          "so it takes no hot spares"))
                return
            self.ft.spares.append(identity)
            self.send(identity, Welcome(-1, self.now(), msg.sent_at, self.opts.heartbeat_interval_s,
                                        max(60.0, 4 * self.opts.heartbeat_timeout_s), self.ft.generation))
            self.log(f"hot spare {identity.decode()} on {msg.host} pid {msg.pid} is waiting")
            return
        if rank not in self.workers:
            self.log(f"warning: a message from rank {rank!r}, outside the world of {self.topo.world_size}")
            if isinstance(msg, Hello):
                self.send(identity, Abort(f"rank {rank} is outside this run's {self.topo.world_size} workers "
                                          f"(--num_peers); check --rank / --world_size"))
            return
        w = self.workers[rank]
        if isinstance(msg, Hello):
            if w.hello is not None and msg.restart and self.ft is not None:
                # A replacement came before the deadline noticed: its predecessor is gone.
                self.ft.lose([rank], f"a replacement for rank {rank} said hello (its process was restarted)")
            if w.hello is not None:
                self.fail(f"{w.label(self.topo)} said hello twice (a second worker with the same --rank?)")
                return
            if self.ft is not None and self.run_start is not None:
                if not msg.restart:
                    self.send(identity, Abort(f"rank {rank} is being replaced; start a replacement with --restart"))
                    return
                self.log(f"replacement for rank {rank} connected from {msg.host} pid {msg.pid}")
            w.hello, w.last_heartbeat = msg, self.now()
            if msg.world_size not in (-1, self.topo.world_size):
                why = (f"{w.label(self.topo)} was started for a world of {msg.world_size} workers but the "
                       f"controller's --num_peers gives {self.topo.world_size}")
                self.send(identity, Abort(why))
                self.fail(why)
                return
            ft = self.ft
            self.send(identity, Welcome(rank, self.now(), msg.sent_at, self.opts.heartbeat_interval_s,
                                        max(60.0, 4 * self.opts.heartbeat_timeout_s),
                                        ft.generation if ft else 0, dict(ft.stores) if ft else {}))
        elif isinstance(msg, Ready):
            w.ready = msg
            want = self.topo.role(rank)
            got = (msg.role, msg.stage, msg.tp_rank, tuple(msg.layers))
            if got != (want.kind, want.stage, want.tp_rank, want.layers):
                self.fail(f"{w.label(self.topo)} runs as {msg.role}{msg.stage} tp{msg.tp_rank} with layers "
                          f"{tuple(msg.layers)}, but the controller's flags make it {want.name} tp{want.tp_rank} with "
                          f"layers {want.layers}; start the controller and the workers with the same topology")
                return
            if self.ft is not None and msg.store:
                self.ft.stores[rank] = msg.store
            self.log(f"{w.label(self.topo)} ready: layers [{msg.layers[0]}, {msg.layers[1]}) on {msg.device}, "
                     f"loaded in {msg.load_s:.1f} s [{sum(x.ready is not None for x in self.workers.values())}"
                     f"/{self.topo.world_size}]")
        elif isinstance(msg, Tokens):
            if self.ft is not None:
                if msg.generation < self.ft.generation or self.ft.recovering is not None:
                    return  # computed by an abandoned generation: the resume recomputes them
                self.ft.tokens(msg.ubatch, msg.step)
            self.on_tokens(msg)
        elif isinstance(msg, Rejoin):
            if self.ft is not None:
                self.ft.rejoined(msg)
        elif isinstance(msg, ProcessGone):
            self.log(f"the runner saw worker {rank}'s process (pid {msg.pid}) exit with code {msg.exit_code}")
            if self.ft is not None and w.hello is not None and w.hello.pid == msg.pid:
                self.ft.lose([rank], f"its process exited (code {msg.exit_code}; the runner saw it)")
        elif isinstance(msg, PeerLost):
            self.log(f"{w.label(self.topo)} lost its data plane (generation {msg.generation}): {msg.message[:160]}")
            self.suspect()
        elif isinstance(msg, FaultPoint):
            if self.ft is not None:
                self.ft.at_fault_point(rank)
        elif isinstance(msg, Stats):
            w.stats = msg
        elif isinstance(msg, Error):
            w.errors.append(msg)
            self.log(f"error from {w.label(self.topo)} during {msg.where or 'startup'}: {msg.message}")
            self.fail(f"{w.label(self.topo)} failed during {msg.where or 'startup'}: {msg.message}")

    def on_tokens(self, msg: Tokens) -> None:
        t = self.now() - (self.run_start or 0.0)
        self.last_progress = self.now()
        for rid, tok, fin in zip(msg.request_ids, msg.tokens, msg.finished):
            rec = self.records.get(rid)
            if rec is None or rid in self.done:
                continue
            self.tokens_total += 1
            self._steps[rid][msg.step] = tok
            if msg.step == 0:
                rec.first_token_s = t
            if fin:
                self._final_step[rid] = msg.step
            final = self._final_step.get(rid)
            # Tokens of one request may come from two ranks (prompt and token pipelines): finish only
            # when every step up to the last has arrived.
            if final is not None and len(self._steps[rid]) == final + 1:
                rec.output_ids = [self._steps[rid][s] for s in range(final + 1)]
                rec.finish_s, rec.status = t, "ok"
                self.done.add(rid)
                if self.progress is not None:
                    self.progress.request_done()
        if self.progress is not None:
            self.progress.token(len(msg.tokens))

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = (self.now(), why)

    def broadcast(self, msg, *, heartbeat_socket: bool) -> None:
        for r, w in self.workers.items():
            if w.hello is not None:
                self.send(f"hb{r}".encode() if heartbeat_socket else f"w{r}".encode(), msg)

    # ---- watchdogs ------------------------------------------------------------------------------------
    def check_heartbeats(self) -> None:
        now = self.now()
        if self.ft is not None and self.run_start is not None:  # at start-up a silent worker ends the run
            # After a survivor said its data plane broke, two missed heartbeats are enough.
            suspicious = now - self._suspected_at < self.opts.heartbeat_timeout_s
            deadline = 2 * self.opts.heartbeat_interval_s + 0.5 if suspicious else self.opts.heartbeat_timeout_s
            late = [w.rank for w in self.workers.values() if w.hello is not None and w.stats is None
                    and now - w.last_heartbeat > deadline]
            if late:
                self.ft.lose(late, f"heartbeats stopped ({deadline:.1f} s without one"
                                   + (", after a peer lost its connection to it" if suspicious else "") + "): "
                                   f"it died or hangs")
            return
        for w in self.workers.values():
            if w.hello is not None and w.stats is None and now - w.last_heartbeat > self.opts.heartbeat_timeout_s:
                self.fail(f"{w.label(self.topo)} stopped sending heartbeats {now - w.last_heartbeat:.1f} s ago "
                          f"(deadline {self.opts.heartbeat_timeout_s:.1f} s): it died or hangs")

    def suspect(self) -> None:
        """A survivor's data plane broke: whoever has missed two heartbeats is dead now, not at the deadline."""
        self._suspected_at = self.now()
        self.check_heartbeats()

    def lost_workers(self) -> list[WorkerInfo]:
        """Workers whose heartbeat is overdue by more than two intervals: the likely dead ones."""
        now = self.now()
        return [w for w in self.workers.values() if w.hello is not None and w.stats is None and not w.errors
                and now - w.last_heartbeat > 2 * self.opts.heartbeat_interval_s + 0.5]

    # ---- phases ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.wait_for_workers()
            self.serve()
            self.wrap_up()
        except RunFailed as e:
            return self.failed(str(e))
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.result(ok=True)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.interrupted = f"interrupted by signal {signal.Signals(signum).name}"
        self.fail(self.interrupted)

    def _raise_if_failed(self) -> None:
        if self.failure is None:
            return
        # Give the other workers a moment: when one dies, its peers' errors arrive first, and its own
        # missed heartbeats tell which one it was.
        when, why = self.failure
        grace = 0 if self.interrupted else 2 * self.opts.heartbeat_interval_s + 0.6
        while self.now() - when < grace:
            self.receive(0.05)
        lost = self.lost_workers()
        if lost and "heartbeats" not in why:
            why = ("; ".join(f"{w.label(self.topo)} stopped sending heartbeats: it died or hangs" for w in lost)
                   + f" (then: {why})")
        raise RunFailed(why)

    def wait_for_workers(self) -> None:
        t_start = self.now()
        while True:
            self.receive(0.1)
            self._raise_if_failed()
            missing = [w for w in self.workers.values() if w.hello is None]
            if missing and self.now() - t_start > self.opts.startup_timeout_s:
                ranks = ", ".join(str(w.rank) for w in missing)
                self.fail(f"worker rank(s) {ranks} never connected within {self.opts.startup_timeout_s:.0f} s "
                          f"(--startup_timeout); check their logs, DEJAVU_CONTROLLER_IP and the port")
                continue
            self.check_heartbeats()
            if all(w.ready is not None for w in self.workers.values()):
                break
            if self.now() - t_start > self.opts.ready_timeout_s:
                late = ", ".join(str(w.rank) for w in self.workers.values() if w.ready is None)
                self.fail(f"worker rank(s) {late} were not ready within {self.opts.ready_timeout_s:.0f} s "
                          f"(--ready_timeout)")
        self.run_start = self.now()
        self.last_progress = self.now()
        self.log(f"all {self.topo.world_size} workers ready; serving {len(self.requests)} requests")
        if self.ft is not None:
            self.ft.start()

    def serve(self) -> None:
        from ..workload import group_into_microbatches

        ubatches = group_into_microbatches(self.requests, self.opts.ubatch_size)
        # A microbatch goes in when its last request has arrived (requests are in arrival order).
        queue = [(max(r.arrival_s for r in ub), i, ub) for i, ub in enumerate(ubatches)]
        entry = f"w{self.topo.entry_rank}".encode()
        from ..results.progress import Progress

        self.progress = Progress(len(self.requests))  # draws only on a terminal or with DEJAVU_PROGRESS=1
        try:
            self._serve(queue, entry)
        finally:
            self.progress.close()
            self.progress = None

    def submission(self, i: int, ub: list[Request]) -> Submit:
        return Submit(i, [r.id for r in ub], [list(r.prompt_ids) for r in ub], [self._params(r) for r in ub],
                      self.now() - (self.run_start or 0.0))

    def _serve(self, queue: list, entry: bytes) -> None:
        while len(self.done) < len(self.requests):
            rel = self.now() - self.run_start
            ft = self.ft
            if ft is not None:
                ft.step()
                ft.inject(rel, self.tokens_total)
            while queue and queue[0][0] <= rel and (ft is None or ft.recovering is None):
                _, i, ub = queue.pop(0)
                sub = self.submission(i, ub)
                if ft is not None:
                    ft.submitted(i, ub)
                if not self.send(entry, sub):
                    self.fail(f"cannot reach the entry worker (rank {self.topo.entry_rank}) to submit microbatch {i}")
                if not self.submitted - self.done:  # the pipeline was idle: the progress clock starts now
                    self.last_progress = self.now()
                self.submitted.update(r.id for r in ub)
            wait = min(0.2, max(0.0, queue[0][0] - rel)) if queue else 0.2
            self.receive(wait)
            self.check_heartbeats()
            outstanding = self.submitted - self.done
            if ft is not None and ft.recovering is not None:
                self.last_progress = self.now()
            if outstanding and self.now() - self.last_progress > self.opts.progress_timeout_s:
                self.fail(f"no token for {self.opts.progress_timeout_s:.0f} s (--progress_timeout) while "
                          f"{len(outstanding)} requests were in flight: the pipeline is stuck")
            self._raise_if_failed()

    def wrap_up(self) -> None:
        self.send(f"w{self.topo.entry_rank}".encode(), Shutdown("all requests done"))
        t_end = self.now()
        while any(w.stats is None for w in self.workers.values()):
            self.receive(0.1)
            self.check_heartbeats()
            self._raise_if_failed()
            if self.now() - t_end > self.opts.stats_timeout_s:
                late = ", ".join(str(w.rank) for w in self.workers.values() if w.stats is None)
                self.log(f"warning: no timeline from worker rank(s) {late} within {self.opts.stats_timeout_s:.0f} s "
                         f"after the last request; writing results without them")
                break

    @staticmethod
    def _params(r: Request) -> dict:
        p = r.sampling()
        return {"max_new_tokens": p.max_new_tokens, "min_new_tokens": p.min_new_tokens,
                "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "seed": p.seed,
                "stop_token_ids": list(p.stop_token_ids)}

    # ---- outcome --------------------------------------------------------------------------------------
    def failed(self, why: str) -> RunResult:
        self.broadcast(Abort(why), heartbeat_socket=True)
        for rid, rec in self.records.items():
            if rid in self.done:
                continue
            steps = self._steps[rid]
            rec.output_ids = [steps[s] for s in sorted(steps)]
            rec.status = "failed" if rid in self.submitted else "unfinished"
            rec.error = why
        time.sleep(0.2)  # let the aborts leave
        return self.result(ok=False, error=why)

    def result(self, ok: bool, error: str | None = None) -> RunResult:
        start = self.run_start if self.run_start is not None else self.now()
        events, stats = [], {}
        for w in self.workers.values():
            if not w.stats:
                continue
            for e in w.stats.events:
                ev = StageEvent.from_dict(e)
                # Waiting for the first work before the run started is not a bubble of the run.
                ev.start_s, ev.end_s = max(ev.start_s - start, 0.0), ev.end_s - start
                if ev.end_s > ev.start_s:
                    events.append(ev)
            stats[w.rank] = worker_stats(w, self.topo)
        res = RunResult(ok, [self.records[i] for i in sorted(self.records)], events, stats, error)
        if self.ft is not None:
            res.failures = self.ft.summary(start)
        return res

    def close(self) -> None:
        self.sock.close()


def worker_stats(w: WorkerInfo, topo: Topology) -> dict:
    """A worker's Stats as the results writer's WorkerStats fields."""
    s = w.stats
    role = topo.role(w.rank)
    out = {"worker": w.rank, "stage": role.name, "tp_rank": role.tp_rank, "peak_memory_bytes": s.peak_memory_bytes,
           "extra": {"bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received, "seconds": s.time_in,
                     "streams": s.streams,
                     "items": s.items, "load_s": w.ready.load_s if w.ready else None,
                     "host": w.hello.host if w.hello else None}}
    if topo.disaggregated and role.pipeline == "token":
        # Counted on the receiving side only, so that summing over workers counts each byte once.
        out["kv_bytes"] = {"prompt->token": int(s.bytes_received.get("kv", 0))}
        out["kv_seconds"] = {"prompt->token": float(s.time_in.get("kv_recv", 0.0))}
    if s.kv_pool:  # peak KV memory; with swapping, its copies (summary.json: swap, kv_streams.swap)
        out["kv_pool"] = s.kv_pool
        if s.kv_pool.get("swapping"):
            out.setdefault("kv_bytes", {})["swap"] = s.kv_pool["swap_out_bytes"] + s.kv_pool["swap_in_bytes"]
            out.setdefault("kv_seconds", {})["swap"] = s.kv_pool["swap_s"]
    return out


def print_failure(error: str, records: list[RequestRecord], out=sys.stderr) -> None:
    ok = [r.id for r in records if r.status == "ok"]
    failed = [r.id for r in records if r.status == "failed"]
    unfinished = [r.id for r in records if r.status == "unfinished"]
    print(f"dejavu controller: the run failed: {error}", file=out)
    print(f"  finished: {len(ok)} requests {_ids(ok)}; in flight when it failed: {len(failed)} {_ids(failed)}; "
          f"never started: {len(unfinished)} {_ids(unfinished)}", file=out, flush=True)


def _ids(ids: list[int], n: int = 12) -> str:
    if not ids:
        return ""
    return "[" + ", ".join(map(str, ids[:n])) + (", ..." if len(ids) > n else "") + "]"


def default_run_dir() -> Path:
    return Path("results") / time.strftime("%Y-%m-%d_%H-%M-%S")
