"""The controller's side of fault tolerance (DESIGN.md §5): failure generations, resume decisions, scenarios.

When a worker is declared dead (heartbeats overdue, a survivor's data plane broke under it, a
replacement said hello, or the scenario's own kill), the run does not end: a *failure generation*
starts. Survivors get a Reset; the lost rank goes to a hot spare if one waits, else to the runner
(``@dejavu-event`` lines on the controller's output, which the runner reads: restart it, or, with
``failure.restart=manual``, wait for ``dejavu worker --restart``). When every rank has rejoined the new
generation's data plane and said what it holds, the controller decides per microbatch:

- continue from decode step ``r = min(T, held)``: ``T`` the last step whose tokens it has, ``held`` the
  fewest decode steps any stage has in its cache (a replacement: what its replicas gave back). Steps
  ``r..T-1`` are recomputed; their tokens come again, identical (sampling is keyed on (seed, step)), and
  are not recorded twice;
- or start again from the prompt, when some stage lacks it (a failure in prefill or hand-over, or a
  run without replication: the baseline of the paper's comparison).

A failure scenario (``failure=kill_one``...) is injected from here too: at its trigger (tokens
generated, seconds, or a phase at which the target worker parks itself) the controller asks the runner
to SIGKILL or SIGSTOP the target from outside, as a lost machine would be.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field

from ..protocol import Arm, Assign, Reset, Resume

EVENT_PREFIX = "@dejavu-event "


def emit(event: dict) -> None:
    """A line for the runner (it acts on it and shows a readable form instead)."""
    print(EVENT_PREFIX + json.dumps(event, sort_keys=True), flush=True)
    sys.stdout.flush()


@dataclass
class Injection:
    """One failure of a scenario: whom, when, how (``runners.schema.FailureConf`` in controller terms)."""

    ranks: list[int]
    host: str | None = None  # kill every worker on this host instead
    after_tokens: int | None = None
    after_s: float | None = None
    phase: str | None = None  # prefill | admit (the hand-over) | decode
    step: int = 0  # decode step, with phase=decode
    signal: str = "kill"  # kill | stop (a hang)
    fired_s: float | None = None
    pending_ranks: set | None = None  # fired at these, not yet found dead

    @classmethod
    def from_dict(cls, d: dict) -> "Injection":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class FailureRecord:
    generation: int
    ranks: list[int]
    hosts: list[str]
    cause: str
    injected_s: float | None  # run clock, when the scenario asked the runner to kill
    detected_s: float
    restart: str = ""  # "spare" | "runner" | "manual"
    resumed_s: float | None = None
    tokens_recomputed: int = 0
    ubatches_resumed: int = 0
    ubatches_restarted: int = 0  # had begun (a prompt somewhere, or tokens): their prompt is computed again
    ubatches_requeued: int = 0  # were still waiting for a KV buffer: submitted again, nothing lost
    restored_bytes: int = 0
    replicated_steps: dict = field(default_factory=dict)  # ubatch -> last step replicated on every stage

    def to_dict(self) -> dict:
        d = asdict(self)
        start = self.injected_s if self.injected_s is not None else self.detected_s
        d["detection_s"] = round(self.detected_s - start, 4) if self.injected_s is not None else None
        d["recovery_s"] = round(self.resumed_s - self.detected_s, 4) if self.resumed_s is not None else None
        d["downtime_s"] = round(self.resumed_s - start, 4) if self.resumed_s is not None else None
        return d


@dataclass
class Recovering:
    generation: int
    deadline: float
    rejoined: dict = field(default_factory=dict)  # rank -> Rejoin


class FaultTolerance:
    """Failure generations of one run; ``ctl`` is the ``server.Controller``."""

    def __init__(self, ctl, injections: list[Injection]) -> None:
        self.ctl, self.opts = ctl, ctl.opts
        self.generation = 0
        self.recovering: Recovering | None = None
        self.records: list[FailureRecord] = []
        self.restarts = 0
        self.stores: dict[int, str] = {}
        self.spares: list[bytes] = []  # identities of hot spares waiting
        self.injections = injections
        self.armed: dict[int, Injection] = {}  # rank -> phase injection it was told to park at
        self.ubatch_of: dict[int, int] = {}  # request id -> microbatch
        self.ubatches: dict[int, list] = {}  # microbatch -> its requests (in slot order)
        self.last_step: dict[int, int] = {}  # microbatch -> last decode step whose tokens arrived
        self._last_injection: Injection | None = None  # fired, its targets not all found dead yet

    # ---- bookkeeping while serving -------------------------------------------------------------------
    def submitted(self, ubatch: int, requests: list) -> None:
        self.ubatches[ubatch] = list(requests)
        for r in requests:
            self.ubatch_of[r.id] = ubatch

    def tokens(self, ubatch: int, step: int) -> None:
        self.last_step[ubatch] = max(self.last_step.get(ubatch, -1), step)

    # ---- scenario ------------------------------------------------------------------------------------
    def inject(self, now_run_s: float, tokens_total: int) -> None:
        """Fire the next failure of the scenario when its trigger is met (one at a time, never while
        recovering, so 'three failures' are three separate generations)."""
        if self.recovering is not None or not self.injections:
            return
        nxt = self.injections[0]
        if nxt.phase is not None:
            for r in nxt.ranks:
                w = self.ctl.workers[r]
                if r not in self.armed and w.ready is not None and \
                        self.ctl.send(f"hb{r}".encode(), Arm(nxt.phase, nxt.step)):
                    self.armed[r] = nxt
            return
        if (nxt.after_tokens is not None and tokens_total >= nxt.after_tokens) or \
                (nxt.after_s is not None and now_run_s >= nxt.after_s):
            self.fire(nxt, nxt.ranks)

    def at_fault_point(self, rank: int) -> None:
        inj = self.armed.pop(rank, None)
        if inj is not None and self.injections and self.injections[0] is inj:
            self.fire(inj, inj.ranks if inj.host else [rank])

    def fire(self, inj: Injection, ranks: list[int]) -> None:
        self.injections.pop(0)
        for r in list(self.armed):
            if self.armed[r] is inj:
                del self.armed[r]
        inj.fired_s = self.ctl.now()
        targets = []
        for r in ranks:
            w = self.ctl.workers[r]
            if w.hello is not None:
                targets.append({"rank": r, "pid": w.hello.pid, "host": w.hello.host})
        self.ctl.log(f"failure scenario: {'stopping' if inj.signal == 'stop' else 'killing'} "
                     + (f"every worker on host {inj.host}" if inj.host else
                        ", ".join(f"worker {t['rank']} (pid {t['pid']})" for t in targets)))
        emit({"event": "inject", "signal": inj.signal, "host": inj.host, "targets": targets,
              "generation": self.generation})
        self._last_injection = inj

    # ---- failures ------------------------------------------------------------------------------------
    def lose(self, ranks: list[int], cause: str) -> None:
        """Start a failure generation for ``ranks`` (already known dead ones are skipped)."""
        ctl = self.ctl
        ranks = [r for r in ranks if ctl.workers[r].hello is not None]
        if not ranks:
            return
        if len(ctl.done) == len(ctl.requests):
            ctl.log(f"worker(s) {ranks} lost after every request finished: {cause}; not recovering")
            for r in ranks:
                ctl.workers[r].stats = ctl.workers[r].stats or False
            return
        self.generation += 1
        g = self.generation
        hosts = [ctl.workers[r].hello.host for r in ranks]
        inj = self._last_injection
        injected = None
        if inj is not None and inj.fired_s is not None and set(ranks) & set(inj.ranks):
            injected = inj.fired_s
            inj.pending_ranks = set(inj.ranks if inj.pending_ranks is None else inj.pending_ranks) - set(ranks)
            if not inj.pending_ranks:  # a host's workers may be found dead one by one
                self._last_injection = None
        rec = FailureRecord(g, ranks, hosts, cause, injected, ctl.now())
        if self.opts.with_ft:
            rec.replicated_steps = self.replicated_everywhere()
        self.records.append(rec)
        labels = ", ".join(ctl.workers[r].label(ctl.topo) for r in ranks)
        ctl.log(f"FAILURE (generation {g}): {labels}: {cause}")
        if ctl.progress is not None:
            ctl.progress.set_status(f"failure {g} detected (worker {', '.join(map(str, ranks))}), recovering")
        for r in ranks:
            w = ctl.workers[r]
            # Fencing: whatever is left of it (a hung process) is killed before anything takes its place.
            emit({"event": "lost", "rank": r, "pid": w.hello.pid, "host": w.hello.host, "generation": g})
            w.lost_host, w.hello, w.ready = w.hello.host, None, None
            self.stores.pop(r, None)
        self.restarts += len(ranks)
        if self.restarts > self.opts.max_restarts:
            ctl.fail(f"{labels} failed, and that is more failures than failure.max_restarts="
                     f"{self.opts.max_restarts} allows ({self.restarts}); the run ends")
            return
        ctl.broadcast(Reset(g, ranks, cause), heartbeat_socket=True)
        self.recovering = Recovering(g, ctl.now() + self.opts.recovery_timeout_s)
        how = []
        for r in ranks:
            if self.spares:
                spare = self.spares.pop(0)
                ctl.send(spare, Assign(r, g))
                how.append("spare")
                ctl.log(f"rank {r} goes to the hot spare {spare.decode()}")
            elif self.opts.restart == "manual":
                how.append("manual")
                ctl.log(f"waiting for rank {r} to be restarted by hand: dejavu worker <its flags> --rank {r} "
                        f"--restart --failures {g} (within {self.opts.recovery_timeout_s:.0f} s)")
                emit({"event": "restart", "rank": r, "generation": g, "host": rec.hosts[ranks.index(r)],
                      "manual": True})
            else:
                how.append("runner")
                emit({"event": "restart", "rank": r, "generation": g, "host": rec.hosts[ranks.index(r)]})
        rec.restart = "+".join(sorted(set(how)))

    def replicated_everywhere(self) -> dict[int, int]:
        """Per microbatch, the last step every decoding stage's holder has acknowledged (heartbeats)."""
        ranks = self.ctl.topo.decoding_ranks()
        seen = [self.ctl.workers[r].replicated for r in ranks]
        common = set.intersection(*(set(int(u) for u in s) for s in seen)) if seen else set()
        return {u: min(int(s.get(u, s.get(str(u), -2))) for s in seen) for u in sorted(common)}

    def rejoined(self, msg) -> None:
        if self.recovering is None or msg.generation != self.recovering.generation:
            return
        self.recovering.rejoined[msg.rank] = msg
        if msg.store:
            self.stores[msg.rank] = msg.store
        if msg.restored_bytes and self.records:
            self.records[-1].restored_bytes += msg.restored_bytes

    def step(self) -> None:
        """While recovering: give up past the deadline, or resume once every rank has rejoined."""
        rec, ctl = self.recovering, self.ctl
        if rec is None:
            return
        if ctl.now() > rec.deadline:
            missing = [r for r in range(ctl.topo.world_size) if r not in rec.rejoined]
            where = ", ".join(f"rank {r} on host {ctl.workers[r].lost_host or (ctl.workers[r].hello.host if ctl.workers[r].hello else '?')}"
                              + (" (no process came back)" if ctl.workers[r].hello is None else " (did not rejoin)")
                              for r in missing)
            ctl.fail(f"recovery of failure generation {rec.generation} did not finish within "
                     f"failure.recovery_timeout_s={self.opts.recovery_timeout_s:.0f} s: {where}")
            return
        if len(rec.rejoined) < ctl.topo.world_size:
            return
        self.resume(rec)

    def resume(self, rec: Recovering) -> None:
        ctl = self.ctl
        items, drop, restarted, requeued = [], [], [], []
        held = {r: {s["ubatch"]: s for s in m.state} for r, m in rec.rejoined.items()}
        decoding = ctl.topo.decoding_ranks()
        recomputed = 0
        for u, reqs in sorted(self.ubatches.items()):
            live = [r for r in reqs if r.id not in ctl.done]
            if not live:
                if any(u in held[r] for r in held):
                    drop.append(u)
                continue
            T = self.last_step.get(u)
            have = [held[r].get(u) for r in decoding]
            if T is None or any(h is None or not h["prompt"] for h in have):
                drop.append(u)
                begun = T is not None or any(u in held[r] for r in held) or any(ctl._steps[r.id] for r in live)
                (restarted if begun else requeued).append(u)
                for r in live:  # its tokens come again from the prompt
                    recomputed += len(ctl._steps[r.id])
                    ctl._steps[r.id].clear()
                    ctl._final_step.pop(r.id, None)
                    ctl.records[r.id].first_token_s = None
                self.last_step.pop(u, None)
                continue
            step = min(T, min(h["steps"] for h in have))
            outputs, alive = [], []
            for r in reqs:
                steps = ctl._steps[r.id]
                final = ctl._final_step.get(r.id)
                upto = step if final is None or final > step else final
                outputs.append([steps[s] for s in range(upto + 1)])
                alive.append(r.id not in ctl.done and (final is None or final > step))
                if r.id not in ctl.done:
                    gone = [s for s in steps if s > step]
                    recomputed += len(gone)
                    for s in gone:
                        del steps[s]
                    if final is not None and final > step:
                        ctl._final_step.pop(r.id, None)
            self.last_step[u] = step
            sub = ctl.submission(u, reqs)
            items.append({"ubatch": u, "ids": sub.request_ids, "lens": [len(p) for p in sub.prompts],
                          "max_seq": max(len(p) + q["max_new_tokens"] for p, q in zip(sub.prompts, sub.params)),
                          "params": sub.params, "step": step, "outputs": outputs, "live": alive})
        # Whose holder was replaced: their replicas died with it, so they send their caches again.
        lost = {r for f in self.records if f.generation <= rec.generation and f.resumed_s is None for r in f.ranks}
        resend = sorted({s for r in lost for s in ctl.topo.replica_sources(r)})
        msg = Resume(rec.generation, dict(self.stores), items, drop, resend)
        for r in range(ctl.topo.world_size):
            ctl.send(f"w{r}".encode(), msg)
        for u in sorted(restarted + requeued):  # in submission order, as they first came
            ctl.send(f"w{ctl.topo.entry_rank}".encode(), ctl.submission(u, self.ubatches[u]))
        now = ctl.now()
        for f in self.records:
            if f.resumed_s is None:
                f.resumed_s = now
        last = self.records[-1]
        last.tokens_recomputed += recomputed
        last.ubatches_resumed += len(items)
        last.ubatches_restarted += len(restarted)
        last.ubatches_requeued += len(requeued)
        self.recovering = None
        ctl.last_progress = now
        ctl.log(f"serving resumes (generation {rec.generation}): {len(items)} microbatches continue "
                f"(from steps {sorted({it['step'] for it in items}) or '-'}), {len(restarted)} start again from "
                f"their prompts" + (f", {len(requeued)} not yet begun are queued again" if requeued else "") +
                f"; {recomputed} tokens to recompute; recovery took {now - last.detected_s:.2f} s")
        emit({"event": "resumed", "generation": rec.generation})
        if ctl.progress is not None:
            ctl.progress.set_status(f"serving resumed after failure {rec.generation}")

    def start(self) -> None:
        """Generation 0 begins: every worker learns the replica stores' addresses."""
        msg = Resume(0, dict(self.stores))
        for r in range(self.ctl.topo.world_size):
            self.ctl.send(f"w{r}".encode(), msg)

    def summary(self, run_start: float) -> list[dict]:
        """Failure records with times on the run's clock (seconds since every worker was ready)."""
        out = []
        for f in self.records:
            d = f.to_dict()
            for k in ("injected_s", "detected_s", "resumed_s"):
                if d[k] is not None:
                    d[k] = round(d[k] - run_start, 4)
            out.append(d)
        return out


def recovery_summary(failures: list[dict], worker_stats: dict) -> dict:
    """summary.json's ``recovery``: the failures in aggregate and what replication cost, per run."""
    def mean(key: str):
        vals = [f[key] for f in failures if f.get(key) is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    rep_bytes = rep_s = 0.0
    for st in worker_stats.values():
        for tally in (st.get("extra", {}).get("streams", {}) or {}).get("replication", {}).values():
            rep_bytes += tally.get("bytes", 0)
            rep_s += tally.get("seconds", 0.0)
    return {"failures": len(failures), "detection_s_mean": mean("detection_s"), "recovery_s_mean": mean("recovery_s"),
            "downtime_s_total": round(sum(f["downtime_s"] or 0.0 for f in failures), 4),
            "tokens_recomputed": sum(f["tokens_recomputed"] for f in failures),
            "restarts": [f["restart"] for f in failures],
            "replication_bytes": int(rep_bytes), "replication_s": round(rep_s, 4)}

