"""One worker process: connect to the controller, load this rank's layers, join the data plane, serve.

Order matters for failure reports: the worker says hello to the controller first (so even a bad flag
or a missing checkpoint reaches the controller as an Error naming the cause), then checks its options,
joins the data plane (the rendezvous waits for every rank), loads only its own layers, says Ready and
runs its pipeline loop until a stop comes down the pipeline. Then it sends its timeline and counters.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from ..protocol import Ready, Stats
from .control import ControlClient, report_early_error
from .swap import kv_options
from .topology import BACKENDS, TopologyError, make_topology

DEFAULT_PORT = 5600
STARTUP = ("startup", "joining the data plane", "loading weights", "warming up")  # phases where errors mean bad input
REFUSED = {
}


@dataclass
class WorkerOptions:
    ckpt_path: str
    tensor_para_size: int = 1
    prompt_pipeline_para_size: int = 0
    token_pipeline_para_size: int = 1
    backend: str = "gloo"
    weights_data_type: str = "fp32"
    inference_data_type: str = "auto"  # auto: fp16 on CUDA, fp32 on the CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ubatch_size: int = 8
    num_requests: Optional[int] = None  # the seed's sizing hints; the controller sends the real requests
    input_len: Optional[int] = None
    rank: Optional[int] = None  # default: $RANK, or MPI's rank under mpirun
    world_size: Optional[int] = None  # default: $WORLD_SIZE, or MPI's size
    controller_ip: Optional[str] = None  # default: $DEJAVU_CONTROLLER_IP, else 127.0.0.1
    port: Optional[int] = None  # default: $DEJAVU_CONTROLLER_PORT, else 5600
    kv_window: int = 2
    load_format: str = "auto"  # auto: the checkpoint; dummy: random weights from weights_seed (dejavu.model.random_weights)
    weights_seed: int = 0
    no_cuda_graphs: bool = False  # run decode steps and short prefills eagerly on a GPU (graphs are the default there)
    max_seq_len: Optional[int] = None  # GPU: KV buffers captured at start-up hold this many positions
    connect_timeout_s: float = 120.0
    swapping: bool = False  # microbatch swapping: only resident_buffers KV buffers on the device (worker/swap.py)
    resident_buffers: int = 2
    inflight_ubatches: Optional[int] = None  # microbatches in flight (the leader's limit); None: one per stage
    kv_memory_gb: Optional[float] = None  # device memory for KV buffers; None: 90% of the free (GPU), unchecked (CPU)
    # Fault tolerance (DESIGN.md §5). recoverable: survive a peer's failure (reset, rejoin) instead of
    # exiting; with_ft: also replicate this stage's cache into its ring successor's host memory.
    with_ft: bool = False
    recoverable: bool = False
    restart: bool = False  # this process replaces a failed --rank (the seed's flag)
    failures: Optional[int] = None  # the failure generation to join (the seed's --failures F)
    spare: bool = False  # a hot spare: start, warm up, wait for the controller to hand it a rank
    listen_ip: Optional[str] = None  # the replica store's interface (default: the one facing the controller)
    recovery_timeout_s: float = 300.0  # how long a generation's rendezvous may wait for a replacement


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def resolve_rank(opts: WorkerOptions) -> tuple[int, int | None]:
    if opts.backend == "mpi":
        from mpi4py import MPI  # initializes MPI; under mpirun rank and size come from it

        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        for flag, given, actual in (("--rank", opts.rank, rank), ("--world_size", opts.world_size, size)):
            if given is not None and given != actual:
                raise ValueError(f"{flag}={given} disagrees with MPI ({actual}); under mpirun leave it out")
        return rank, size
    rank = opts.rank if opts.rank is not None else _env_int("RANK")
    if rank is None:
        raise ValueError("no rank: pass --rank (or set RANK), or use --backend mpi under mpirun")
    return rank, opts.world_size if opts.world_size is not None else _env_int("WORLD_SIZE")


def controller_address(opts: WorkerOptions) -> str:
    ip = opts.controller_ip or os.environ.get("DEJAVU_CONTROLLER_IP") or "127.0.0.1"
    port = opts.port if opts.port is not None else (_env_int("DEJAVU_CONTROLLER_PORT") or DEFAULT_PORT)
    return f"tcp://{ip}:{port}"


def pick_device(opts: WorkerOptions, rank: int) -> torch.device:
    want = opts.device
    if want == "auto":
        want = "cuda" if opts.backend == "nccl" or (opts.backend == "mpi" and torch.cuda.is_available()) else "cpu"
    if want == "cpu":
        if opts.backend == "nccl":
            raise ValueError("--backend nccl needs CUDA devices; use --backend gloo (or mpi) on the CPU")
        return torch.device("cpu")
    if not want.startswith("cuda"):
        raise ValueError(f"--device {opts.device!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {want} but no CUDA device is visible; use --device cpu --backend gloo")
    if want != "cuda":
        return torch.device(want)
    local = _env_int("LOCAL_RANK")
    if local is None:
        local = _env_int("OMPI_COMM_WORLD_LOCAL_RANK")
    if local is None:
        local = rank
    dev = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def check_options(opts: WorkerOptions) -> None:
    for key, why in REFUSED.items():
        if getattr(opts, key):
            raise ValueError(why)
    if (opts.with_ft or opts.recoverable or opts.restart) and opts.backend == "mpi":
        raise ValueError("--with_ft / --restart need --backend gloo or nccl: an MPI job cannot survive a dead rank")
    if opts.failures is not None and opts.failures < 1:
        raise ValueError(f"--failures is the failure generation to join (>= 1), got {opts.failures}")
    if opts.failures is not None and not opts.restart:
        raise ValueError("--failures F goes with --restart (a replacement joins failure generation F)")
    if opts.recovery_timeout_s <= 0:
        raise ValueError(f"--recovery_timeout must be > 0 seconds, got {opts.recovery_timeout_s}")
    if opts.backend not in BACKENDS:
        raise ValueError(f"--backend {opts.backend!r} is unknown; expected one of {', '.join(BACKENDS)}")
    if opts.ubatch_size < 1:
        raise ValueError(f"--ubatch_size must be >= 1, got {opts.ubatch_size}")
    if opts.max_seq_len is not None and opts.max_seq_len < 1:
        raise ValueError(f"--max_seq_len must be >= 1 (positions of a KV buffer), got {opts.max_seq_len}")
    from .swap import check_flags

    check_flags(opts)
    from ..model.config import parse_dtype

    for flag in ("weights_data_type", "inference_data_type"):
        value = getattr(opts, flag)
        if value != "auto":
            try:
                parse_dtype(value)
            except ValueError as e:
                raise ValueError(f"--{flag}: {e}") from None


def run_worker(opts: WorkerOptions) -> int:
    """Run one worker to the end; returns the process exit code."""
    from . import faults

    if opts.spare:
        code = wait_as_spare(opts)
        if code is not None:
            return code
    try:
        rank, world = resolve_rank(opts)
    except Exception as e:
        print(f"dejavu worker: error: {e}", file=sys.stderr, flush=True)
        return 2
    log = lambda msg: print(f"[worker {rank}] {msg}", flush=True)  # noqa: E731
    try:
        check_options(opts)
    except ValueError as e:
        print(f"[worker {rank}] error: {e}", file=sys.stderr, flush=True)
        report_early_error(controller_address(opts), rank, world or -1, str(e))
        return 2
    recoverable = opts.recoverable or opts.with_ft or opts.restart
    try:
        ctl = ControlClient(controller_address(opts), rank, world or -1, connect_timeout_s=opts.connect_timeout_s,
                            restart=opts.restart, generation=opts.failures or 0)
    except Exception as e:
        print(f"[worker {rank}] error: {e}", file=sys.stderr, flush=True)
        return 2
    where = "startup"
    try:
        fault = faults.from_env(rank)
        if fault is not None:
            fault.check("startup")
        t_load = time.perf_counter()
        cfg, open_weights = resolve_checkpoint(opts.ckpt_path, opts.load_format, opts.weights_seed)
        topo = make_topology(tp=opts.tensor_para_size, prompt_stages=opts.prompt_pipeline_para_size,
                             token_stages=opts.token_pipeline_para_size, world_size=world, cfg=cfg,
                             backend=opts.backend)
        role = topo.role(rank)
        device = pick_device(opts, rank)
        dtype = opts.inference_data_type
        if dtype == "auto":
            dtype = "fp16" if device.type == "cuda" else "fp32"
        log(f"{role.name} tp {role.tp_rank}/{topo.tp}, layers [{role.layers[0]}, {role.layers[1]}) of {cfg.num_layers}, "
            f"{opts.backend} on {device}, {dtype}")
        where = "joining the data plane"
        if recoverable:  # one data plane per failure generation, built when serving starts (recovery.py)
            from .recoverable_dataplane import Rebindable, unbound

            dp, comm = None, Rebindable(unbound(topo.tp, role.tp_rank))
        else:
            from .dataplane import make_dataplane

            dp = make_dataplane(opts.backend, topo, rank, device)
            comm = dp.tp_comm()
        where = "loading weights"
        from ..model.stage import StageModel

        model = StageModel(cfg, *role.layers, comm=comm, dtype=dtype, device=device)
        model.load_weights(open_weights(device, model.dtype))
        from .pipeline import StageWorker

        # A captured step cannot contain a host-side all-reduce (gloo, MPI): graphs only without TP.
        graphs = device.type == "cuda" and not opts.no_cuda_graphs and topo.tp == 1
        worker = StageWorker(role, topo, model, dp, ctl, ubatch_size=opts.ubatch_size, fault=fault,
                             kv_window=opts.kv_window, cuda_graphs=graphs, recoverable=recoverable,
                             kv=kv_options(opts, role))
        where = "warming up"
        max_seq = opts.max_seq_len or min(cfg.max_positions, 2048)
        if worker.pool is not None:  # the KV caches in flight fit (swapping: the resident ones, and the host's)
            worker.pool.plan(max_seq, who=f"worker {rank} ({role.name})")
        if recoverable and topo.tp > 1:
            # Its TP group exists only once the first generation's rendezvous is done: no forward before.
            log("no warm-up: a recoverable TP stage compiles its kernels on its first work items")
        else:
            worker.warm_up(max_seq)
        store = None
        if opts.with_ft:
            from ..streaming.transports.remote import ReplicaStore

            store = ReplicaStore(listen_address(opts))
        restored = restore_own_cache(worker, ctl, opts, log) if opts.restart and opts.with_ft else (0, 0.0)
        load_s = time.perf_counter() - t_load
        ctl.send(Ready(rank, role.kind, role.stage, role.tp_rank, list(role.layers), str(device), load_s,
                       peak_memory(device), ctl.offset, store.address if store else ""))
        where = "serving"
        try:
            if recoverable:
                from .recovery import Recovery
                from .recoverable_dataplane import RecoverableDataPlane

                rec = Recovery(worker, ctl, lambda g: RecoverableDataPlane(
                    topo, rank, opts.backend, device, generation=g, rendezvous_timeout_s=opts.recovery_timeout_s),
                    comm=comm, store=store, log=log)
                rec.restored_bytes, rec.restore_s = restored
                rec.serve(ctl.reset_generation, rejoin=opts.restart)
                dp = rec.dp
            else:
                worker.run()
        finally:
            where = worker.where
        sent, received, seconds = dict(dp.bytes_sent), dict(dp.bytes_received), dict(dp.seconds)
        # KV hand-over, as the streaming library tallied it: bytes sent (prompt) or received (token).
        counter, key = (sent, "kv_send") if role.pipeline == "prompt" else (received, "kv_recv")
        for tally in worker.kv_stats.as_dict().get("prompt->token", {}).values():
            counter["kv"] = counter.get("kv", 0) + tally["bytes"]
            seconds[key] = seconds.get(key, 0.0) + tally["seconds"]
        if worker.replicator is not None:
            worker.replicator.poll()
        ctl.send(Stats(rank, role.kind, role.stage, role.tp_rank, [e.to_dict() for e in worker.events],
                       peak_memory(device), sent, received, seconds, items=ctl.progress,
                       streams=worker.kv_stats.as_dict(),
                       kv_pool=worker.pool.report() if worker.pool is not None else {}))
        log(f"done: {ctl.progress} work items")
        dp.close()
        return 0
    except BaseException as e:  # noqa: BLE001 - report anything, then exit non-zero
        if where in STARTUP and isinstance(e, (TopologyError, ValueError, FileNotFoundError)):
            # A bad flag, model or checkpoint: the message names it; no traceback needed.
            print(f"[worker {rank}] error: {e}", file=sys.stderr, flush=True)
            ctl.report_error(str(e), where)
            return 2
        tb = traceback.format_exc()
        print(f"[worker {rank}] failed during {where}: {e}\n{tb}", file=sys.stderr, flush=True)
        ctl.report_error(f"{type(e).__name__}: {e}", where, tb)
        return 1
    finally:
        ctl.close()  # waits for the last message (Stats or Error) to reach the controller


def wait_as_spare(opts: WorkerOptions) -> int | None:
    """A hot spare: do the slow one-time work now (imports, the model's files, the device), then wait
    for the controller to hand over a lost rank; ``opts`` becomes that rank's replacement. Returns an
    exit code if the spare is never used."""
    import socket as pysocket

    import zmq

    from ..protocol import Abort, Assign, Hello, Welcome, from_msg, to_msg

    who = f"spare {pysocket.gethostname()}:{os.getpid()}"
    t0 = time.perf_counter()
    from ..model.stage import StageModel  # noqa: F401 — imports (torch, kernels) paid now
    from .pipeline import StageWorker  # noqa: F401

    try:
        resolve_checkpoint(opts.ckpt_path, opts.load_format, opts.weights_seed)  # converts a GGUF once
        pick_device(opts, 0)
    except Exception as e:  # noqa: BLE001
        print(f"[{who}] error: {e}", file=sys.stderr, flush=True)
        return 2
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"spare-{pysocket.gethostname()}-{os.getpid()}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(controller_address(opts))
    try:
        sock.send(to_msg(Hello(-1, opts.world_size or -1, os.getpid(), pysocket.gethostname(), time.perf_counter(),
                               spare=True)))
        if not sock.poll(int(opts.connect_timeout_s * 1000)):
            print(f"[{who}] no answer from the controller at {controller_address(opts)}", file=sys.stderr, flush=True)
            return 2
        msg = from_msg(sock.recv())
        if isinstance(msg, Abort) or not isinstance(msg, Welcome):
            print(f"[{who}] the controller refused this spare: {getattr(msg, 'reason', msg)}", file=sys.stderr, flush=True)
            return 2
        print(f"[{who}] ready in {time.perf_counter() - t0:.1f} s; waiting to take over a failed rank", flush=True)
        while True:
            msg = from_msg(sock.recv())
            if isinstance(msg, Assign):
                opts.rank, opts.restart, opts.failures, opts.spare = msg.rank, True, msg.generation, False
                print(f"[{who}] taking over rank {msg.rank} (failure generation {msg.generation})", flush=True)
                return None
            if isinstance(msg, Abort):
                return 0
    finally:
        sock.close(0)
        ctx.term()


def listen_address(opts: WorkerOptions) -> str:
    """The interface peers reach this worker's replica store on: --listen_ip, else the one this host
    uses towards the controller (never all interfaces)."""
    if opts.listen_ip:
        return opts.listen_ip
    import socket

    host = (opts.controller_ip or os.environ.get("DEJAVU_CONTROLLER_IP") or "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def restore_own_cache(worker, ctl, opts: WorkerOptions, log) -> tuple[int, float]:
    """A replacement's caches, from the replicas its holder keeps (address from the controller's Welcome)."""
    from .pipeline import Ubatch
    from .replication import restore_from_holder

    role, topo = worker.role, worker.topo
    holder = topo.replica_holder(role.rank)
    address = (ctl.welcome.stores or {}).get(holder) if holder is not None and ctl.welcome else None
    if not address or worker.pool is None:
        log("nothing to restore: no replica holder known")
        return 0, 0.0
    t0 = time.perf_counter()
    try:
        held, nbytes = restore_from_holder(worker.pool, worker.model, role.rank, role.tp_rank, topo.tp, holder,
                                           address, worker.kv_stats, timeout_s=min(60.0, opts.recovery_timeout_s))
    except Exception as e:  # noqa: BLE001 — the holder died too: the controller restarts these prompts
        log(f"could not restore from rank {holder}'s replicas ({e}); rejoining with an empty cache")
        return 0, time.perf_counter() - t0
    for u, info in held.items():
        lease = worker.pool.leases[u]
        worker.states[u] = Ubatch(u, [], info["lens"], info["max_seq"], [], cache=lease.cache, lease=lease,
                                  prompt=True, written=info["steps"])
    seconds = time.perf_counter() - t0
    log(f"restored {len(held)} microbatches ({nbytes} bytes) from rank {holder}'s replicas in {seconds:.2f} s")
    return nbytes, seconds


def resolve_checkpoint(name_or_path: str, load_format: str = "auto", weights_seed: int = 0):
    """(ModelConfig, open_weights(device, dtype) -> weight source) of a registered model name, a HF folder
    or a .gguf file. ``load_format="dummy"``: random weights of the model's shapes (no checkpoint read),
    built on the device for this worker's layers and shard only (dejavu.model.random_weights)."""
    from ..model.registry import resolve_model

    if load_format not in ("auto", "dummy"):
        raise ValueError(f"--load_format {load_format!r} is unknown; expected auto (the checkpoint) or dummy "
                         f"(random weights)")
    if load_format == "dummy":
        model = resolve_model(name_or_path, weights=False)
        from ..model.random_weights import RandomWeights

        return model.config, lambda device, dtype: RandomWeights(model.hf_config, weights_seed, device=device,
                                                                 dtype=dtype)
    model = resolve_model(name_or_path)
    if not model.has_weights:
        raise ValueError(f"--ckpt_path {name_or_path!r} is a shape-only model entry with no weights to serve; "
                         f"pass --load_format dummy to serve it with random weights")
    from ..model.weights import HFCheckpoint

    return model.config, lambda device, dtype: HFCheckpoint(model.checkpoint_dir)
