"""The profiler: prompt and token times of a model shape, measured with our own engine on this device.

Each stage is a real ``StageModel`` of the shape (random weights: timing does not depend on the values)
run through ``CachePool`` exactly as a serving worker runs it: on a GPU the decode step replays its CUDA
graph and short prefills replay theirs. To price any layer split without building it, four stages are
timed at every grid point and the time is decomposed (``dejavu.planner.profile``):

    mid(1)  = layers [1, 2)           fixed + 1 layer
    mid(k)  = layers [1, 1+k)         fixed + k layers        -> per_layer, fixed
    first   = layers [0, 1)           mid(1) + embeddings     -> embed
    last    = layers [L-1, L)         mid(1) + LM head        -> head

and, when the whole model fits the device, the whole model once more to check the sum. A model too large
for the device (OPT-66B, BLOOM-176B on one GPU) is never built whole: its times are extrapolated from
these few layers of the same shape, and the profile says so (``extrapolated``).

``measure_comm`` times the data plane between two worker processes on this machine (gloo): one-way
latency of an activation send and of the sampler's feedback, and the KV hand-over rate.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..model.config import ModelConfig, parse_dtype
from .profile import CommTiming, Profile, StageTiming
from .sizes import ModelSizes, model_sizes


@dataclass
class GridSpec:
    ubatch_sizes: Sequence[int]
    input_lens: Sequence[int]
    context_lens: Sequence[int]
    reps: int = 5
    warmup: int = 2
    mid_layers: int = 4  # k of mid(k)


def random_stage(cfg: ModelConfig, first: int, last: int, dtype, device):
    """A stage of the shape with random weights (matrices N(0, 0.02), norm scales 1, biases 0)."""
    from ..model.stage import StageModel

    stage = StageModel(cfg, first, last, dtype=dtype, device=device)
    g = torch.Generator(device=stage.device).manual_seed(first * 1000 + last)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return stage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _StageBench:
    """One stage and one KV buffer per microbatch size; times its prefill and decode like a worker."""

    def __init__(self, cfg: ModelConfig, first: int, last: int, dtype, device, cuda_graphs: bool, max_seq: int) -> None:
        from ..worker.cache_pool import CachePool

        self.stage = random_stage(cfg, first, last, dtype, device)
        self.cfg, self.device, self.cuda_graphs, self.max_seq = cfg, torch.device(device), cuda_graphs, max_seq
        self.pools: dict[int, tuple] = {}
        self._pool_cls = CachePool

    def _lease(self, b: int):
        if b not in self.pools:
            for pool, _ in self.pools.values():  # one buffer at a time: free the last one's memory first
                pool.release(0)
            self.pools.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            pool = self._pool_cls(self.stage, b, cuda_graphs=self.cuda_graphs)
            self.pools[b] = (pool, pool.acquire(0, b, self.max_seq))
        return self.pools[b]

    def _input(self, b: int, t: int) -> torch.Tensor:
        if self.stage.is_first:
            return torch.randint(3, self.cfg.vocab_size, (b, t), device=self.device)
        return torch.randn(b, t, self.cfg.hidden_size, device=self.device).to(self.stage.dtype) * 0.5

    def prefill(self, b: int, length: int, reps: int, warmup: int) -> float:
        pool, lease = self._lease(b)
        x = self._input(b, length)
        index = torch.full((b,), length - 1, dtype=torch.long) if self.stage.is_last else None
        return _median_time(lambda: pool.prefill(lease, x, index), self.device, reps, warmup)

    def decode(self, b: int, ctx: int, reps: int, warmup: int) -> float:
        pool, lease = self._lease(b)
        x = self._input(b, 1)
        positions = torch.full((b, 1), ctx, dtype=torch.long)
        index = torch.zeros(b, dtype=torch.long) if self.stage.is_last else None
        return _median_time(lambda: pool.decode(lease, x, positions, index), self.device, reps, warmup)

    def close(self) -> None:
        self.pools.clear()
        del self.stage
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _fits(sizes: ModelSizes, device: torch.device, max_b: int, max_seq: int, fraction: float = 0.6) -> bool:
    need = sizes.weight_bytes + sizes.kv_bytes(max_b * max_seq)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < fraction * free
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return False
    return need < fraction * avail


def measure_profile(cfg: ModelConfig, grid: GridSpec, *, model: str, device: str = "cpu", dtype: str = "fp32",
                    cuda_graphs: bool = True, threads: int | None = None, full_model: bool | None = None,
                    budget_s: float | None = None, log: Callable[[str], None] = print) -> Profile:
    """Time the stages of ``cfg`` over ``grid`` and return the decomposed profile (see the module doc)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if threads:
        torch.set_num_threads(threads)
    graphs = cuda_graphs and dev.type == "cuda"
    sizes = model_sizes(cfg, dtype)
    L = cfg.num_layers
    max_seq = min(max([*grid.input_lens, *grid.context_lens]) + 2, cfg.max_positions)
    for c in grid.context_lens:
        if c >= cfg.max_positions:
            raise ValueError(f"context length {c} is not below the model's {cfg.max_positions} positions")
    whole = _fits(sizes, dev, max(grid.ubatch_sizes), max_seq) if full_model is None else full_model
    k = max(2, min(grid.mid_layers, L - 2)) if L >= 4 else None
    stages = {"first": (0, 1), "last": (L - 1, L)}
    if k is not None:
        stages.update({"mid1": (1, 2), "midk": (1, 1 + k)})
    if whole or k is None:
        stages["full"] = (0, L)
    measured: dict[str, dict[tuple[str, int, int], float]] = {}
    start = time.perf_counter()
    for name, (a, b_) in list(stages.items()):
        if name == "full" and k is not None and budget_s is not None and time.perf_counter() - start > budget_s / 2:
            log(f"  stage full skipped: {time.perf_counter() - start:.0f} s of the {budget_s:.0f} s budget spent")
            del stages[name]
            continue
        t0 = time.perf_counter()
        bench = _StageBench(cfg, a, b_, parse_dtype(dtype), dev, graphs, max_seq)
        times: dict[tuple[str, int, int], float] = {}
        # First touches (buffers, kernel compilation, graph captures) out of the first point's numbers.
        bench.prefill(grid.ubatch_sizes[0], grid.input_lens[0], 1, grid.warmup + 2)
        bench.decode(grid.ubatch_sizes[0], grid.context_lens[0], 1, grid.warmup + 2)
        for b in grid.ubatch_sizes:
            for p in grid.input_lens:
                times[("prompt", b, p)] = bench.prefill(b, p, grid.reps, grid.warmup)
            for c in grid.context_lens:
                times[("token", b, c)] = bench.decode(b, c, grid.reps, grid.warmup)
        bench.close()
        measured[name] = times
        log(f"  stage {name:<5} layers [{a}, {b_}): {len(times)} points in {time.perf_counter() - t0:.1f} s")

    def point(kind: str, b: int, length: int) -> StageTiming:
        key = (kind, b, length)
        full = measured["full"][key] if "full" in measured else None
        if k is not None:
            m1, mk = measured["mid1"][key], measured["midk"][key]
            per_layer = max((mk - m1) / (k - 1), 0.0)
            fixed = m1 - per_layer
            embed, head = measured["first"][key] - m1, measured["last"][key] - m1
        else:  # too few layers for a middle stage: full = f + L l + e + h, first = f + l + e, last = f + l + h
            first, last = measured["first"][key], measured["last"][key]
            fixed = max(first + last - full, 0.0) if L == 2 else 0.0
            per_layer = max((full - fixed) / L, 0.0)
            embed = head = 0.0
        return StageTiming(b, length, per_layer_s=per_layer, fixed_s=fixed, embed_s=embed, head_s=head,
                           full_model_s=full)

    prompt = [point("prompt", b, p) for b in grid.ubatch_sizes for p in grid.input_lens]
    token = [point("token", b, c) for b in grid.ubatch_sizes for c in grid.context_lens]
    extrapolated = "full" not in measured
    note = (f"extrapolated: the whole model ({sizes.weight_bytes / 1e9:.3g} GB of {dtype} weights) was not built "
            f"on this device; its times are priced from stages of 1 and {k} layer(s) of the same shape"
            if extrapolated else "the whole model was also run once per grid point (full_model_s) as a check")
    return Profile(model=model, family=cfg.family, num_layers=L, hidden_size=cfg.hidden_size, device=dev.type,
                   device_name=device_name(dev), dtype=dtype, sizes=sizes, prompt=prompt, token=token,
                   threads=torch.get_num_threads() if dev.type == "cpu" else None, cuda_graphs=graphs,
                   measured_layers=sorted({b_ - a for a, b_ in stages.values()}), extrapolated=extrapolated,
                   note=note, versions=versions(), created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            out["dejavu"] = sha
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ---- the data plane between two workers -------------------------------------------------------------

def measure_comm(hidden_size: int, *, dtype: str = "fp32", ubatch_size: int = 4, input_len: int = 64,
                 reps: int = 30, backend: str = "gloo") -> CommTiming:
    """One-way times between two worker processes on this machine through ``dejavu.worker.dataplane``
    (both processes read the same monotonic clock, so a one-way time is a difference of two readings)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_comm_worker, args=(r, port, hidden_size, dtype, ubatch_size, input_len, reps,
                                                   backend, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = {}
    while not queue.empty():
        results.update(queue.get())
    for p in procs:
        if p.is_alive():
            p.kill()
    if "error" in results:
        raise RuntimeError(f"measuring the data plane failed: {results['error']}")
    hop_fixed, hop_rate = _fit(results["hop_small"], results["hop_large"])
    kv_fixed, kv_rate = _fit(results["kv_small"], results["kv_large"])
    return CommTiming(backend=backend, hop_s=hop_fixed, hop_bytes_per_s=hop_rate, feedback_s=results["feedback"],
                      kv_fixed_s=kv_fixed, kv_bytes_per_s=kv_rate)


def _fit(small: tuple[float, int], large: tuple[float, int]) -> tuple[float, float | None]:
    """(fixed seconds, bytes per second) of a line through two (seconds, bytes) points; no rate if flat."""
    per_byte = (large[0] - small[0]) / (large[1] - small[1])
    if per_byte <= 0:
        return min(small[0], large[0]), None
    return max(small[0] - small[1] * per_byte, 0.0), 1.0 / per_byte


def _comm_worker(rank: int, port: int, hidden: int, dtype: str, b: int, plen: int, reps: int, backend: str,
                 queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from ..worker.dataplane import ACT, FEEDBACK, TorchDataPlane
        from ..worker.topology import Topology

        dp = TorchDataPlane(Topology(tp=1, prompt_stages=0, token_stages=2, num_layers=2), rank, backend,
                            torch.device("cpu"))
        dist = dp.dist
        dt = parse_dtype(dtype)
        out: dict = {}
        for name, t in (("hop_small", 1), ("hop_large", plen)):
            x = torch.randn(b, t, hidden).to(dt)
            hops, feeds = [], []
            for _ in range(reps):
                if rank == 0:
                    dp.send(1, {"t": time.perf_counter()}, [x], ACT)
                    meta = dp.side_recv(1, FEEDBACK)
                    feeds.append(time.perf_counter() - meta["t1"])
                    hops.append(meta["hop"])
                else:
                    meta, _ = dp.recv(0, ACT)
                    hop = time.perf_counter() - meta["t"]
                    dp.side_send(0, {"t1": time.perf_counter(), "hop": hop}, FEEDBACK)
            if rank == 0:
                out[name] = (statistics.median(hops), x.numel() * x.element_size())
                out.setdefault("feedback_all", []).extend(feeds)
        for name, nbytes in (("kv_small", 1 << 16), ("kv_large", 1 << 24)):
            buf = torch.empty(nbytes, dtype=torch.uint8)
            stamp = torch.zeros(1, dtype=torch.float64)
            times = []
            for _ in range(max(reps // 3, 5)):
                if rank == 0:
                    stamp[0] = time.perf_counter()
                    dist.send(stamp, 1)
                    dist.send(buf, 1)
                    dist.recv(stamp, 1)
                    times.append(float(stamp[0]))
                else:
                    dist.recv(stamp, 0)
                    dist.recv(buf, 0)
                    stamp[0] = time.perf_counter() - float(stamp[0])
                    dist.send(stamp, 0)
            if rank == 0:
                out[name] = (statistics.median(times), nbytes)
        if rank == 0:
            out["feedback"] = statistics.median(out.pop("feedback_all"))
            queue.put(out)
        dp.close()
    except Exception as e:  # noqa: BLE001 — reported to the parent with the cause
        queue.put({"error": f"rank {rank}: {type(e).__name__}: {e}"})
