"""Which processes a run needs, where each runs, and its flags and environment (the seed's run guide).

The plan is the same for every runner: a controller and ``num_peers`` workers, rank i on the i-th line
of the host list. Paths in flags point into ``proc_dir`` — the run folder as the processes see it (the
local run folder, or its copy on a remote host) — under ``inputs/`` for files the run ships with it
(host list, prompts, trace) and ``logs/`` for each process's output.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .schema import BackendName, Config
from .validate import Checked, longest_request


@dataclass
class Proc:
    name: str  # "controller" or "worker<rank>"
    role: str  # "controller" | "worker"
    host: str  # the address it runs on
    args: list[str]  # after `python -m <entry>`
    env: dict[str, str] = field(default_factory=dict)
    rank: int | None = None

    @property
    def log(self) -> str:
        return f"logs/{self.name}.log"


@dataclass
class Ports:
    controller: int
    master: int
    nccl: int


@dataclass
class Plan:
    entry: str  # python -m <entry> {controller,worker} ...
    proc_dir: str  # the run folder as the processes see it
    controller: Proc
    workers: list[Proc]
    ports: Ports
    spares: list[Proc] = field(default_factory=list)  # hot spares (failure.spares)

    @property
    def procs(self) -> list[Proc]:
        return [self.controller, *self.workers, *self.spares]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_ports(cfg: Config) -> Ports:
    """Configured ports, or distinct free ones on this machine (right for local and loopback runs)."""
    taken: set[int] = set()

    def pick(configured: int) -> int:
        if configured:
            return configured
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return p

    c = cfg.cluster
    return Ports(pick(c.controller_port), pick(c.master_port), pick(c.nccl_port))


def write_inputs(checked: Checked, run_dir: Path) -> dict[str, str]:
    """Files the processes read, copied into run_dir/inputs/ (so the run folder is self-contained and
    a remote copy of it carries them). Returns flag name -> path relative to the run folder."""
    cfg = checked.cfg
    inputs = run_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    rel: dict[str, str] = {}
    # The seed's --workers_ip_file: one line per worker, rank order.
    (inputs / "ip_info").write_text("".join(f"{h}\n" for h in checked.hosts))
    rel["workers_ip_file"] = "inputs/ip_info"
    w = cfg.workload
    if w.prompts is not None:
        # One prompt per line (the workload's prompts_file format): a newline inside a prompt becomes a space.
        (inputs / "prompts.txt").write_text("".join(" ".join(p.split("\n")) + "\n" for p in w.prompts))
        rel["prompts_file"] = "inputs/prompts.txt"
    for key, name in (("prompts_file", "prompts.txt"), ("input_sizes_file", "input_sizes.json"),
                      ("input_timestamps_file", "input_timestamps.json")):
        src = getattr(w, key)
        if src:
            shutil.copyfile(Path(os.path.expandvars(src)).expanduser(), inputs / name)
            rel[key] = f"inputs/{name}"
    return rel


def model_arg(cfg: Config) -> str:
    """A registry name travels as its name (each host resolves it from its conf/); a file source as its path."""
    m = cfg.model if isinstance(cfg.model, dict) else {}
    if m.get("source") in ("hf_folder", "gguf_file") and m.get("path"):
        return str(m["path"])
    return str(m.get("name"))


def weights_args(cfg: Config) -> list:
    """model.weights=random: every worker builds random weights for its own layers and shard (and the
    controller records it); nothing for the model's own checkpoint."""
    m = cfg.model if isinstance(cfg.model, dict) else {}
    if m.get("weights") != "random":
        return []
    return ["--load_format", "dummy", "--weights_seed", int(m.get("weights_seed") or 0)]


def kv_args(t) -> list:
    """The worker flags of topology.swapping / resident_buffers / inflight_ubatches / kv_memory_gb."""
    args: list = ["--swapping", "--resident_buffers", t.resident_buffers] if t.swapping else []
    if t.inflight_ubatches is not None:
        args += ["--inflight_ubatches", t.inflight_ubatches]
    if t.kv_memory_gb is not None:
        args += ["--kv_memory_gb", t.kv_memory_gb]
    return args


def build(checked: Checked, inputs: dict[str, str], *, proc_dir: str, ports: Ports,
          controller_host: str, controller_ip: str, extra_env: dict[str, str] | None = None) -> Plan:
    cfg = checked.cfg
    t, w, b = cfg.topology, cfg.workload, cfg.backend
    hosts = checked.hosts
    path = lambda rel: f"{proc_dir}/{rel}"  # noqa: E731
    tp = t.tensor_parallelism
    n = t.num_peers

    model = model_arg(cfg)
    ctl = [
        "--num_peers", n, "--num_prompt_peers", t.num_prompt_peers, "--num_token_peers", t.num_token_peers,
        "--tensor_parallelism", tp, "--controller_ip", controller_ip, "--port", ports.controller,
        "--workers_ip_file", path(inputs["workers_ip_file"]), "--ubatch_size", t.ubatch_size,
        "--input_len", w.input_len, "--output_len", w.output_len, "--model", model, "--run_dir", proc_dir,
        "--workload_kind", w.kind.value,
    ]
    if w.num_requests is not None:
        ctl += ["--num_requests", w.num_requests]
    if "input_sizes_file" in inputs:
        ctl += ["--input_sizes_file", path(inputs["input_sizes_file"])]
    if w.poisson or w.kind.value == "poisson":
        ctl += ["--poisson", "--rps", w.rps, "--arrival_seed", w.arrival_seed]
    if "input_timestamps_file" in inputs:
        ctl += ["--input_timestamps_file", path(inputs["input_timestamps_file"])]
    if "prompts_file" in inputs:
        ctl += ["--prompts_file", path(inputs["prompts_file"])]
        if w.chat_template:
            ctl += ["--chat_template"]
    ctl += ["--prompt_seed", w.prompt_seed, "--temperature", w.temperature, "--top_k", w.top_k,
            "--top_p", w.top_p, "--seed", w.seed, "--min_new_tokens", w.min_new_tokens]
    if w.stop_token_ids:
        ctl += ["--stop_token_ids", *w.stop_token_ids]
    ctl += ft_controller_args(cfg, hosts)
    weights = weights_args(cfg)
    ctl += weights

    # Ranks: prompt pipeline first (stages x TP), then the token pipeline, as the seed orders them.
    first_token_rank = t.num_prompt_peers * tp
    env = {
        "DEJAVU_CONTROLLER_IP": controller_ip,
        "DEJAVU_CONTROLLER_PORT": str(ports.controller),
        # A run that survives failures meets at the controller's store (rank 0 may die); else at rank 0's.
        "MASTER_ADDR": controller_ip if cfg.failure.recoverable else hosts[0],
        "MASTER_PORT": str(ports.master),
        "PROMPT_MASTER_ADDR": hosts[0],
        "TOKEN_MASTER_ADDR": hosts[first_token_rank] if first_token_rank < n else hosts[0],
        "NCCL_COMM_ID": f"{hosts[0]}:{ports.nccl}",
        **(extra_env or {}),
        **{k: str(v) for k, v in cfg.cluster.env.items()},
    }
    kv_flags = t.swapping or t.kv_memory_gb is not None  # the workers check and size their KV memory at start-up
    longest = longest_request(cfg) if b.device != "cpu" or kv_flags else None
    workers = []
    for rank in range(n):
        args = [
            "--tensor_para_size", tp, "--prompt_pipeline_para_size", t.num_prompt_peers,
            "--token_pipeline_para_size", t.num_token_peers, "--ckpt_path", model, "--backend", b.name.value,
            "--weights_data_type", b.weights_data_type, "--inference_data_type", b.inference_data_type,
            "--device", b.device, "--ubatch_size", t.ubatch_size, "--input_len", w.input_len,
        ]
        if w.num_requests is not None:
            args += ["--num_requests", w.num_requests]
        args += weights
        if not b.cuda_graphs:
            args += ["--no_cuda_graphs"]
        if (b.device != "cpu" or kv_flags) and longest:
            args += ["--max_seq_len", longest]  # GPU workers size the KV buffers they capture at start-up
        args += kv_args(t)
        if cfg.failure.recoverable:
            args += ["--with_ft" if cfg.failure.with_ft else "--recoverable", "--listen_ip", hosts[rank],
                     "--recovery_timeout", cfg.failure.recovery_timeout_s]
        if b.name != BackendName.mpi:  # under mpirun, rank and size come from MPI
            args += ["--rank", rank, "--world_size", n]
        # LOCAL_RANK: its index among the workers of its host, so each picks its own GPU there.
        local = {"LOCAL_RANK": str(hosts[:rank].count(hosts[rank])), "LOCAL_WORLD_SIZE": str(hosts.count(hosts[rank]))}
        workers.append(Proc(f"worker{rank}", "worker", hosts[rank], [str(a) for a in args], {**env, **local}, rank))
    controller = Proc("controller", "controller", controller_host, [str(a) for a in ctl], dict(env))
    # Hot spares wait on the controller's host (the one host a failure scenario may not take down).
    spares = [Proc(f"spare{i}", "worker", controller_host, _spare_args(workers[0].args, controller_host), dict(env))
              for i in range(cfg.failure.spares)]
    return Plan(cfg.entry, proc_dir, controller, workers, ports, spares)


def _spare_args(worker_args: list[str], host: str) -> list[str]:
    """A worker's flags without its rank (a spare learns it when it takes over), plus --spare."""
    out, skip = [], False
    for a in worker_args:
        if skip:
            skip = False
            continue
        if a in ("--rank", "--listen_ip"):
            skip = True
            continue
        out.append(a)
    return [*out, "--listen_ip", host, "--spare"]


def ft_controller_args(cfg: Config, hosts: list[str]) -> list:
    """The controller's fault-tolerance flags (failure.*), with the scenario's ranks resolved."""
    f = cfg.failure
    args: list = ["--heartbeat_interval", f.heartbeat_interval_s, "--heartbeat_timeout", f.heartbeat_timeout_s]
    if not f.recoverable:
        return args
    import json

    from .failures import scenario

    args += ["--with_ft"] if f.with_ft else ["--recoverable"]
    args += ["--max_restarts", f.max_restarts, "--recovery_timeout", f.recovery_timeout_s,
             "--restart_mode", f.restart.value]
    if f.failures:
        args += ["--failure_scenario", json.dumps(scenario(cfg, hosts))]
    return args


def cpu_threads_env(hosts: list[str], cfg: Config) -> dict[str, str]:
    """CPU workers sharing a machine split its cores; torch would otherwise start one thread per core in each."""
    if cfg.backend.device != "cpu" or "OMP_NUM_THREADS" in cfg.cluster.env or "OMP_NUM_THREADS" in os.environ:
        return {}
    per_host = max(hosts.count(h) for h in set(hosts))
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // per_host))}
