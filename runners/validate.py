"""Checks across keys that types alone cannot express; they all run before any process starts.

Hydra and the structured config already reject unknown keys, unknown group options and wrong types.
Here: peers versus stages and TP, the model's heads and layers, the host list, the backend against the
runner and the hardware, and the workload (through ``dejavu.workload``, the controller's own rules).
Every problem is collected, so one message lists them all, each naming its keys and what would be right.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from .rules import MODEL_FREE_ENTRIES, noop_keys, overrides_keys, unknown_keys, weights_workload
from .schema import BackendName, Config, RunnerKind


class ConfigError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration, nothing was started:\n{lines}")


@dataclass
class Checked:
    """What the checks learned and the launch needs: the typed config, worker hosts by rank, the model."""

    cfg: Config
    hosts: list[str]  # hosts[rank] = the address worker `rank` runs on
    model_config: Any = None  # dejavu.model.config.ModelConfig, when the model resolved
    notes: list[str] = field(default_factory=list)
    plan: Any = None  # topology=auto: the planner's record (runners/autoplan.py), written to the run folder


def to_config(cfg: DictConfig | Config) -> Config:
    return cfg if isinstance(cfg, Config) else OmegaConf.to_object(cfg)  # type: ignore[return-value]


def read_hosts(path: str | os.PathLike, key: str = "cluster.hosts_file") -> list[str]:
    """The seed's /tmp/ip_info: one address per line (repeated once per worker there); # comments, blanks skipped."""
    p = Path(os.path.expandvars(str(path))).expanduser()
    if not p.is_file():
        raise ConfigError([f"{key}: host file '{p}' does not exist; write one address per line, an address "
                           f"repeated once per worker on that machine (the seed's /tmp/ip_info)"])
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ConfigError([f"{key}: cannot read host file '{p}': {e.strerror or e}"]) from None
    hosts = [ln.split("#", 1)[0].strip() for ln in lines]
    hosts = [h for h in hosts if h]
    bad = [h for h in hosts if any(c.isspace() for c in h)]
    if bad:
        raise ConfigError([f"{key}: host file '{p}' has lines with more than one word ({bad[0]!r}); "
                           f"write exactly one address per line"])
    return hosts


def check(raw: DictConfig | Config, *, resolve_model: bool = True, overrides: Sequence[str] = ()) -> Checked:
    """``overrides``: the command line's ``key=value`` overrides (Hydra's task overrides); a key set there
    that has no effect under the chosen options is refused, naming the option that would use it."""
    cfg = to_config(raw)
    problems: list[str] = []
    notes: list[str] = []
    problems.extend(unknown_keys(cfg))
    cfg = weights_workload(cfg, overrides_keys(overrides), problems, notes)
    problems.extend(noop_keys(cfg, overrides))
    auto_plan = None
    if cfg.topology.name == "auto" and cfg.bench is None:  # the planner picks the split (runners/autoplan.py)
        from .autoplan import plan_auto

        cfg, auto_plan = plan_auto(cfg, problems)
    t, b, r, c = cfg.topology, cfg.backend, cfg.runner, cfg.cluster

    # ---- topology ------------------------------------------------------------------------------------
    for key, v, lo in (("num_peers", t.num_peers, 1), ("num_prompt_peers", t.num_prompt_peers, 0),
                       ("num_token_peers", t.num_token_peers, 1), ("tensor_parallelism", t.tensor_parallelism, 1),
                       ("ubatch_size", t.ubatch_size, 1)):
        if v < lo:
            problems.append(f"topology.{key}={v} must be >= {lo}")
    stages = t.num_prompt_peers + t.num_token_peers
    if t.num_peers != stages * t.tensor_parallelism:
        problems.append(
            f"topology.num_peers={t.num_peers} but (topology.num_prompt_peers={t.num_prompt_peers} + "
            f"topology.num_token_peers={t.num_token_peers}) x topology.tensor_parallelism={t.tensor_parallelism}"
            f" = {stages * t.tensor_parallelism}; every stage needs tensor_parallelism workers, so set "
            f"topology.num_peers={stages * t.tensor_parallelism} or change the stage counts")

    # ---- model ---------------------------------------------------------------------------------------
    model_config = None
    if resolve_model and cfg.bench is None:
        model_config = _model_config(cfg, problems)
    if model_config is not None:
        try:
            model_config.check_tensor_parallel(t.tensor_parallelism)
        except ValueError as e:
            problems.append(f"topology.tensor_parallelism={t.tensor_parallelism}: {e} (model "
                            f"{_model_name(cfg)}: num_heads={model_config.num_heads}, "
                            f"num_kv_heads={model_config.num_kv_heads})")
        for key, n in (("num_prompt_peers", t.num_prompt_peers), ("num_token_peers", t.num_token_peers)):
            if n > model_config.num_layers:
                problems.append(f"topology.{key}={n} pipeline stages but model {_model_name(cfg)} has only "
                                f"{model_config.num_layers} layers; use at most {model_config.num_layers}")

    # ---- hosts ---------------------------------------------------------------------------------------
    hosts = ["127.0.0.1"] * max(t.num_peers, 0)
    if c.hosts_file:
        try:
            listed = read_hosts(c.hosts_file)
        except ConfigError as e:
            problems.extend(e.problems)
        else:
            if len(listed) < t.num_peers:
                problems.append(f"cluster.hosts_file '{c.hosts_file}' lists {len(listed)} worker address(es) but "
                                f"topology.num_peers={t.num_peers}; list one line per worker (repeat an "
                                f"address once per worker on that machine)")
            else:
                hosts = listed[:t.num_peers]
    elif r.kind == RunnerKind.ssh:
        problems.append("runner=ssh needs cluster.hosts_file (one address per line, the seed's /tmp/ip_info); "
                        "e.g. cluster=ip_info or cluster.hosts_file=/path/to/hosts")
    remote = any(not _is_loopback(h) for h in hosts)
    if remote and c.controller_ip is not None and _is_loopback(c.controller_ip):
        problems.append(f"cluster.controller_ip={c.controller_ip} is a loopback address but workers run on "
                        f"other machines ({', '.join(sorted(set(h for h in hosts if not _is_loopback(h))))}); "
                        f"set it to an address they can reach, or null for the first host")
    if remote and r.kind == RunnerKind.local:
        problems.append(f"runner=local starts processes on this machine only, but cluster.hosts_file lists "
                        f"other hosts; use runner=ssh or runner=mpirun")

    # ---- backend -------------------------------------------------------------------------------------
    if b.device not in ("cpu", "cuda"):
        problems.append(f"backend.device={b.device!r} must be cpu or cuda")
    if b.name == BackendName.nccl and b.device != "cuda":
        problems.append(f"backend=nccl needs GPUs (backend.device=cuda, got {b.device}); on CPU use backend=gloo")
    if b.name == BackendName.mpi and r.kind != RunnerKind.mpirun:
        problems.append(f"backend=mpi takes its ranks from MPI, so it needs runner=mpirun (got runner={r.kind.value})")
    if r.kind == RunnerKind.mpirun and b.name != BackendName.mpi:
        problems.append(f"runner=mpirun launches MPI ranks; use backend=mpi with it (got backend={b.name.value}), "
                        f"or runner=local/ssh for {b.name.value}")
    if b.device == "cuda" and r.kind != RunnerKind.ssh:  # remote GPUs are checked on each host
        gpus = _local_gpus()
        per_host = max((hosts.count(h) for h in set(hosts)), default=0)
        if gpus == 0:
            problems.append(f"backend.device=cuda (backend={b.name.value}) but this machine has no visible GPU; "
                            f"use backend.device=cpu")
        elif gpus < per_host and b.name == BackendName.nccl:
            # NCCL refuses two ranks on one GPU; gloo and MPI stage through host memory, so they can share.
            problems.append(f"backend=nccl needs {per_host} GPU(s) on this machine (one per worker) but {gpus} "
                            f"are visible; use backend=gloo to let workers share GPUs, or fewer workers")
        elif gpus < per_host:
            notes.append(f"{per_host} workers share {gpus} GPU(s) on this machine (worker i takes GPU i mod {gpus})")
    from dejavu.model.config import DTYPES

    for key in ("weights_data_type", "inference_data_type"):
        if getattr(b, key) not in DTYPES:
            problems.append(f"backend.{key}={getattr(b, key)!r} is not a known data type; one of {sorted(DTYPES)}")

    # ---- workload ------------------------------------------------------------------------------------
    if cfg.bench is None:
        _check_workload(cfg, model_config, problems)
    else:
        script = _repo_root() / cfg.bench.script
        if not script.is_file():
            problems.append(f"bench.script={cfg.bench.script}: no such file under {_repo_root()}")

    # ---- KV memory: topology.swapping / resident_buffers / inflight_ubatches / kv_memory_gb --------------
    from .kv_memory import kv_memory_problems

    problems.extend(kv_memory_problems(cfg, model_config, hosts))

    # ---- runner --------------------------------------------------------------------------------------
    for key in ("timeout_s", "grace_s", "poll_s"):
        if getattr(r, key) <= 0:
            problems.append(f"runner.{key}={getattr(r, key)} must be > 0")
    from .failures import failure_problems

    problems.extend(failure_problems(cfg, hosts))

    if problems:
        raise ConfigError(problems)
    return Checked(cfg=cfg, hosts=hosts, model_config=model_config, notes=notes, plan=auto_plan)


def _model_name(cfg: Config) -> str:
    m = cfg.model if isinstance(cfg.model, dict) else {}
    return str(m.get("name") or m.get("path") or "?")


def _model_config(cfg: Config, problems: list[str]):
    from dejavu.model.registry import resolve_entry

    if not isinstance(cfg.model, dict) or not cfg.model:
        problems.append("model: no model selected; pick one with model=NAME (conf/model/NAME.yaml)")
        return None
    try:
        resolved = resolve_entry(cfg.model, weights=False)
    except (ValueError, FileNotFoundError, OSError) as e:
        problems.append(f"model ({_model_name(cfg)}): {e}")
        return None
    weights = cfg.model.get("weights", "checkpoint")
    if resolved.source == "shape_only" and weights != "random" and cfg.entry not in MODEL_FREE_ENTRIES:
        problems.append(f"model={_model_name(cfg)} is a shape-only entry (its conf/model file has the shapes, no "
                        f"weights and no tokenizer): serve it with random weights, model.weights=random (real "
                        f"timings, meaningless tokens), or pick a model with weights (e.g. model=smollm2-135m, "
                        f"or model.source=hf_folder +model.path=CHECKPOINT_FOLDER)")
    return resolved.config


def _check_workload(cfg: Config, model_config, problems: list[str]) -> None:
    """The controller's own rules (dejavu.workload), run here on a copy without tokenizing text prompts."""
    from dataclasses import replace

    from dejavu import workload as wl

    spec = workload_spec(cfg)
    try:
        # The combination rules (kind versus files, prompts versus trace, sampling ranges).
        (getattr(wl, "check_spec", None) or wl._check_spec)(spec)
        if spec.prompts_file:
            wl.load_prompts_file(spec.prompts_file)
        text = spec.prompts is not None or spec.prompts_file
        # Text prompts need the tokenizer (the controller loads it); check files and sizes with random ids.
        probe = replace(spec, prompts=None, prompts_file=None, num_requests=spec.num_requests or (1 if text else None))
        wl.build_workload(probe, vocab_size=model_config.vocab_size if model_config else 1000,
                       max_positions=None if text or model_config is None else model_config.max_positions)
    except wl.WorkloadError as e:
        problems.append(str(e))


def longest_request(cfg: Config) -> int | None:
    """Positions the longest request of the run writes (None for text prompts); see dejavu.workload."""
    from dejavu.workload import longest_request as longest

    return longest(workload_spec(cfg))


def workload_spec(cfg: Config):
    from dejavu.workload import WorkloadSpec

    w = cfg.workload
    kw = {k: getattr(w, k) for k in w.__dataclass_fields__}
    kw["kind"] = w.kind.value
    for key in ("input_sizes_file", "input_timestamps_file", "prompts_file"):
        if kw[key]:
            kw[key] = str(Path(os.path.expandvars(kw[key])).expanduser().absolute())
    return WorkloadSpec(**kw)


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA setup counts as no GPU; the message says how many we saw
        return 0


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
