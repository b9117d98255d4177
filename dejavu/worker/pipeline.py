"""One worker's part of a pipeline: run work items on its stage, pass them on, sample at the end.

Work items flow down a pipeline in one order, set by its *leader* (TP rank 0 of the pipeline's first
stage): every other rank just runs what arrives, in arrival order, and passes it on. An item is a small
header plus one tensor (token ids into the first stage, hidden states after it):

- ``prefill``: a new microbatch (request ids, prompt lengths, sampling parameters, cache length);
- ``decode``: one token step of a microbatch in flight (``step`` k writes position ``len + k``);
- ``admit`` (token pipeline of a disaggregated run): take a microbatch from the prompt pipeline —
  receive its KV cache, layer by layer, from the prompt stages — then run its first token step;
- ``stop``: no more work; the rank passes it on and ends.

The last stage's TP rank 0 (the *sampler*) picks tokens with ``dejavu.sampling`` exactly as
``dejavu.engine.Engine`` does, reports them to the controller, and sends the next inputs back to the
leader (*feedback*). The leader keeps at most one item per microbatch in flight and at most as many
microbatches as its pipeline has stages (one KV buffer each); new prompts go in as soon as a buffer is
free, between the token steps of the others. When a microbatch finishes, the leader tells every stage
to drop its cache by listing it in the next item's ``release``.

In the baseline one pipeline does both prefill and decode. Disaggregated, the prompt pipeline only
prefills: each prompt stage streams every layer's cache to the token stage that owns the layer while
the next layer computes, and its sampler hands the first tokens to the token pipeline's leader.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack
import torch
import zmq

from ..model.cuda_graphs import input_buffer
from ..model.kv_cache import KVCache
from ..model.stage import StageModel
from ..protocol import FaultPoint, Shutdown, Submit, Tokens
from ..records import StageEvent
from ..sampling import SamplingParams, is_finished, sample
from ..streaming import StreamStats
from .cache_pool import CachePool, KVPoolOptions, Lease, make_pool
from .control import ControlClient
from .dataplane import ACT, CHANNEL_NAMES, FEEDBACK, HANDOVER, TP, DataPlane
from .faults import Fault
from .handover import KVReceiver, KVSender
from .topology import Role, Topology


class WorkerError(RuntimeError):
    pass


class Stale(RuntimeError):
    """This generation of the data plane was abandoned (a peer failed): the serving thread leaves."""


@dataclass
class Ubatch:
    id: int
    request_ids: list[int]
    lens: list[int]
    max_seq: int
    params: list[SamplingParams]
    cache: KVCache | None = None
    lease: Lease | None = None  # its buffer in the stage's cache pool (stages that decode)
    outputs: list[list[int]] = field(default_factory=list)  # sampler only
    live: list[bool] = field(default_factory=list)  # sampler only
    prompt: bool = False  # the prompt's positions are in the cache (prefill or hand-over completed)
    written: int = 0  # decode steps whose positions are in the cache

    @classmethod
    def from_meta(cls, meta: dict) -> "Ubatch":
        params = [SamplingParams(**{**p, "stop_token_ids": tuple(p.get("stop_token_ids", ()))}) for p in meta["params"]]
        n = len(meta["ids"])
        return cls(meta["ubatch"], list(meta["ids"]), list(meta["lens"]), int(meta["max_seq"]), params,
                   outputs=[list(o) for o in meta.get("outputs", [[] for _ in range(n)])],
                   live=list(meta.get("live", [True] * n)))


class Mailbox:
    """What a leader waits on: controller messages (main socket) and side channels (listener threads)."""

    def __init__(self, ctl: ControlClient, dp: DataPlane, stale: threading.Event | None = None) -> None:
        self.ctl, self.dp, self.stale = ctl, dp, stale
        self.address = f"inproc://mailbox-{os.getpid()}-{id(self)}"
        self.pull = ctl.ctx.socket(zmq.PULL)
        self.pull.bind(self.address)
        self.local: deque = deque()
        self.listening = 0  # listener threads that have not yet passed on their channel's stop
        self.poller = zmq.Poller()
        self.poller.register(ctl.main, zmq.POLLIN)
        self.poller.register(self.pull, zmq.POLLIN)

    def listen(self, src: int, channel: int) -> None:
        self.listening += 1
        threading.Thread(target=self._listen, args=(src, channel), daemon=True,
                         name=f"listen-{CHANNEL_NAMES[channel]}").start()

    def _listen(self, src: int, channel: int) -> None:
        push = self.ctl.ctx.socket(zmq.PUSH)
        push.connect(self.address)
        try:
            while True:
                meta = self.dp.side_recv(src, channel)
                push.send(msgpack.packb([channel, meta], use_bin_type=True))
                if meta.get("kind") == "stop":
                    break
        except Exception as e:  # a dead peer surfaces here first: hand it to the main thread
            push.send(msgpack.packb(["error", f"{CHANNEL_NAMES[channel]} channel from rank {src} failed: {e}"]))
        finally:
            push.close(linger=1000)

    def post(self, channel: int, meta: dict) -> None:
        self.local.append((channel, meta))

    def get(self, block: bool) -> list[tuple]:
        out = list(self.local)
        self.local.clear()
        timeout = 0 if out or not block else (100 if self.stale is not None else 1000)
        while True:
            if self.stale is not None and self.stale.is_set():
                raise Stale("generation abandoned")
            ready = dict(self.poller.poll(timeout))
            if self.ctl.main in ready:
                out += [("ctl", m) for m in self.ctl.poll(0)]
            if self.pull in ready:
                while True:
                    try:
                        out.append(tuple(msgpack.unpackb(self.pull.recv(zmq.NOBLOCK), raw=False,
                                                         strict_map_key=False)))
                    except zmq.Again:
                        break
            if out or not block:
                return out


class StageWorker:
    def __init__(self, role: Role, topo: Topology, model: StageModel, dp: DataPlane, ctl: ControlClient, *,
                 ubatch_size: int, fault: Fault | None = None, kv_window: int = 2, cuda_graphs: bool = False,
                 recoverable: bool = False, kv: KVPoolOptions | None = None) -> None:
        self.role, self.topo, self.model, self.ctl = role, topo, model, ctl
        self.ubatch_size, self.fault, self.kv_window = ubatch_size, fault, kv_window
        self.device = model.device
        self.states: dict[int, Ubatch] = {}
        self.events: list[StageEvent] = []
        self.where = "starting"
        self.is_sampler = role.is_last and role.tp_rank == 0
        self.kv_stats = StreamStats()
        # Stages that decode keep their microbatches' caches in reused buffers (and, on a GPU, replay
        # each buffer's decode step as a CUDA graph); prompt stages hold a prompt-sized cache per
        # microbatch, whose layers are contiguous blocks for the hand-over.
        # With swapping (kv.swapping) only kv.resident of them stay on the device (dejavu/worker/swap.py).
        self.pool = (make_pool(model, ubatch_size, cuda_graphs=cuda_graphs, options=kv, stats=self.kv_stats)
                     if role.pipeline != "prompt" else None)
        # Fault tolerance: a generation of the data plane ends when a peer fails; the serving thread of
        # that generation then leaves at its next message (``stale``), the caches stay.
        self.recoverable = recoverable
        self.generation = 0
        self.stale: threading.Event | None = None
        self.in_comm = False  # blocked in the data plane (safe for the recovery to take over)
        self.replicator = None  # replication.Replicator, with --with_ft
        self.initial_items: list[tuple[dict, torch.Tensor | None]] = []
        self.dp, self.sender, self.receiver, self.mailbox = None, None, None, None
        if dp is not None:  # a recoverable worker attaches each generation's data plane when it comes
            self.attach(dp, 0)

    def attach(self, dp: DataPlane, generation: int) -> None:
        """Serve on ``dp`` from now on (a new data plane after a failure); caches and states stay."""
        role, topo = self.role, self.topo
        self.dp, self.generation = dp, generation
        self.stale = threading.Event() if self.recoverable else None
        kv_heads = self.model.cfg.num_kv_heads
        self.sender = (KVSender(dp, topo, role, self.kv_stats, num_kv_heads=kv_heads, window=self.kv_window)
                       if role.pipeline == "prompt" else None)
        self.receiver = (KVReceiver(dp, topo, role, self.kv_stats, num_kv_heads=kv_heads)
                         if topo.disaggregated and role.pipeline == "token" else None)
        p, s, t = role.pipeline, role.stage, role.tp_rank
        self.downstream = None if role.is_last else topo.rank_of(p, s + 1, t)
        if role.is_leader:
            self.upstream, self.up_channel = None, None
        elif role.is_first:
            self.upstream, self.up_channel = topo.rank_of(p, 0, 0), TP
        else:
            self.upstream, self.up_channel = topo.rank_of(p, s - 1, t), ACT
        self.tp_peers = [r for r in topo.stage_ranks(p, s) if r != role.rank] if role.is_leader else []
        self.mailbox = Mailbox(self.ctl, dp, self.stale) if role.is_leader else None

    def comm(self, fn, *args):
        """A data-plane call; afterwards, a serving thread whose generation was abandoned leaves."""
        self.in_comm = True
        try:
            return fn(*args)
        finally:
            self.in_comm = False
            self.check_stale()

    def check_stale(self) -> None:
        if self.stale is not None and self.stale.is_set():
            raise Stale(f"generation {self.generation} abandoned")

    @torch.no_grad()
    def warm_up(self, max_seq: int) -> None:
        """On a GPU, pay the one-time costs before the first request: compile the kernels of a prefill
        (both length classes the kernels specialise on) and, on stages that decode, allocate the KV
        buffers the pipeline can fill at once and capture their decode graphs, ``max_seq`` positions
        each (a longer microbatch later gets a longer buffer, captured then), and, where the stage also
        prefills, the graphs of its short prefills."""
        if self.device.type != "cuda":
            return
        m = self.model
        for t in (16, 17):
            x = input_buffer(m, 1, t)
            index = torch.tensor([t - 1]) if self.role.is_last else None
            m(x, torch.arange(t).view(1, t), m.new_cache(1, t), index)
        if self.pool is not None and self.pool.cuda_graphs:
            n = self.pool.warm_buffers(self.role.num_stages)  # swapping: only the resident buffers
            leases = [self.pool.acquire(-1 - i, self.ubatch_size, max_seq) for i in range(n)]
            b = self.ubatch_size
            x = input_buffer(m, b, 1)
            for lease in leases:
                self.pool.decode(lease, x, torch.zeros(b, 1, dtype=torch.long), None)
                if not self.topo.disaggregated:  # this stage prefills into its buffers (the baseline)
                    self.pool.warm_prefill(lease)
            for i in range(len(leases)):
                self.pool.release(-1 - i)
        torch.cuda.synchronize(self.device)

    # ---- timeline -------------------------------------------------------------------------------------
    def event(self, kind: str, start: float, ubatch: int = -1) -> None:
        if self.device.type == "cuda":  # the compute only: swaps and replication copies run on their own streams
            torch.cuda.current_stream(self.device).synchronize()
        self.events.append(StageEvent(self.role.rank, self.role.name, kind, start, self.ctl.now(), ubatch,
                                      self.role.tp_rank))

    # ---- main loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.role.is_leader:
            Leader(self).run()
        else:
            while True:
                self.where = "waiting for work"
                t0 = self.ctl.now()
                meta, tensors = self.comm(self.dp.recv, self.upstream, self.up_channel)
                self.event("idle", t0, meta.get("ubatch", -1))
                if not self.process(meta, tensors[0] if tensors else None):
                    break
        if self.sender is not None:
            self.where = "finishing KV sends"
            self.comm(self.sender.flush)
        self.where = "done"

    def issue(self, meta: dict, x: torch.Tensor | None) -> bool:
        """Leader: give an item to this stage's TP peers, then run it here."""
        t0 = self.ctl.now()
        for peer in self.tp_peers:
            self.comm(self.dp.send, peer, meta, [x] if x is not None else [], TP)
        if self.tp_peers:
            self.event("send", t0, meta.get("ubatch", -1))
        return self.process(meta, x)

    def process(self, meta: dict, x: torch.Tensor | None) -> bool:
        kind = meta["kind"]
        for u in meta.get("release", ()):
            self.forget(u)
        if kind == "stop":
            self.where = "stopping"
            self.forward(meta, None)
            if self.is_sampler:
                self.notify(HANDOVER if self.role.pipeline == "prompt" else FEEDBACK, {"kind": "stop"})
            return False
        u = meta["ubatch"]
        step = meta.get("step", 0)
        self.where = f"{kind} ubatch {u}" + (f" step {step}" if kind == "decode" else "")
        if self.fault is not None:
            self.fault.check(kind, step)
        if self.ctl.armed is not None:
            self.park_if_armed(kind, step)
        if kind == "prefill":
            self.prefill(meta, x)
        elif kind == "admit":
            self.admit(meta, x)
        elif kind == "decode":
            if u not in self.states:
                raise WorkerError(f"decode step {step} for ubatch {u}, which this stage does not hold")
            self.decode(meta, x, self.states[u])
        elif kind == "resume":
            self.resume(meta, x)
        else:
            raise WorkerError(f"unknown work item kind {kind!r}")
        self.ctl.progress += 1
        return True

    def forward(self, meta: dict, out: torch.Tensor | None) -> None:
        if self.downstream is None:
            return
        t0 = self.ctl.now()
        self.comm(self.dp.send, self.downstream, meta, [out] if out is not None else [], ACT)
        self.event("send", t0, meta.get("ubatch", -1))

    def notify(self, channel: int, meta: dict) -> None:
        """Sampler -> a leader: next-token feedback, or a hand-over notice."""
        dst = self.topo.token_leader
        if dst == self.role.rank:
            if meta.get("kind") != "stop":  # the leader itself is stopping: nobody to tell
                self.mailbox.post(channel, meta)
        else:
            self.comm(self.dp.side_send, dst, meta, channel)

    # ---- work items -----------------------------------------------------------------------------------
    def prefill(self, meta: dict, x: torch.Tensor) -> None:
        ub = Ubatch.from_meta(meta)
        b, t = len(ub.lens), max(ub.lens)
        # The prompt pipeline only ever holds the prompt; the baseline keeps decoding in the same buffer.
        if self.sender is not None:
            ub.cache = self.model.new_cache(b, t)
        else:
            ub.lease = self.pool.acquire(ub.id, b, ub.max_seq)
            ub.cache = ub.lease.cache
        index = torch.tensor(ub.lens) - 1 if self.role.is_last else None
        t0 = self.ctl.now()
        if self.sender is not None:
            # Disaggregated: each layer's cache leaves for the token stages as soon as it is written.
            hook = self.sender.start(ub.cache, t)
            positions = torch.arange(t).expand(b, t)  # on the CPU: the stage plans the step without a sync
            out = self.model(x.to(self.device), positions, ub.cache, index, on_layer_done=hook)
        else:
            out = self.pool.prefill(ub.lease, x, index)
            ub.prompt = True
            if self.replicator is not None:
                self.replicator.prompt(ub.id, ub.lease.cache, ub.lens, ub.max_seq)
        self.event("prefill", t0, ub.id)
        self.forward(meta, out)
        if self.role.is_last and self.is_sampler:
            inputs, done = self.sample(ub, out, 0)
            if self.role.pipeline == "prompt":
                notice = {k: meta[k] for k in ("ubatch", "ids", "lens", "max_seq", "params")}
                self.notify(HANDOVER, {**notice, "kind": "admit", "step": 0, "plen": t, "outputs": ub.outputs,
                                       "live": ub.live, "drop": done})
            else:
                self.notify(FEEDBACK, {"ubatch": ub.id, "step": 0, "tokens": inputs, "done": done})
        if self.sender is not None:
            self.comm(self.sender.ubatch_done)  # may wait for the oldest hand-over: back-pressure from the token side
        else:
            self.states[ub.id] = ub

    def admit(self, meta: dict, x: torch.Tensor | None) -> None:
        ub = Ubatch.from_meta(meta)
        ub.lease = self.pool.acquire(ub.id, len(ub.lens), ub.max_seq)
        ub.cache = ub.lease.cache
        t0 = self.ctl.now()
        self.states[ub.id] = ub  # a failure mid-receive leaves it without a prompt (prompt=False)
        self.comm(self.receiver.receive, ub.cache, int(meta["plen"]))
        self.event("stream", t0, ub.id)
        if meta.get("drop"):  # every request ended with its first token: nothing to decode
            self.forget(ub.id)
            self.forward(meta, None)
            return
        ub.prompt = True
        if self.replicator is not None:
            self.replicator.prompt(ub.id, ub.lease.cache, ub.lens, ub.max_seq)
        self.decode(meta, x, ub)

    def decode(self, meta: dict, x: torch.Tensor, ub: Ubatch) -> None:
        k, b = int(meta["step"]), len(ub.lens)
        # Finished slots keep stepping on their last token (as the engine does); their writes are never read.
        positions = (torch.tensor(ub.lens) + k).clamp(max=ub.max_seq - 1).view(b, 1)
        index = torch.zeros(b, dtype=torch.long) if self.role.is_last else None
        t0 = self.ctl.now()
        out = self.pool.decode(ub.lease, x, positions, index)
        ub.written = k + 1
        if self.replicator is not None:
            # lease: swapping rebinds it. A graph-replayed step's positions are on the device already.
            on_device = self.pool.positions_on_device(ub.lease)
            self.replicator.step(ub.id, ub.lease.cache, k, positions.view(-1).tolist() if on_device is None else on_device)
        self.event("decode", t0, ub.id)
        self.forward(meta, out)
        if self.is_sampler:
            inputs, done = self.sample(ub, out, k + 1)
            self.notify(FEEDBACK, {"ubatch": ub.id, "step": k + 1, "tokens": inputs, "done": done})

    def sample(self, ub: Ubatch, logits: torch.Tensor, step: int) -> tuple[list[int], bool]:
        chosen = sample(logits, ub.params, step, [len(o) for o in ub.outputs])
        ids, toks, fin = [], [], []
        for i, tok in enumerate(chosen):
            if not ub.live[i]:
                continue
            ub.outputs[i].append(tok)
            end = is_finished(tok, len(ub.outputs[i]), ub.params[i])
            ub.live[i] = not end
            ids.append(ub.request_ids[i])
            toks.append(tok)
            fin.append(end)
        self.check_stale()  # a stale generation's tokens are not sent (the controller would ignore them)
        self.ctl.send(Tokens(self.role.rank, ub.id, step, ids, toks, fin, self.ctl.now(), self.generation))
        return [o[-1] for o in ub.outputs], not any(ub.live)

    # ---- fault tolerance ------------------------------------------------------------------------------
    def park_if_armed(self, kind: str, step: int) -> None:
        """Failure scenario: at the armed phase, tell the controller and wait here to be killed from
        outside (the runner's SIGKILL or SIGSTOP then lands exactly at this phase)."""
        phase, at = self.ctl.armed
        if phase != {"resume": "decode"}.get(kind, kind) or (phase == "decode" and step < at):
            return
        self.ctl.armed = None
        self.ctl.send(FaultPoint(self.role.rank, phase, step))
        self.where = f"parked at {phase}" + (f" step {step}" if phase == "decode" else "") + " for the failure scenario"
        self.in_comm = True  # nothing here to protect: the recovery may abandon this thread
        while not (self.stale is not None and self.stale.is_set()):
            time.sleep(0.05)
        self.in_comm = False
        self.check_stale()
    def forget(self, u: int) -> None:
        """Drop a microbatch: its state, its buffer and its replicas."""
        self.states.pop(u, None)
        if self.pool is not None:
            self.pool.release(u)
        if self.replicator is not None:
            self.replicator.drop(u)

    def resume(self, meta: dict, x: torch.Tensor) -> None:
        """Continue a microbatch after a failure from decode step ``meta["step"]``: survivors still hold
        its cache (and positions past the step, overwritten now with the same values); a replacement
        holds the buffer it restored from its replicas."""
        u = meta["ubatch"]
        ub = self.states.get(u)
        fresh = Ubatch.from_meta(meta)
        if ub is None:
            lease = self.pool.leases.get(u)
            if lease is None:
                raise WorkerError(f"resume of ubatch {u} at step {meta['step']}, whose cache this stage does not hold")
            ub = fresh
            ub.lease, ub.cache, ub.prompt = lease, lease.cache, True
            self.states[u] = ub
        else:  # keep the cache and what it holds; the rest (the sampler's tokens too) as the controller says
            ub.request_ids, ub.lens, ub.max_seq, ub.params = fresh.request_ids, fresh.lens, fresh.max_seq, fresh.params
            ub.outputs, ub.live = fresh.outputs, fresh.live
        self.decode(meta, x, ub)

    def holdings(self) -> list[dict]:
        """What this stage holds, per microbatch (the Rejoin report)."""
        return [{"ubatch": u, "prompt": ub.prompt, "steps": ub.written} for u, ub in sorted(self.states.items())
                if self.pool is not None]


class Leader:
    """The scheduling loop of a pipeline's entry rank.

    Baseline and prompt leaders take microbatches from the controller (Submit); the token leader of a
    disaggregated run takes them from the prompt pipeline's hand-over notices. Leaders of pipelines that
    decode (baseline, token) get feedback from their sampler and admit at most one microbatch per stage.
    """

    def __init__(self, w: StageWorker) -> None:
        self.w, self.role, self.topo = w, w.role, w.topo
        self.decodes = self.role.pipeline == "token"
        self.capacity = (w.pool.inflight or self.role.num_stages) if self.decodes else None
        mb = w.mailbox
        if self.decodes and self.topo.sampler_rank != self.role.rank:
            mb.listen(self.topo.sampler_rank, FEEDBACK)
        if self.topo.disaggregated and self.decodes:
            mb.listen(self.topo.prompt_sampler_rank, HANDOVER)
        self.pending: deque[tuple[dict, torch.Tensor | None]] = deque()
        self.ready: deque[dict] = deque()
        self.active: set[int] = set()
        # After a failure: microbatches that continue from a decode step (already counted as active).
        self.resumed: deque[tuple[dict, torch.Tensor | None]] = deque(w.initial_items)
        self.active.update(meta["ubatch"] for meta, _ in self.resumed)
        self.release: list[int] = []
        self.closing = False

    def run(self) -> None:
        w = self.w
        while True:
            for ev in w.mailbox.get(block=False):
                self.handle(*ev)
            item = self.next_item()
            if item is not None:
                meta, x = item
                meta = {**meta, "release": self.release}
                self.release = []
                w.issue(meta, x)
                continue
            if self.closing and not self.pending and not self.active:
                w.issue({"kind": "stop", "release": self.release}, None)
                # Stay until every side channel has delivered its stop: leaving earlier would close
                # the connection under a sampler still sending to this rank.
                while w.mailbox.listening > 0:
                    for ev in w.mailbox.get(block=True):
                        self.handle(*ev)
                return
            w.where = "waiting for microbatches" if not self.active else "waiting for feedback"
            t0 = w.ctl.now()
            events = w.mailbox.get(block=True)
            w.event("idle", t0)
            for ev in events:
                self.handle(*ev)

    def handle(self, source, msg) -> None:
        if source == "error":
            raise WorkerError(msg)
        if source == "ctl":
            if isinstance(msg, Submit):
                self.pending.append(self.prefill_item(msg))
            elif isinstance(msg, Shutdown):
                self.closing = True
            return
        if msg.get("kind") == "stop":
            self.w.mailbox.listening -= 1
            if source == HANDOVER:
                self.closing = True
            return
        if source == HANDOVER:
            x = None if msg["drop"] else torch.tensor([o[-1] for o in msg["outputs"]]).view(-1, 1)
            self.pending.append((msg, x))
        elif source == FEEDBACK:
            if msg["done"]:
                self.active.discard(msg["ubatch"])
                self.release.append(msg["ubatch"])
            else:
                self.ready.append(msg)

    def prefill_item(self, sub: Submit) -> tuple[dict, torch.Tensor]:
        if len(sub.prompts) > self.w.ubatch_size:
            raise WorkerError(f"microbatch {sub.ubatch} has {len(sub.prompts)} requests but this worker was started "
                              f"with --ubatch_size {self.w.ubatch_size}; start controller and workers with the same "
                              f"--ubatch_size")
        lens = [len(p) for p in sub.prompts]
        tokens = torch.zeros(len(lens), max(lens), dtype=torch.long)
        for i, ids in enumerate(sub.prompts):
            tokens[i, : len(ids)] = torch.tensor(ids)
        max_seq = max(n + p["max_new_tokens"] for n, p in zip(lens, sub.params))
        meta = {"kind": "prefill", "ubatch": sub.ubatch, "ids": sub.request_ids, "lens": lens, "max_seq": max_seq,
                "params": sub.params}
        return meta, tokens

    def next_item(self) -> tuple[dict, torch.Tensor | None] | None:
        if self.resumed:
            return self.resumed.popleft()
        if self.pending:
            meta, x = self.pending[0]
            if meta.get("drop") or self.capacity is None or len(self.active) < self.capacity:
                self.pending.popleft()
                if self.decodes and not meta.get("drop"):
                    self.active.add(meta["ubatch"])
                return meta, x
        if self.ready:
            fb = self.ready.popleft()
            return ({"kind": "decode", "ubatch": fb["ubatch"], "step": fb["step"]},
                    torch.tensor(fb["tokens"]).view(-1, 1))
        return None
