"""Typed shape of a `dejavu-run` config: one dataclass per Hydra group, registered in the ConfigStore.

Hydra merges every group's YAML into these, so a wrong type or an unknown key fails at composition with
the full key in the message. Checks that span several keys (peers versus TP, hosts versus peers, ...)
live in ``validate.py``; they run before any process starts.

Key names follow the seed's vocabulary (num_peers, num_prompt_peers, ubatch_size, input_len, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class BackendName(str, Enum):
    gloo = "gloo"
    nccl = "nccl"
    mpi = "mpi"


class RunnerKind(str, Enum):
    local = "local"
    ssh = "ssh"
    mpirun = "mpirun"


class WorkloadKind(str, Enum):
    fixed = "fixed"  # every request: input_len prompt tokens (or the given prompts), output_len new tokens
    trace = "trace"  # input_sizes_file: JSON list of [prompt_size, num_generated_tokens]
    poisson = "poisson"  # arrivals at rate rps
    timestamps = "timestamps"  # input_timestamps_file: arrival times


class LoggerKind(str, Enum):
    wandb = "wandb"
    none = "none"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class SetupMode(str, Enum):
    install = "install"  # copy this source tree to each host and pip-install it into a venv there
    pythonpath = "pythonpath"  # copy the tree and run it from there with PYTHONPATH (no pip)
    existing = "existing"  # trust cluster.venv: only check that it imports dejavu


@dataclass
class SSHConf:
    user: Optional[str] = None  # None: the current user
    port: int = 22
    key_file: Optional[str] = None  # None: ssh-agent / default keys
    connect_timeout: float = 10.0  # seconds; an unreachable host fails after this
    # Fabric accepts unknown host keys by default; true: only hosts in ~/.ssh/known_hosts are accepted.
    strict_host_keys: bool = False


@dataclass
class ClusterConf:
    name: str = "local"
    # The seed's /tmp/ip_info: one address per line, repeated once per worker on that machine. None on
    # the local cluster: every worker runs on 127.0.0.1.
    hosts_file: Optional[str] = None
    # Where the controller listens and workers connect (the seed's --controller_ip / DEJAVU_CONTROLLER_IP).
    # None: 127.0.0.1 locally; the first host of the host list on a cluster.
    controller_ip: Optional[str] = None
    controller_port: int = 0  # 0: a free port (local runs) or 29500 + a run-specific offset (clusters)
    master_port: int = 0  # torch.distributed rendezvous (MASTER_PORT); 0: chosen like controller_port
    nccl_port: int = 0  # NCCL_COMM_ID port; 0: chosen like controller_port
    ssh: SSHConf = field(default_factory=SSHConf)
    remote_dir: str = "~/dejavu"  # working directory on every host (source, venv, run folders)
    python: str = "python3"  # interpreter on the hosts that creates the venv
    venv: Optional[str] = None  # None: ${remote_dir}/venv
    setup: SetupMode = SetupMode.install
    # The venv sees cluster.python's packages and, on the machine dejavu-run runs on, the launching
    # environment's too (offline hosts, tests); the tree itself always arrives as a wheel built here.
    system_site_packages: bool = False
    pip_args: list[str] = field(default_factory=list)  # e.g. [--no-deps] (offline hosts)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every process


@dataclass
class TopologyConf:
    name: str = "single"
    num_peers: int = 1  # workers in all = (num_prompt_peers + num_token_peers) * tensor_parallelism
    num_prompt_peers: int = 0  # prompt pipeline stages; 0 = baseline (no disaggregation)
    num_token_peers: int = 1  # token pipeline stages (the whole pipeline in the baseline)
    tensor_parallelism: int = 1
    ubatch_size: int = 4  # requests per microbatch
    # Microbatch swapping (dejavu/worker/swap.py): a stage that decodes keeps resident_buffers KV buffers on
    # the device and the caches of the other microbatches in flight in pinned host memory.
    swapping: bool = False
    resident_buffers: int = 2  # >= 2: the microbatch a stage runs and the one it runs next
    inflight_ubatches: Optional[int] = None  # microbatches in flight; None: one per token-pipeline stage
    kv_memory_gb: Optional[float] = None  # device memory (GB) for KV buffers per worker; None: 90% of free (GPU)


@dataclass
class WorkloadConf:
    """Mirrors ``dejavu.workload.WorkloadSpec`` field for field: the controller builds the requests from it."""

    kind: WorkloadKind = WorkloadKind.fixed
    num_requests: Optional[int] = 4  # None: every entry of the trace / timestamps / prompt list
    input_len: int = 16  # prompt tokens of random-id prompts (text prompts have their own length)
    output_len: int = 32  # new tokens per request
    input_sizes_file: Optional[str] = None  # kind=trace: JSON list of [prompt_size, num_generated_tokens]
    poisson: bool = False  # the seed's --poisson on top of fixed/trace sizes
    rps: float = 1.0  # Poisson arrival rate
    arrival_seed: int = 0
    input_timestamps_file: Optional[str] = None  # kind=timestamps: JSON list of arrival seconds
    prompt_seed: int = 0
    prompts: Optional[list[str]] = None  # real text prompts, cycled over num_requests
    prompts_file: Optional[str] = None  # one prompt per line
    chat_template: bool = False  # wrap text prompts in the model's chat template
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class BackendConf:
    name: BackendName = BackendName.gloo
    device: str = "cpu"  # cpu | cuda
    weights_data_type: str = "fp32"
    inference_data_type: str = "fp32"
    cuda_graphs: bool = True  # on a GPU, decode steps and short prefills replay CUDA graphs (false: eager)
    # mpirun MCA settings from the seed's run guide (MPI sometimes blocks large messages over TCP).
    btl_tcp_max_send_size: Optional[int] = None
    btl_sm_max_send_size: Optional[int] = None
    btl_tcp_progress_thread: Optional[int] = None
    btl_tcp_if_exclude: list[str] = field(default_factory=list)
    mca: dict[str, str] = field(default_factory=dict)  # any further --mca key value


class RestartMode(str, Enum):
    auto = "auto"  # the runner starts the lost rank again on its host (or a hot spare takes it)
    manual = "manual"  # someone runs `dejavu worker ... --rank R --restart --failures F`


@dataclass
class FailureSpec:
    """One failure of a scenario: whom (a rank, or every worker on a host), when, how."""

    rank: Optional[int] = None  # a worker rank; negative counts from the last (-1: the last worker)
    host: Optional[str] = None  # or every worker process on this host of the host list (runner=ssh)
    after_tokens: Optional[int] = None  # when: once this many tokens were generated in all,
    after_s: Optional[float] = None  # or this many seconds into serving,
    phase: Optional[str] = None  # or when the target reaches prefill | handover | decode (step >= `step`)
    step: int = 0
    signal: str = "kill"  # kill: SIGKILL (a lost machine); stop: SIGSTOP (a hang, found by the heartbeat deadline)


@dataclass
class FailureConf:
    """Fault tolerance (DESIGN.md §5) and the failures to inject (conf/failure/: none, kill_one, kill_three, hang)."""

    kind: str = "none"  # the preset's name, for the results (none: no failure injected)
    with_ft: bool = False  # replicate every stage's KV cache into its successor's host memory
    failures: list[FailureSpec] = field(default_factory=list)
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0  # a worker silent this long is dead (also a hung one)
    recovery_timeout_s: float = 120.0  # for a lost rank to be back and every rank to rejoin
    max_restarts: int = 3  # failures the run survives in all
    restart: RestartMode = RestartMode.auto
    restart_delay_s: float = 0.0  # the runner waits this long before restarting a lost rank
    spares: int = 0  # hot spares: worker processes started ahead, each takes over one lost rank

    @property
    def recoverable(self) -> bool:
        """The run survives a worker's failure (with replication or, the baseline, from the prompts)."""
        return self.with_ft or bool(self.failures) or self.spares > 0


@dataclass
class LoggerConf:
    kind: LoggerKind = LoggerKind.wandb
    mode: WandbMode = WandbMode.offline
    project: str = "dejavu"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunnerConf:
    kind: RunnerKind = RunnerKind.local
    timeout_s: float = 1800.0  # the whole run; the runner stops everything after this
    grace_s: float = 10.0  # after the controller ends, how long workers may take to exit
    poll_s: float = 0.5
    echo: bool = True  # stream the controller's output to the terminal
    # ssh: where the controller runs (None: the first host of the host list, or "local")
    controller_host: Optional[str] = None
    # mpirun
    mpirun: str = "mpirun"
    bind_to: str = "none"  # --bind-to: python workers gain nothing from core binding, and it fails on small machines
    oversubscribe: bool = False
    extra_args: list[str] = field(default_factory=list)


@dataclass
class BenchConf:
    """A preset that runs a benchmark script's ``main(argv)`` instead of serving (e.g. Figure 7)."""

    script: str = MISSING  # path relative to the repository root, e.g. bench/streaming.py
    args: list[str] = field(default_factory=list)  # "{run_dir}" is replaced by the run folder


@dataclass
class PlannerConf:
    """``topology=auto``: the planner (dejavu/planner/plan.py) splits topology.num_peers machines into prompt
    and token pipelines; its reasoning goes to the run folder (planner.json, planner.txt)."""

    profile: Optional[str] = None  # a `dejavu profile` JSON (path or shipped name); None: profile here (CPU) or give times
    prompt_time_s: Optional[float] = None  # Y and t given directly (both), instead of a profile
    token_time_s: Optional[float] = None
    machine_memory_gb: Optional[float] = None  # per machine; None: this machine's memory / workers (local CPU), else no floors
    stream_overhead: float = 1.0  # m >= 1: prompt time with KV streaming over prompt time without


@dataclass
class Config:
    model: Any = MISSING  # the model registry entry (conf/model/*.yaml)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    topology: TopologyConf = field(default_factory=TopologyConf)
    workload: WorkloadConf = field(default_factory=WorkloadConf)
    backend: BackendConf = field(default_factory=BackendConf)
    failure: FailureConf = field(default_factory=FailureConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    runner: RunnerConf = field(default_factory=RunnerConf)
    bench: Optional[BenchConf] = None
    planner: PlannerConf = field(default_factory=PlannerConf)  # used by topology=auto
    # The program that provides `controller` and `worker`; runners.standin is a model-free stand-in
    # that checks a cluster's wiring (hosts, ranks, environment, logs) in seconds.
    entry: str = "dejavu"  # python -m dejavu {controller,worker} (the `dejavu` console script)
    experiment: Optional[str] = None  # the preset's name, for the results and W&B
    print_answers: bool = True


def register() -> None:
    cs = ConfigStore.instance()
    # The primary config lists this first in its defaults, so every group's YAML merges into a typed node.
    cs.store(name="dejavu_schema", node=Config)


register()
