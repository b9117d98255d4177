"""Microbatch swapping (the paper's §4.2): a stage keeps only a few KV buffers on the device.

In a pipeline of D stages, D microbatches (or ``--inflight_ubatches``) are in flight, but a stage runs
one at a time. :class:`SwappingPool` keeps ``resident`` device buffers (default 2: the microbatch
running and the one after it); every other in-flight microbatch's cache lives in its own host block
(pinned on a GPU, kept in a :class:`~dejavu.streaming.LocalTransport` under ``swap/u<ubatch>``). When a
microbatch's turn starts, the pool issues the swap for the turn after it: the buffer of the microbatch
that ran last is copied out to its host block and the next microbatch's cache is copied into that
buffer — on a CUDA stream of its own that first waits for the compute (and the streaming side stream)
queued so far, so the copies overlap this turn's compute; on the CPU, on a background thread. The
compute waits for a buffer's swap only when it needs that buffer (a GPU-side event wait: the host never
blocks), and that wait is what the results call *exposed*; the rest of the swap time is hidden.

CUDA graphs are captured once per resident buffer (the pool's buffers never change address): a
microbatch's cache is copied into whichever buffer it gets, never re-captured. Each lease is rebound
to its microbatch's buffer at every turn (:meth:`Lease.rebind`), so code that kept ``lease.cache``
sees the right buffer.

Which microbatch comes next: the leader sends work in its own order and every other stage sees it in
arrival order, so the pool predicts from what it has seen: the next turn goes to the in-flight
microbatch whose last turn is the oldest (round robin, the order a pipeline's feedback loop keeps). A
wrong guess costs a swap the compute waits for, never a wrong token. A microbatch that enters (prefill,
or the hand-over of a disaggregated run, which lands in a resident buffer) takes the buffer of the one
needed last.

A swapped-out cache is still a cache like any other (fault tolerance): :meth:`SwappingPool.cache_of`
returns a microbatch's whole buffer wherever it lives (its device buffer, or its host block once the
swap-out has landed), and :meth:`SwappingPool.make_resident` brings it into a device buffer.

Memory (checked before serving by :meth:`CachePool.plan`): the device holds ``resident`` buffers, the host
``inflight`` blocks; :func:`kv_need` sizes them and :func:`check_kv` compares them with the budget
(``--kv_memory_gb``, else 90% of the device's free memory on a GPU) and the host's available memory.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..model.config import dtype_name
from ..model.stage import StageModel
from ..streaming.stats import StreamStats
from ..streaming.stream import follow
from ..streaming.transports.base import side_stream
from ..streaming.transports.local import LocalTransport
from .cache_pool import Buffer, CachePool, KVPoolOptions, Lease, buffer_positions

GB = 1e9  # --kv_memory_gb / topology.kv_memory_gb count decimal gigabytes

# What the options are called in messages: worker flags, or dejavu-run's config keys.
WORKER_NAMES = {"swapping": "--swapping", "resident": "--resident_buffers", "budget": "--kv_memory_gb",
                "ubatch": "--ubatch_size", "inflight": "--inflight_ubatches", "max_seq": "--max_seq_len"}
CONFIG_NAMES = {"swapping": "topology.swapping=true", "resident": "topology.resident_buffers",
                "budget": "topology.kv_memory_gb", "ubatch": "topology.ubatch_size",
                "inflight": "topology.inflight_ubatches", "max_seq": "workload.input_len + workload.output_len"}


# ---- worker flags -------------------------------------------------------------------------------------
def check_flags(opts) -> None:
    """The worker's KV flags on their own (WorkerOptions); the memory is checked later (CachePool.plan)."""
    if opts.resident_buffers < 2:
        raise ValueError(f"--resident_buffers must be >= 2 (the microbatch a stage runs and the one it runs next), "
                         f"got {opts.resident_buffers}")
    if opts.inflight_ubatches is not None and opts.inflight_ubatches < 1:
        raise ValueError(f"--inflight_ubatches must be >= 1, got {opts.inflight_ubatches}")
    if opts.kv_memory_gb is not None and not opts.kv_memory_gb > 0:
        raise ValueError(f"--kv_memory_gb must be > 0 (GB of device memory for KV buffers), got {opts.kv_memory_gb}")


def kv_options(opts, role) -> KVPoolOptions:
    """A stage's KVPoolOptions from the worker's flags: as many microbatches in flight as the pipeline has
    stages unless --inflight_ubatches says otherwise."""
    budget = None if opts.kv_memory_gb is None else int(opts.kv_memory_gb * GB)
    return KVPoolOptions(swapping=opts.swapping, resident=opts.resident_buffers,
                         inflight=opts.inflight_ubatches or role.num_stages, budget_bytes=budget,
                         max_seq=opts.max_seq_len)


# ---- sizing and checks --------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVNeed:
    """The KV memory of one stage shard (one worker) that decodes."""

    buffer_bytes: int  # one microbatch's buffer: layers x k/v x ubatch x heads x positions x head_dim
    layers: int
    ubatch: int
    positions: int
    inflight: int
    swapping: bool
    resident: int

    @property
    def device_bytes(self) -> int:
        return (min(self.resident, self.inflight) if self.swapping else self.inflight) * self.buffer_bytes

    @property
    def host_bytes(self) -> int:
        return self.inflight * self.buffer_bytes if self.swapping else 0

    def detail(self) -> str:
        return f"{self.ubatch} requests x {self.positions} positions x {self.layers} layers"


def kv_need(shape, dtype: torch.dtype, *, ubatch: int, max_seq: int, max_positions: int, inflight: int,
            swapping: bool, resident: int, round_to: int = 256) -> KVNeed:
    """``shape``: the stage's CacheShape (layers, heads of its shard, head_dim; batch and positions are
    ignored)."""
    positions = buffer_positions(max_seq, max_positions, round_to)
    size = shape.layers * 2 * ubatch * shape.kv_heads * positions * shape.head_dim
    size *= torch.empty((), dtype=dtype).element_size()
    return KVNeed(size, shape.layers, ubatch, positions, inflight, swapping, resident)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def host_available() -> int | None:
    """Bytes of host memory available for new allocations (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def budget_of(budget_bytes: int | None, device: torch.device, names: dict | None = None) -> tuple[int | None, str]:
    """The device memory the KV buffers may use and where that number comes from; (None, "") on the CPU
    without a configured budget (the host's memory is the limit there, checked for the swap space)."""
    names = names or WORKER_NAMES
    if budget_bytes is not None:
        return budget_bytes, f"{names['budget']}={budget_bytes / GB:g}"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9), f"90% of the {fmt_bytes(free)} free on {device}; set {names['budget']} to choose"
    return None, ""


def check_kv(need: KVNeed, budget: int | None, source: str, *, names: dict | None = None, who: str = "this stage",
             host: int | None | bool = True) -> list[str]:
    """Problems (empty: it fits) with the device KV memory ``budget`` and, with swapping, the host's
    available memory (``host``: bytes, True to read it here, None/False to skip)."""
    n = names or WORKER_NAMES
    buf, problems = need.buffer_bytes, []
    one = f"{fmt_bytes(buf)} per microbatch: {need.detail()}"
    if budget is not None and budget < buf:
        problems.append(f"{who}: {n['budget']} gives {fmt_bytes(budget)} ({source}), less than one microbatch's KV "
                        f"cache ({one}); raise {n['budget']} or lower {n['ubatch']}")
    elif budget is not None and need.device_bytes > budget:
        if need.swapping:
            problems.append(f"{who}: the {need.resident} resident KV buffers of swapping need "
                            f"{fmt_bytes(need.device_bytes)} of device memory ({need.resident} x {one}) but there is "
                            f"{fmt_bytes(budget)} ({source}); lower {n['resident']} (at least 2) or {n['ubatch']}, or "
                            f"raise {n['budget']}")
        else:
            fits = budget // buf
            problems.append(f"{who}: the KV caches of {need.inflight} microbatches in flight need "
                            f"{fmt_bytes(need.device_bytes)} of device memory ({need.inflight} x {one}) but there is "
                            f"{fmt_bytes(budget)} ({source}), room for {fits}; with {n['swapping']} a stage keeps "
                            f"only {need.resident} of them on the device ({fmt_bytes(need.resident * buf)}) and the "
                            f"others in pinned host memory ({fmt_bytes(need.inflight * buf)} of swap space), or "
                            f"lower {n['inflight']} / {n['ubatch']}, or raise {n['budget']}")
    if need.swapping and host is not None and host is not False:
        avail = host_available() if host is True else host
        if avail is not None and need.host_bytes > avail:
            problems.append(host_problem(need.host_bytes, avail, f"{need.inflight} x {one}", names=n, who=who))
    return problems


def host_problem(need: int, avail: int, detail: str, *, names: dict, who: str) -> str:
    return (f"{who}: swapping keeps the KV caches of the microbatches in flight in host memory and needs "
            f"{fmt_bytes(need)} of it ({detail}) but the host has {fmt_bytes(avail)} available (MemAvailable); "
            f"lower {names['inflight']} or {names['ubatch']}, or leave swapping off")


# ---- copies off the compute's path -------------------------------------------------------------------
@dataclass
class _Job:
    """One swap on one buffer: an evicted microbatch's cache out to its host block and/or another's in."""

    kinds: list[str]  # "out" / "in", in issue order
    nbytes: int  # per copy (a whole buffer)
    counted: bool  # False during the GPU warm-up (microbatch ids < 0)
    keep: tuple = ()
    events: list = field(default_factory=list)  # GPU: start, then one after each copy
    needs: list = field(default_factory=list)  # GPU: compute-stream events where the compute waited for it
    future: object = None  # CPU: the copier thread's future (-> seconds per copy)
    exposed: float = 0.0  # CPU: seconds the compute thread waited for it


class _CudaCopier:
    """Swaps on a stream of their own (not the streaming side stream, which hand-over and replication use)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def submit(self, job: _Job, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        follow(self.stream, torch.cuda.current_stream(self.device))  # the compute that wrote the evicted buffer
        follow(self.stream, side_stream(self.device))  # gathers of it for replication, scatters of a hand-over
        with torch.cuda.stream(self.stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            job.events.append(start)
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
                e = torch.cuda.Event(enable_timing=True)
                e.record(self.stream)
                job.events.append(e)
        job.keep = tuple(t for c in copies for t in c)

    def wait(self, job: _Job) -> None:
        compute = torch.cuda.current_stream(self.device)
        if job.counted:
            need = torch.cuda.Event(enable_timing=True)
            need.record(compute)
            job.needs.append(need)
        compute.wait_event(job.events[-1])

    def host_wait(self, job: _Job) -> None:
        job.events[-1].synchronize()

    def done(self, job: _Job) -> bool:
        return job.events[-1].query() and all(e.query() for e in job.needs)

    def resolve(self, job: _Job) -> tuple[list[float], float]:
        """Seconds of each copy, and the seconds the compute waited for the job."""
        ev = job.events
        copies = [ev[i].elapsed_time(ev[i + 1]) / 1e3 for i in range(len(ev) - 1)]
        exposed = sum(max(0.0, n.elapsed_time(ev[-1]) / 1e3) for n in job.needs)
        return copies, exposed

    def close(self) -> None:
        pass


class _ThreadCopier:
    """On the CPU: copies on one background thread, in submission order (copy_ releases the GIL)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-swap")

    def submit(self, job: _Job, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        def run() -> list[float]:
            seconds = []
            for dst, src in copies:
                t0 = time.perf_counter()
                dst.copy_(src)
                seconds.append(time.perf_counter() - t0)
            return seconds

        job.future = self.pool.submit(run)

    def wait(self, job: _Job) -> None:
        if job.future.done():
            job.future.result()
            return
        t0 = time.perf_counter()
        job.future.result()
        job.exposed += time.perf_counter() - t0

    def host_wait(self, job: _Job) -> None:
        job.future.result()

    def done(self, job: _Job) -> bool:
        return job.future.done()

    def resolve(self, job: _Job) -> tuple[list[float], float]:
        return job.future.result(), job.exposed

    def close(self) -> None:
        self.pool.shutdown(wait=True)


# ---- the pool -----------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """A resident device buffer and the microbatch whose cache it holds (or is being swapped into it)."""

    buffer: Buffer
    owner: int | None = None
    dirty: bool = False  # holds writes its owner's host block lacks
    job: _Job | None = None  # the last swap on this buffer; the compute waits for it before using it


class SwappingPool(CachePool):
    swapping = True

    def __init__(self, model: StageModel, batch: int, *, cuda_graphs: bool = False, round_to: int = 256,
                 options: KVPoolOptions, stats: StreamStats | None = None) -> None:
        super().__init__(model, batch, cuda_graphs=cuda_graphs, round_to=round_to, options=options)
        if options.resident < 2:
            raise ValueError(f"swapping needs at least 2 resident KV buffers (--resident_buffers), "
                             f"got {options.resident}")
        self.resident = options.resident
        self.stats = stats
        on_gpu = model.device.type == "cuda"
        self.copier = _CudaCopier(model.device) if on_gpu else _ThreadCopier()
        self.host = LocalTransport(pin_memory=on_gpu)
        self.pinned = on_gpu
        self.slots: list[_Slot] = []
        self.length: int | None = None  # positions of every buffer (fixed at the first allocation)
        self.where: dict[int, _Slot] = {}  # microbatch -> the slot holding its cache
        self.homes: dict[int, torch.Tensor] = {}  # microbatch -> its host block, once it was swapped out
        self.home_job: dict[int, _Job] = {}  # the last job that wrote a microbatch's host block
        self.tick: dict[int, int] = {}  # microbatch -> the clock at its last turn
        self.clock = 0
        self.current: int | None = None
        self.host_bytes = 0
        self.peak_host_bytes = 0
        self.unresolved: list[_Job] = []
        self.step_marks: list = []  # GPU: (start, end) events of decode steps; CPU: seconds
        self.t = {"out": [0, 0, 0.0], "in": [0, 0, 0.0]}  # count, bytes, seconds
        self.jobs = 0
        self.exposed = 0.0
        self.job_seconds = 0.0
        self.steps, self.step_seconds = 0, 0.0

    # ---- set-up ---------------------------------------------------------------------------------------
    def plan(self, max_seq: int, names: dict[str, str] | None = None, who: str = "this stage") -> None:
        super().plan(max_seq, names, who)
        self._allocate(max(max_seq, self.options.max_seq or 0))
        if self.pinned:  # pinning is slow (cudaHostAlloc): reserve every host block now, not mid-run
            self.host.reserve(self.slots[0].buffer.cache.nbytes(), self.inflight or 1)

    def _allocate(self, max_seq: int) -> None:
        if self.slots:
            if max_seq > self.length:
                raise ValueError(f"a microbatch writes positions up to {max_seq} but swapping sized its "
                                 f"{self.resident} resident KV buffers for {self.length} at start-up (--max_seq_len, "
                                 f"dejavu-run: the workload's longest request); start the workers with "
                                 f"--max_seq_len {max_seq} or more")
            return
        self.length = buffer_positions(max_seq, self.model.cfg.max_positions, self.round_to)
        for _ in range(self.resident):
            self.slots.append(_Slot(Buffer(self.model.new_cache(self.batch, self.length))))
            self.allocated += 1
            self.device_bytes += self.slots[-1].buffer.cache.nbytes()
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def warm_buffers(self, stages: int) -> int:
        return self.resident

    # ---- leases ---------------------------------------------------------------------------------------
    def acquire(self, ubatch: int, slots: int, max_seq: int) -> Lease:
        self.check_lease(ubatch, slots)
        self._allocate(max(max_seq, self.options.max_seq or 0))
        lease = Lease(self.slots[0].buffer, slots, ubatch, own_cache=True)
        self.leases[ubatch] = lease
        self._turn(ubatch, new=True)
        return lease

    def release(self, ubatch: int) -> None:
        if self.leases.pop(ubatch, None) is None:
            return
        self.tick.pop(ubatch, None)
        slot = self.where.pop(ubatch, None)
        if slot is not None:
            slot.owner, slot.dirty = None, False
        if self.current == ubatch:
            self.current = None
        if self.homes.pop(ubatch, None) is not None:
            # A job still reading or writing the block is ahead of any later use of it: one stream (one
            # thread) runs every swap in order.
            self.host.discard(self._key(ubatch))
            self.host_bytes -= self.slots[0].buffer.cache.nbytes()
        self.home_job.pop(ubatch, None)

    # ---- compute --------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, lease: Lease, x: torch.Tensor, logits_index: torch.Tensor | None) -> torch.Tensor:
        self._turn(lease.ubatch, new=False)
        return super().prefill(lease, x, logits_index)

    @torch.no_grad()
    def decode(self, lease: Lease, x: torch.Tensor, positions: torch.Tensor,
               logits_index: torch.Tensor | None) -> torch.Tensor:
        self._turn(lease.ubatch, new=False)
        timed = lease.ubatch >= 0
        if not timed:
            return super().decode(lease, x, positions, logits_index)
        if self.pinned:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = super().decode(lease, x, positions, logits_index)
            end.record()
            self.step_marks.append((start, end))
        else:
            t0 = time.perf_counter()
            out = super().decode(lease, x, positions, logits_index)
            self.step_marks.append(time.perf_counter() - t0)
        if len(self.unresolved) > 64 or len(self.step_marks) > 256:
            self._resolve(block=False)
        return out

    # ---- the swap schedule ----------------------------------------------------------------------------
    def _coming(self, ubatch: int) -> list[int]:
        """The other microbatches held here, the one expected next first (oldest last turn)."""
        return [u for _, u in sorted((t, u) for u, t in self.tick.items() if u != ubatch)]

    def _turn(self, ubatch: int, *, new: bool) -> None:
        """``ubatch`` runs now: have its cache in a buffer, and start the swap for the turn after this one."""
        lease = self.leases[ubatch]
        slot = self.where.get(ubatch)
        if self.current == ubatch and slot is not None:  # the rest of the same turn (prefill, admit's decode)
            self._await(slot)
            lease.rebind(slot.buffer)
            return
        self.clock += 1
        self.tick[ubatch] = self.clock
        self.current = ubatch
        nxt = self._coming(ubatch)[: self.resident - 1]
        keep = {ubatch, *nxt}
        if slot is None:  # a new microbatch, or a wrong guess: the compute waits for this one
            slot = self._victim(keep)
            self._load(slot, ubatch, fetch=not new)
        slot.dirty = True
        self._await(slot)
        lease.rebind(slot.buffer)
        # Issued before this turn's compute is queued: they wait for the last turn's, and overlap this one.
        for u in nxt:
            if u not in self.where:
                victim = self._victim(keep)
                if victim is None:
                    break
                self._load(victim, u, fetch=True)

    def _victim(self, keep: set[int]) -> _Slot | None:
        """The buffer to give away: an empty one, else the one whose owner is needed last (clean first:
        its host block is up to date, nothing to copy out)."""
        cands = [s for s in self.slots if s.owner not in keep]
        if not cands:
            return None

        def cost(s: _Slot):
            if s.owner is None:
                return (0, 0)
            return (2 if s.dirty else 1, -self.tick.get(s.owner, 0))

        return min(cands, key=cost)

    def _load(self, slot: _Slot, ubatch: int, *, fetch: bool) -> None:
        copies, kinds = [], []
        old, data = slot.owner, slot.buffer.cache.data
        wrote_home = False
        if old is not None:
            self.where.pop(old, None)
            if slot.dirty:
                copies.append((self._home(old), data))
                kinds.append("out")
                wrote_home = True
        if fetch:
            home = self.homes.get(ubatch)
            if home is None:
                raise RuntimeError(f"microbatch {ubatch} is neither in a KV buffer nor in host memory")
            copies.append((data, home))
            kinds.append("in")
        slot.owner, slot.dirty = ubatch, False
        self.where[ubatch] = slot
        if not copies:
            return
        counted = ubatch >= 0 and (old is None or old >= 0)
        job = _Job(kinds, slot.buffer.cache.nbytes(), counted)
        self.copier.submit(job, copies)
        slot.job = job
        if wrote_home:
            self.home_job[old] = job
        if counted:
            self.unresolved.append(job)

    def _await(self, slot: _Slot) -> None:
        if slot.job is not None:
            self.copier.wait(slot.job)
            slot.job = None

    def _key(self, ubatch: int) -> str:
        return f"swap/u{ubatch}"

    def _home(self, ubatch: int) -> torch.Tensor:
        home = self.homes.get(ubatch)
        if home is None:
            data = self.slots[0].buffer.cache.data
            meta = {"dtype": dtype_name(data.dtype), "shape": list(data.shape), "ubatch": ubatch}
            raw = self.host.claim(self._key(ubatch), self.slots[0].buffer.cache.nbytes(), meta, pinned=self.pinned)
            home = self.homes[ubatch] = raw.view(data.dtype).view(data.shape)
            self.host_bytes += raw.numel()
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return home

    # ---- a cache wherever it lives (fault tolerance) --------------------------------------------------
    def cache_of(self, ubatch: int) -> torch.Tensor:
        """``ubatch``'s whole buffer: the device buffer it is in (the compute stream waits for its swap-in),
        or its host block once its swap-out has landed."""
        slot = self.where.get(ubatch)
        if slot is not None:
            self._await(slot)
            return slot.buffer.cache.data
        if ubatch not in self.leases:
            raise KeyError(f"microbatch {ubatch} holds no KV cache here")
        job = self.home_job.get(ubatch)
        if job is not None:
            self.copier.host_wait(job)
        return self.homes[ubatch]

    def make_resident(self, ubatch: int) -> Lease:
        """Bring ``ubatch``'s cache into a device buffer (evicting the microbatch needed last, not the one
        running) and return its lease, rebound to that buffer; marked written (it is copied out when evicted)."""
        lease = self.leases[ubatch]
        slot = self.where.get(ubatch)
        if slot is None:
            slot = self._victim({ubatch} | ({self.current} if self.current is not None else set()))
            self._load(slot, ubatch, fetch=ubatch in self.homes)
        slot.dirty = True
        self._await(slot)
        lease.rebind(slot.buffer)
        return lease

    # ---- results --------------------------------------------------------------------------------------
    def _resolve(self, block: bool) -> None:
        if block and self.pinned:
            torch.cuda.synchronize(self.model.device)
        left = []
        waiting = {id(s.job) for s in self.slots if s.job is not None}  # the compute may still wait for these
        for job in self.unresolved:
            if not block and (id(job) in waiting or not self.copier.done(job)):
                left.append(job)
                continue
            seconds, exposed = self.copier.resolve(job)
            for kind, s in zip(job.kinds, seconds):
                t = self.t[kind]
                t[0] += 1
                t[1] += job.nbytes
                t[2] += s
                if self.stats is not None:
                    self.stats.add("swap", self.host.name, job.nbytes, s)
            self.jobs += 1
            self.job_seconds += sum(seconds)
            self.exposed += exposed
        self.unresolved = left
        marks = []
        for m in self.step_marks:
            if isinstance(m, float):
                self.steps += 1
                self.step_seconds += m
            elif block or m[1].query():
                self.steps += 1
                self.step_seconds += m[0].elapsed_time(m[1]) / 1e3
            else:
                marks.append(m)
        self.step_marks = marks

    def report(self) -> dict:
        self._resolve(block=True)
        (n_out, b_out, s_out), (n_in, b_in, s_in) = self.t["out"], self.t["in"]
        swap_s = s_out + s_in
        step = self.step_seconds / self.steps if self.steps else None
        per_job = self.job_seconds / self.jobs if self.jobs else None
        return {
            "swapping": True, "inflight": self.inflight, "resident_buffers": self.resident, "buffers": self.allocated,
            "positions": self.length, "buffer_bytes": self.slots[0].buffer.cache.nbytes() if self.slots else 0,
            "peak_device_kv_bytes": self.peak_device_bytes, "peak_host_swap_bytes": self.peak_host_bytes,
            "swaps_out": n_out, "swaps_in": n_in, "swap_out_bytes": b_out, "swap_in_bytes": b_in,
            "swap_out_s": s_out, "swap_in_s": s_in,
            "swap_out_GBps": b_out / s_out / GB if s_out > 0 else None,
            "swap_in_GBps": b_in / s_in / GB if s_in > 0 else None,
            "swap_jobs": self.jobs, "swap_s": swap_s, "exposed_s": self.exposed,
            "hidden_share": min(1.0, max(0.0, 1.0 - self.exposed / swap_s)) if swap_s > 0 else None,
            "decode_steps": self.steps, "step_s": step, "swap_s_per_turn": per_job,
            # Above 1, a swap (one microbatch out, the next in) takes longer than a decode step of this
            # stage, and the compute waits for it: swapping then loses (the paper's Appendix G).
            "swap_to_step": per_job / step if per_job is not None and step else None,
        }

    def close(self) -> None:
        self.copier.close()
