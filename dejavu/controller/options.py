"""The controller's settings, and every check that can fail before a single process starts.

Peer counts follow the seed's flags. ``--num_prompt_peers`` / ``--num_token_peers`` are read in whichever
of the two meanings makes ``--num_peers`` add up: pipeline stages (``num_peers = (prompt + token) x TP``,
the project's runner) or workers (``num_peers = prompt + token``, each a multiple of TP, as the seed's
run guide passes ``M//Y`` to its workers). With TP 1 the two agree; with TP > 1 at most one can hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..workload import WorkloadSpec
from ..worker.topology import Topology, TopologyError, check_model_fits

DEFAULT_PORT = 5600


class OptionsError(ValueError):
    """A controller flag or input file is wrong; the message names it and says what would be right."""


@dataclass
class ControllerOptions:
    num_peers: int
    num_prompt_peers: int = 0
    num_token_peers: Optional[int] = None  # default: num_peers - num_prompt_peers (in the matching unit)
    tensor_parallelism: int = 1
    controller_ip: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers_ip_file: Optional[str] = None
    ubatch_size: int = 8
    model: Optional[str] = None  # checks TP/stages against the model, draws prompt ids, tokenizes text
    run_dir: Optional[str] = None
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    load_format: str = "auto"  # the workers' --load_format: "dummy" = random weights, recorded in summary.json
    weights_seed: int = 0
    with_ft: bool = False  # workers replicate their caches (the seed's flag); implies recoverable
    # Survive failures: a lost worker starts a failure generation (reset, restart, resume) instead of
    # ending the run. Without replication, unfinished requests start again from their prompts.
    recoverable: bool = False
    max_restarts: int = 3  # failures the run survives, in all
    recovery_timeout_s: float = 120.0  # for a lost rank to come back and every rank to rejoin
    restart: str = "auto"  # auto: the runner restarts a lost rank (or a hot spare takes it); manual: by hand
    injections: list = field(default_factory=list)  # the failure scenario (recovery.Injection dicts)
    # Failure detection: heartbeats every interval; a worker silent past the timeout is dead.
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    startup_timeout_s: float = 120.0  # for every worker to connect
    ready_timeout_s: float = 1800.0  # for every worker to load its layers and join the data plane
    progress_timeout_s: float = 600.0  # work outstanding but no token for this long: the run is stuck
    stats_timeout_s: float = 30.0  # after the last token, for every worker's timeline

    def to_config(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def topology_of(opts: ControllerOptions, num_layers: int | None = None) -> Topology:
    """Pipeline stage counts from the peer flags (see the module docstring for the two readings)."""
    n, m, tp = opts.num_peers, opts.num_prompt_peers, opts.tensor_parallelism
    if tp < 1:
        raise OptionsError(f"--tensor_parallelism must be >= 1, got {tp}")
    if n < 1:
        raise OptionsError(f"--num_peers must be >= 1, got {n}")
    if m < 0:
        raise OptionsError(f"--num_prompt_peers must be >= 0, got {m}")
    k = opts.num_token_peers
    if k is None:  # unstated: the stages the other peers make up
        k = n // tp - m
    if k < 1:
        raise OptionsError(f"--num_token_peers must be >= 1 (the token pipeline decodes), got {k}")
    if n == (m + k) * tp:
        prompt_stages, token_stages = m, k
    elif tp > 1 and n == m + k and m % tp == 0 and k % tp == 0:
        prompt_stages, token_stages = m // tp, k // tp
    else:
        raise OptionsError(
            f"--num_peers={n} does not match (--num_prompt_peers={m} + --num_token_peers={k}) x "
            f"--tensor_parallelism={tp} = {(m + k) * tp} workers; give num_peers = (prompt stages + token "
            f"stages) x tensor parallelism (or, as in the seed, num_peers = prompt + token workers, each a "
            f"multiple of the tensor parallelism)")
    return Topology(tp, prompt_stages, token_stages, num_layers or max(prompt_stages, token_stages, 1))


def read_hosts_file(path: str, num_peers: int) -> list[str]:
    try:
        hosts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise OptionsError(f"--workers_ip_file: cannot read '{path}': {e.strerror or e}") from None
    if len(hosts) < num_peers:
        raise OptionsError(f"--workers_ip_file '{path}' lists {len(hosts)} hosts but --num_peers={num_peers}; "
                           f"write one address per worker, repeated for each worker on the same machine")
    return hosts


def check_options(opts: ControllerOptions, cfg=None) -> Topology:
    """Every check that needs no running process; returns the topology. ``cfg``: the model's ModelConfig."""
    if opts.with_ft:
        opts.recoverable = True
    if opts.restart not in ("auto", "manual"):
        raise OptionsError(f"--restart_mode must be auto or manual, got {opts.restart!r}")
    if opts.max_restarts < 0:
        raise OptionsError(f"--max_restarts must be >= 0, got {opts.max_restarts}")
    if opts.recovery_timeout_s <= 0:
        raise OptionsError(f"--recovery_timeout must be > 0 seconds, got {opts.recovery_timeout_s}")
    if opts.injections and not opts.recoverable:
        opts.recoverable = True
    if opts.ubatch_size < 1:
        raise OptionsError(f"--ubatch_size must be >= 1, got {opts.ubatch_size}")
    if not 0 < opts.port < 65536:
        raise OptionsError(f"--port must be a TCP port (1-65535), got {opts.port}")
    topo = topology_of(opts, cfg.num_layers if cfg is not None else None)
    if cfg is not None:
        try:
            check_model_fits(cfg, tp=topo.tp, stages={"--num_prompt_peers": topo.prompt_stages,
                                                      "--num_token_peers": topo.token_stages},
                             tp_flag="--tensor_parallelism")
        except TopologyError as e:
            raise OptionsError(str(e)) from None
    if opts.workers_ip_file:
        read_hosts_file(opts.workers_ip_file, opts.num_peers)
    for i, inj in enumerate(opts.injections):
        bad = [r for r in inj.get("ranks", []) if not 0 <= r < topo.world_size]
        if bad:
            raise OptionsError(f"--failure_scenario failure {i}: rank(s) {bad} outside the world of "
                               f"{topo.world_size} workers")
    if opts.with_ft and any(topo.replica_holder(r) is None for r in topo.decoding_ranks()):
        raise OptionsError("--with_ft needs a replica holder for every decoding stage: at least 2 token stages, "
                           "or a disaggregated run (a single stage has no successor to hold its cache)")
    for name in ("heartbeat_interval_s", "heartbeat_timeout_s", "startup_timeout_s", "ready_timeout_s",
                 "progress_timeout_s", "stats_timeout_s"):
        if getattr(opts, name) <= 0:
            raise OptionsError(f"--{name.removesuffix('_s')} must be > 0 seconds")
    if opts.heartbeat_timeout_s <= 2 * opts.heartbeat_interval_s:
        raise OptionsError(f"--heartbeat_timeout ({opts.heartbeat_timeout_s}) must exceed twice "
                           f"--heartbeat_interval ({opts.heartbeat_interval_s})")
    return topo
