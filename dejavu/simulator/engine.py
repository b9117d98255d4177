"""A discrete-event model of our serving pipelines: the baseline and the disaggregated one (paper App. B, D).

It follows the scheduling rules of the real workers (``dejavu/worker/pipeline.py``) step for step:

- the controller groups requests into microbatches of ``ubatch_size`` in arrival order and submits one
  when its last request has arrived;
- a pipeline's leader (its first stage) picks its next item when it is free: a new microbatch first, if
  the decoding pipeline holds fewer microbatches than it has stages (one KV buffer each), else the next
  token step whose feedback has come back; other stages run what arrives, in order;
- a stage computes, then sends the activation on (the send occupies it), the last stage samples and
  reports the tokens; the sampler's next-token feedback reaches the leader after ``feedback_s``;
- baseline: prompts go into the shared pipeline between token steps (the prefill emits the first token);
- disaggregated: the prompt pipeline prefills (emitting the first token) and hands the microbatch to the
  token pipeline, whose stages each receive their layers' KV cache (``stream``) and then run the first
  token step (``admit``); a prompt stage may run ``kv_window`` microbatches ahead of the hand-overs that
  have landed, as ``KVSender`` does.

Optional models: microbatch swapping (a token step waits for the next microbatch's cache to come in from
host memory when more microbatches are in flight than stay resident) and failures (Poisson, per machine:
the system stops for detection + restart; without replication every unfinished microbatch restarts
from its prompt, with replication decoding microbatches resume from their last token step, and every
token step pays the replication overhead).

The result carries the same metrics as a real run's ``summary.json`` (throughput, TTFT, TPOT, latency,
normalized latency, per-stage busy/bubble fractions), the prompt-induced bubbles, and optionally the
intervals for a Chrome trace in the runs' format (``dejavu.results.trace``).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..results.metrics import merge_intervals, stats
from .costs import Costs


@dataclass(frozen=True)
class SimRequest:
    id: int
    arrival_s: float
    prompt_len: int
    new_tokens: int


@dataclass(frozen=True)
class SwapModel:
    """Microbatch swapping on the token stages: ``resident`` microbatches' caches stay on the device, the
    others live in host memory; each step prefetches the next one's cache for the stage's layers at
    ``bytes_per_s`` (e.g. PCIe), overlapped with the step: a step lasts max(compute, transfer)."""

    bytes_per_s: float
    resident: int = 2


@dataclass(frozen=True)
class FailureModel:
    per_machine_hour: float = 0.0  # failures per machine per hour (Poisson)
    detect_s: float = 1.0  # heartbeat deadline: from the failure to noticing it
    restart_s: float = 10.0  # a replacement worker starts and loads its layers
    replication: bool = False  # per-step KV replication (DéjàVu's fault tolerance)
    replication_overhead: float = 0.02  # fraction each token step costs more with replication on
    seed: int = 0
    times: tuple[float, ...] | None = None  # explicit failure times (instead of the Poisson draw)


@dataclass
class SimSetup:
    prompt_stages: int  # 0 = the baseline (no disaggregation)
    token_stages: int  # stages of the decoding pipeline (the whole pipeline in the baseline)
    ubatch_size: int
    costs: Costs
    kv_window: int = 2  # KVSender's window: hand-overs a prompt stage may have outstanding
    # A send between stages completes only once the next stage posts its receive, i.e. is free (gloo's and
    # NCCL's blocking send/recv; the real stages receive only between items). False: sends are buffered.
    rendezvous: bool = True
    swap: SwapModel | None = None
    failures: FailureModel | None = None
    trace: bool = True  # keep every interval: Chrome trace and prompt-induced bubbles


@dataclass
class SimInterval:
    worker: int
    stage: str
    kind: str
    start_s: float
    end_s: float
    ubatch: int = -1


@dataclass
class SimResult:
    summary: dict[str, Any]
    records: list[dict[str, Any]]  # per request: arrival, first token, finish, tokens
    intervals: list[SimInterval] = field(default_factory=list)
    stage_names: list[str] = field(default_factory=list)

    def events(self) -> list[dict[str, Any]]:
        """The intervals as StageEvent dicts (``dejavu.results.trace.chrome_trace`` takes them)."""
        return [{"worker": i.worker, "stage": i.stage, "kind": i.kind, "start_s": i.start_s, "end_s": i.end_s,
                 "ubatch": i.ubatch, "tp_rank": 0} for i in self.intervals]


class SimError(ValueError):
    pass


# ---- state --------------------------------------------------------------------------------------------

class _Ub:
    __slots__ = ("id", "reqs", "b", "P", "n_max", "emitted", "phase", "received", "ready_s", "finished")

    def __init__(self, uid: int, reqs: list[SimRequest]) -> None:
        self.id, self.reqs = uid, reqs
        self.b = len(reqs)
        self.P = max(r.prompt_len for r in reqs)
        self.n_max = max(r.new_tokens for r in reqs)
        self.emitted = -1  # the last token step whose tokens were reported
        self.phase = "waiting"  # waiting | prompt | handover | token | done
        self.received = 0  # token stages that have its KV cache (disaggregated)
        self.ready_s = max(r.arrival_s for r in reqs)
        self.finished: set[int] = set()


class _Stage:
    __slots__ = ("pipeline", "index", "name", "worker", "last", "queue", "busy", "blocked_on", "outstanding",
                 "busy_s", "senders", "sending")

    def __init__(self, pipeline: str, index: int, name: str, worker: int, last: bool) -> None:
        self.pipeline, self.index, self.name, self.worker, self.last = pipeline, index, name, worker, last
        self.queue: deque = deque()
        self.busy = False
        self.blocked_on: int | None = None  # prompt stage waiting for this microbatch's hand-over to land
        self.outstanding: deque = deque()  # prompt stage: hand-overs not yet landed
        self.busy_s = {"prefill": 0.0, "decode": 0.0, "stream": 0.0}
        self.senders: deque = deque()  # upstream stages blocked sending to this one (rendezvous)
        self.sending: tuple | None = None  # (item, hop seconds, since): this stage is blocked in a send


def group(requests: Sequence[SimRequest], ubatch_size: int) -> list[list[SimRequest]]:
    """Consecutive groups in arrival order, as the controller forms them."""
    reqs = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    return [reqs[i:i + ubatch_size] for i in range(0, len(reqs), ubatch_size)]


class Simulator:
    def __init__(self, requests: Sequence[SimRequest], setup: SimSetup) -> None:
        if not requests:
            raise SimError("no requests to simulate")
        if setup.token_stages < 1 or setup.prompt_stages < 0 or setup.ubatch_size < 1:
            raise SimError(f"need token_stages >= 1, prompt_stages >= 0, ubatch_size >= 1; got {setup.token_stages}, "
                           f"{setup.prompt_stages}, {setup.ubatch_size}")
        self.setup, self.c = setup, setup.costs
        self.disagg = setup.prompt_stages > 0
        self.now = 0.0
        self._heap: list = []
        self._seq = 0
        self.gen = 0  # failure generation: events of an older one are dropped
        self.ubs = [_Ub(i, g) for i, g in enumerate(group(requests, setup.ubatch_size))]
        self.reqs = {r.id: {"id": r.id, "arrival_s": r.arrival_s, "prompt_len": r.prompt_len,
                            "new_tokens": r.new_tokens, "first_token_s": None, "finish_s": None}
                     for r in requests}
        kind = "token" if self.disagg else "stage"
        self.prompt = [_Stage("prompt", s, f"prompt{s}", s, s == setup.prompt_stages - 1) for s in range(setup.prompt_stages)]
        self.token = [_Stage("token", s, f"{kind}{s}", setup.prompt_stages + s, s == setup.token_stages - 1)
                      for s in range(setup.token_stages)]
        self.capacity = setup.token_stages
        self.pending_prompt: deque = deque()  # prompt leader (disaggregated)
        self.pending: deque = deque()  # decoding leader: prefills (baseline) or admits (disaggregated)
        self.ready: deque = deque()  # decoding leader: token steps whose feedback came back
        self.active: set[int] = set()
        self.intervals: list[SimInterval] = []
        self.starved: list[tuple[float, float]] = []  # token pipeline short of work while prompts are pending
        self._starved_since: float | None = None
        self.first_admit_s: float | None = None  # a microbatch first entered the decoding pipeline
        self.full_since: float | None = None  # the decoding pipeline first held `capacity` microbatches
        self.last_admit_s: float | None = None  # the last microbatch entered it
        self.done_ubs = 0
        self.failures = 0
        self.lost_s = 0.0
        self.tokens_recomputed = 0
        self.swap_stall_s = 0.0
        self.frozen_until = 0.0
        self.rng = random.Random(setup.failures.seed if setup.failures else 0)
        f = setup.failures
        self.step_factor = 1.0 + (f.replication_overhead if f and f.replication else 0.0)

    # ---- the event loop -----------------------------------------------------------------------------
    def at(self, t: float, fn: Callable, *args, any_gen: bool = False) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, None if any_gen else self.gen, fn, args))

    def run(self) -> SimResult:
        for ub in self.ubs:
            self.at(ub.ready_s + self.c.submit_s, self._submit, ub, any_gen=True)
        self._schedule_failures()
        while self._heap and self.done_ubs < len(self.ubs):
            t, _, gen, fn, args = heapq.heappop(self._heap)
            if gen is not None and gen != self.gen:
                continue
            self.now = t
            fn(*args)
        if self.done_ubs < len(self.ubs):
            raise SimError(f"the simulation stalled with {len(self.ubs) - self.done_ubs} microbatches unfinished "
                           f"(a bug in the model: please report it)")
        self._mark_starved()
        return self._result()

    # ---- controller -----------------------------------------------------------------------------------
    def _submit(self, ub: _Ub) -> None:
        if self.disagg:
            ub.phase = "prompt"
            self.pending_prompt.append(ub)
            self._try(self.prompt[0])
        else:
            ub.phase = "token"
            self.pending.append(ub)
            self._try(self.token[0])
        self._mark_starved()

    def _emit(self, ub: _Ub, step: int) -> None:
        ub.emitted = step
        for r in ub.reqs:
            rec = self.reqs[r.id]
            if step == 0 and rec["first_token_s"] is None:
                rec["first_token_s"] = self.now
            if step == r.new_tokens - 1 and r.id not in ub.finished:
                ub.finished.add(r.id)
                rec["finish_s"] = self.now
        if step == ub.n_max - 1:
            ub.phase = "done"
            self.done_ubs += 1

    # ---- stages ---------------------------------------------------------------------------------------
    def _leader_item(self, st: _Stage):
        if st.pipeline == "prompt":
            return ("prefill", self.pending_prompt.popleft(), 0) if self.pending_prompt else None
        if self.pending:
            ub = self.pending[0]
            drop = self.disagg and ub.n_max == 1
            if drop or len(self.active) < self.capacity:
                self.pending.popleft()
                if not drop:
                    self.active.add(ub.id)
                    ub.phase = "token"
                self.first_admit_s = self.now if self.first_admit_s is None else self.first_admit_s
                self.last_admit_s = self.now
                if self.full_since is None and len(self.active) >= self.capacity:
                    self.full_since = self.now
                self._mark_starved()
                return ("admit" if self.disagg else "prefill", ub, 0)
        if self.ready:
            return self.ready.popleft()
        return None

    def _try(self, st: _Stage) -> None:
        if st.busy or st.blocked_on is not None or self.now < self.frozen_until:
            return
        if st.index == 0:
            item = self._leader_item(st)
        elif self.setup.rendezvous:
            if st.senders:  # receive from the blocked sender: the transfer takes its hop time
                sender = st.senders.popleft()
                item, hop, _ = sender.sending
                st.busy = True
                self.at(self.now + hop, self._handoff, sender, st, item)
            return
        else:
            item = st.queue.popleft() if st.queue else None
        if item is not None:
            self._start(st, item)

    def _busy(self, st: _Stage, kind: str, start: float, end: float, ub: int) -> None:
        if kind in st.busy_s:
            st.busy_s[kind] += end - start
        if self.setup.trace and end > start:
            self.intervals.append(SimInterval(st.worker, st.name, kind, start, end, ub))

    def _start(self, st: _Stage, item) -> None:
        kind, ub, step = item
        st.busy = True
        c, t = self.c, self.now
        if kind == "prefill":
            d = c.prefill(st.pipeline, st.index, ub.b, ub.P)
            self._busy(st, "prefill", t, t + d, ub.id)
        elif kind == "decode":
            d = self._step(st, ub, ub.P + step)
            self._busy(st, "decode", t, t + d, ub.id)
        else:  # admit: receive this stage's layers of the KV cache, then the first token step
            kv = c.kv(st.index, ub.b, ub.P)
            self._busy(st, "stream", t, t + kv, ub.id)
            self.at(t + kv, self._received, ub)  # the prompt side's sends of this stage's layers complete
            d = kv
            if ub.n_max > 1:
                step_d = self._step(st, ub, ub.P)
                self._busy(st, "decode", t + kv, t + kv + step_d, ub.id)
                d += step_d
        self.at(t + d, self._finish, st, item)

    def _step(self, st: _Stage, ub: _Ub, ctx: int) -> float:
        d = self.c.decode(st.pipeline, st.index, ub.b, ctx) * self.step_factor
        sw = self.setup.swap
        if sw is not None and len(self.active) > sw.resident:
            move = self.c.kv_bytes(st.index, ub.b, ctx) / sw.bytes_per_s
            if move > d:
                self.swap_stall_s += move - d
                d = move
        return d

    def _finish(self, st: _Stage, item) -> None:
        kind, ub, step = item
        if not st.last:
            tokens = ub.P if kind == "prefill" else 1
            hop = self.c.hop(st.pipeline, st.index, ub.b, tokens) if (kind != "admit" or ub.n_max > 1) else 0.0
            if self.setup.rendezvous:
                st.sending = (item, hop, self.now)
                nxt = (self.prompt if st.pipeline == "prompt" else self.token)[st.index + 1]
                nxt.senders.append(st)
                self._try(nxt)
                return
            if hop > 0:
                self._busy(st, "send", self.now, self.now + hop, ub.id)
            self.at(self.now + hop, self._sent, st, item)
            return
        if st.pipeline == "prompt":  # the prompt sampler: first tokens, then the hand-over notice
            self._emit(ub, 0)
            if ub.phase != "done":
                ub.phase = "handover"
            self.at(self.now + self.c.feedback_s, self._handover, ub)
        elif kind == "prefill" or ub.n_max > 1:
            emitted = 0 if kind == "prefill" else (1 if kind == "admit" else step + 1)
            self._emit(ub, emitted)
            # A one-stage pipeline's sampler is its leader: the feedback stays in the process.
            latency = self.c.feedback_s if len(self.token) > 1 else 0.0
            self.at(self.now + latency, self._feedback, ub, emitted)
        self._free(st, item)

    def _handoff(self, sender: _Stage, st: _Stage, item) -> None:
        """The rendezvous send is done: the receiver starts the item, the sender is free."""
        _, _, since = sender.sending
        sender.sending = None
        self._busy(sender, "send", since, self.now, item[1].id)
        st.busy = False
        self._start(st, item)
        self._free(sender, item)

    def _sent(self, st: _Stage, item) -> None:
        nxt = (self.prompt if st.pipeline == "prompt" else self.token)[st.index + 1]
        nxt.queue.append(item)
        self._try(nxt)
        self._free(st, item)

    def _free(self, st: _Stage, item) -> None:
        kind, ub, _ = item
        if st.pipeline == "prompt":  # KVSender.ubatch_done: wait for the oldest hand-over past the window
            st.outstanding.append(ub.id)
            while st.outstanding and self.ubs[st.outstanding[0]].received >= self.setup.token_stages:
                st.outstanding.popleft()
            if len(st.outstanding) > self.setup.kv_window:
                st.busy = False
                st.blocked_on = st.outstanding[0]
                return
        st.busy = False
        self._try(st)

    def _received(self, ub: _Ub) -> None:
        ub.received += 1
        if ub.received == self.setup.token_stages:
            self._landed(ub)

    def _landed(self, ub: _Ub) -> None:
        for st in self.prompt:
            if st.blocked_on == ub.id:
                while st.outstanding and self.ubs[st.outstanding[0]].received >= self.setup.token_stages:
                    st.outstanding.popleft()
                if len(st.outstanding) <= self.setup.kv_window:
                    st.blocked_on = None
                    self._try(st)
                else:
                    st.blocked_on = st.outstanding[0]

    # ---- leader messages -------------------------------------------------------------------------------
    def _handover(self, ub: _Ub) -> None:
        self.pending.append(ub)
        self._try(self.token[0])
        self._mark_starved()

    def _feedback(self, ub: _Ub, step: int) -> None:
        if step >= ub.n_max - 1:
            self.active.discard(ub.id)
        else:
            self.ready.append(("decode", ub, step))
        self._try(self.token[0])
        self._mark_starved()

    def _mark_starved(self) -> None:
        """Disaggregated: the token pipeline has room and nothing to admit while prompts are still being
        processed (submitted microbatches not yet handed over): the prompt side starves it."""
        if not self.disagg:
            return
        waiting = any(u.phase == "prompt" for u in self.ubs)
        starved = waiting and len(self.active) < self.capacity and not self.pending
        if starved and self._starved_since is None:
            self._starved_since = self.now
        elif not starved and self._starved_since is not None:
            if self.now > self._starved_since:
                self.starved.append((self._starved_since, self.now))
            self._starved_since = None

    # ---- failures --------------------------------------------------------------------------------------
    def _schedule_failures(self) -> None:
        f = self.setup.failures
        if f is None:
            return
        if f.times is not None:
            for t in f.times:
                self.at(t, self._fail, any_gen=True)
        elif f.per_machine_hour > 0:
            self._next_failure(0.0)

    def _next_failure(self, after: float) -> None:
        f = self.setup.failures
        rate = f.per_machine_hour * (len(self.prompt) + len(self.token)) / 3600.0
        self.at(after + self.rng.expovariate(rate), self._fail, any_gen=True)

    def _fail(self) -> None:
        f = self.setup.failures
        if self.done_ubs >= len(self.ubs):
            return
        self.failures += 1
        self.gen += 1
        down = f.detect_s + f.restart_s
        self.frozen_until = self.now + down
        self.lost_s += down
        for st in self.prompt + self.token:
            st.queue.clear()
            st.senders.clear()
            st.busy, st.blocked_on, st.sending = False, None, None
            st.outstanding.clear()
            if self.setup.trace:
                self.intervals.append(SimInterval(st.worker, st.name, "failure", self.now, self.now + down))
        self.pending_prompt.clear()
        self.pending.clear()
        self.ready.clear()
        redo = []
        for ub in self.ubs:
            if ub.phase in ("waiting", "done"):
                continue
            resume = f.replication and ub.phase == "token" and ub.emitted >= (1 if self.disagg else 0)
            if resume:
                self.ready.append(("decode", ub, ub.emitted))
                continue
            self.active.discard(ub.id)
            self.tokens_recomputed += sum(ub.emitted + 1 for r in ub.reqs if r.id not in ub.finished)
            ub.emitted, ub.received = -1, 0
            ub.phase = "prompt" if self.disagg else "token"
            redo.append(ub)
        (self.pending_prompt if self.disagg else self.pending).extend(redo)
        # A resumed microbatch (its next step in the ready queue) keeps its KV buffer; the others gave theirs up.
        self.active = {u.id for _, u, _ in self.ready}
        self.at(self.frozen_until, self._resume)
        if f.times is None and f.per_machine_hour > 0:
            self._next_failure(self.frozen_until)

    def _resume(self) -> None:
        for st in self.prompt + self.token:
            if st.index == 0:
                self._try(st)
        self._mark_starved()

    # ---- results ---------------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        recs = sorted(self.reqs.values(), key=lambda r: r["id"])
        for r in recs:
            r["tokens"] = r["new_tokens"]
        arrivals = [r["arrival_s"] for r in recs]
        finishes = [r["finish_s"] for r in recs if r["finish_s"] is not None]
        start = min(arrivals)
        ends = finishes + [r["first_token_s"] for r in recs if r["first_token_s"] is not None]
        ends += [i.end_s for i in self.intervals if i.kind != "failure"]
        end = max(ends) if ends else start
        span = end - start
        makespan = max(finishes) - start if finishes else 0.0
        ttft = [r["first_token_s"] - r["arrival_s"] for r in recs if r["first_token_s"] is not None]
        lat = [r["finish_s"] - r["arrival_s"] for r in recs if r["finish_s"] is not None]
        tpot = [(r["finish_s"] - r["first_token_s"]) / (r["new_tokens"] - 1) for r in recs
                if r["finish_s"] is not None and r["new_tokens"] >= 2]
        norm = [(r["finish_s"] - r["arrival_s"]) / r["new_tokens"] for r in recs if r["finish_s"] is not None]
        out_tokens = sum(r["new_tokens"] for r in recs)
        stages = {}
        for st in self.prompt + self.token:
            busy = sum(st.busy_s.values())
            frac = min(busy / span, 1.0) if span > 0 else 0.0
            stages[st.name] = {"workers": [st.worker], "busy_fraction": frac, "bubble_fraction": 1.0 - frac,
                               "seconds_by_kind": {k: v for k, v in st.busy_s.items() if v > 0}}
        summary: dict[str, Any] = {
            "format": "dejavu-simulated/1",
            "topology": {"num_prompt_peers": self.setup.prompt_stages, "num_token_peers": self.setup.token_stages,
                         "ubatch_size": self.setup.ubatch_size},
            "counts": {"total": len(recs), "completed": len(lat), "ubatches": len(self.ubs)},
            "span_s": {"start": start, "end": end},
            "makespan_s": makespan,
            "throughput": {"requests_per_s": len(lat) / makespan if makespan > 0 else None,
                           "output_tokens_per_s": out_tokens / makespan if makespan > 0 else None,
                           "output_tokens": out_tokens,
                           "prompt_tokens": sum(r["prompt_len"] for r in recs)},
            "ttft_s": stats(ttft), "tpot_s": stats(tpot), "latency_s": stats(lat), "normalized_latency_s": stats(norm),
            "bubble_fraction_mean": (sum(s["bubble_fraction"] for s in stages.values()) / len(stages)),
            "stages": stages,
        }
        if self.setup.trace:
            summary["prompt_bubbles"] = self._prompt_bubbles(span)
        if self.setup.swap is not None:
            summary["swapping"] = {"bytes_per_s": self.setup.swap.bytes_per_s, "resident": self.setup.swap.resident,
                                   "stall_s": self.swap_stall_s}
        if self.setup.failures is not None:
            f = self.setup.failures
            summary["failures"] = {"count": self.failures, "replication": f.replication, "lost_s": self.lost_s,
                                   "tokens_recomputed": self.tokens_recomputed,
                                   "per_machine_hour": f.per_machine_hour, "downtime_each_s": f.detect_s + f.restart_s}
        return SimResult(summary, recs, self.intervals, [s.name for s in self.prompt + self.token])

    def _prompt_bubbles(self, span: float) -> dict[str, Any]:
        """Idle time of the decoding stages caused by prompts, in the steady state: from when the decoding
        pipeline first holds one microbatch per stage (or from the first admission, if it never does) to
        when the last microbatch enters it (the fill before and the drain after are not the prompts' doing).
        Baseline: a stage idles while another stage of the pipeline runs a prefill. Disaggregated: a token
        stage idles while the token pipeline has room and nothing to admit because the prompt side has
        not finished the waiting prompts."""
        start = self.full_since if self.full_since is not None else self.first_admit_s
        window = (start or 0.0, self.last_admit_s or 0.0)
        by_stage: dict[str, list[tuple[float, float]]] = {}
        prefill: dict[str, list[tuple[float, float]]] = {}
        for i in self.intervals:
            if i.kind in ("prefill", "decode", "stream"):  # a stage blocked in a send idles, as in the runs' metrics
                by_stage.setdefault(i.stage, []).append((i.start_s, i.end_s))
            if i.kind == "prefill":
                prefill.setdefault(i.stage, []).append((i.start_s, i.end_s))
        out: dict[str, float] = {}
        length = max(window[1] - window[0], 0.0)
        for st in self.token:
            if length <= 0:
                out[st.name] = 0.0
                continue
            gaps = _gaps(merge_intervals(by_stage.get(st.name, [])), window)
            if self.disagg:
                cause = merge_intervals(self.starved)
            else:
                cause = merge_intervals(iv for s, ivs in prefill.items() if s != st.name for iv in ivs)
            out[st.name] = _overlap(gaps, cause)
        total = sum(out.values())
        return {"window_s": list(window), "seconds_by_stage": out, "seconds": total,
                "fraction": total / (length * len(self.token)) if length > 0 else 0.0}


def _gaps(busy: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    """The parts of ``window`` that no interval of ``busy`` (sorted, disjoint) covers."""
    gaps, t = [], window[0]
    for a, b in busy:
        if b <= t:
            continue
        if a >= window[1]:
            break
        if a > t:
            gaps.append((t, a))
        t = max(t, b)
    if t < window[1]:
        gaps.append((t, window[1]))
    return gaps


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two sorted lists of disjoint intervals."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def simulate(requests: Iterable[SimRequest], setup: SimSetup) -> SimResult:
    return Simulator(list(requests), setup).run()


def requests_from(sizes: Sequence[tuple[int, int]], arrivals: Sequence[float]) -> list[SimRequest]:
    return [SimRequest(i, float(a), int(p), int(n)) for i, ((p, n), a) in enumerate(zip(sizes, arrivals))]


