"""Config rules that keep a run from silently ignoring what the user asked for (``validate.check`` runs them).

- **Unknown keys.** Hydra's ``+group.key=value`` adds a key even to a typed group; a key that no code
  reads (``+workload.path=/x.json``) is refused, with the group's real keys and the nearest one.
- **Keys without effect.** A key set on the command line that the chosen options ignore is refused,
  naming the option that would use it: ``workload.rps`` needs ``workload=poisson``, ``workload.top_p``
  needs ``workload.temperature > 0``, ``cluster.ssh.user`` needs ``runner=ssh``, ...
- **Random weights** (``model.weights=random``): the prompts are random token ids (a made-up model's
  answers to text mean nothing, and shape-only entries have no tokenizer); the workload's own text prompts
  are set aside with a note, and text prompts given on the command line are refused.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import replace
from typing import Any, Callable, Sequence

from .schema import BackendName, Config, LoggerKind, RunnerKind, WorkloadKind

# Entries that start no model (runners/standin.py checks a cluster's wiring): they need no weights.
MODEL_FREE_ENTRIES = ("runners.standin",)
WEIGHTS = ("checkpoint", "random")
# Fields of a conf/model entry (dejavu.model.registry) plus this run's choice of weights (conf/config.yaml).
MODEL_KEYS = ("name", "source", "description", "package", "pip", "file", "path", "hf_config", "weights",
              "weights_seed")


_CLEARED = ("null", "none", "~", "", "false", "[]", "{}")


# ---- unknown keys -------------------------------------------------------------------------------------

def unknown_keys(cfg: Config) -> list[str]:
    """Keys added with ``+`` that the typed schema has no field for (dict-typed fields like cluster.env take any)."""
    problems: list[str] = []

    def walk(obj: Any, path: str) -> None:
        fields = {f.name for f in dataclasses.fields(obj)}
        for extra in sorted(set(vars(obj)) - fields):
            key = f"{path}.{extra}" if path else extra
            near = difflib.get_close_matches(extra, sorted(fields), n=1)
            where = f"{path} has no key {extra!r}" if path else f"there is no top-level key {extra!r}"
            problems.append(f"{key}: {where}, so it would be ignored; its keys are {', '.join(sorted(fields))}"
                            + (f" (did you mean {path + '.' if path else ''}{near[0]}?)" if near else ""))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name, None)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, f"{path}.{f.name}" if path else f.name)

    walk(cfg, "")
    if isinstance(cfg.model, dict):
        for extra in sorted(set(cfg.model) - set(MODEL_KEYS)):
            near = difflib.get_close_matches(extra, MODEL_KEYS, n=1)
            problems.append(f"model.{extra}: a model entry has no key {extra!r}, so it would be ignored; its keys "
                            f"are {', '.join(MODEL_KEYS)}" + (f" (did you mean model.{near[0]}?)" if near else ""))
    return problems


# ---- what the command line set ------------------------------------------------------------------------

def overrides_keys(overrides: Sequence[str]) -> dict[str, str]:
    """``{"workload.rps": "2"}`` from Hydra overrides like ``workload.rps=2`` / ``+a.b=c``; group choices
    (``workload=poisson``), deletions (``~key``) and ``hydra.*`` are left out."""
    keys: dict[str, str] = {}
    for o in overrides:
        o = str(o)
        if o.startswith("~") or "=" not in o:
            continue
        key, value = o.lstrip("+").split("=", 1)
        if "." in key and not key.startswith("hydra.") and "@" not in key:
            keys[key] = value
    return keys


# ---- random weights -----------------------------------------------------------------------------------

def weights_workload(cfg: Config, given: dict[str, str], problems: list[str], notes: list[str]) -> Config:
    """Checks ``model.weights`` / ``model.weights_seed``; with random weights, returns the config whose
    workload draws random-id prompts (see the module docstring)."""
    if not isinstance(cfg.model, dict):
        return cfg
    weights = cfg.model.get("weights", "checkpoint")
    if weights not in WEIGHTS:
        problems.append(f"model.weights={weights!r} must be checkpoint (the model's own weights) or random "
                        f"(random weights of its shapes, built from model.weights_seed)")
        return cfg
    seed = cfg.model.get("weights_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"model.weights_seed={seed!r} must be an integer >= 0")
    if weights != "random":
        return cfg
    w = cfg.workload
    for key in ("workload.prompts", "workload.prompts_file"):
        if given.get(key, "null") not in _CLEARED:
            problems.append(f"{key}: text prompts have no use with model.weights=random (made-up weights answer "
                            f"with meaningless tokens, and shape-only models have no tokenizer): the prompts are "
                            f"random token ids of workload.input_len tokens; drop {key}, or use "
                            f"model.weights=checkpoint with a model that has weights")
    if w.prompts is not None or w.prompts_file:
        n = w.num_requests or (len(w.prompts) if w.prompts else 8)
        notes.append(f"model.weights=random: the prompts are random token ids ({n} requests of "
                     f"workload.input_len={w.input_len} tokens from workload.prompt_seed={w.prompt_seed}) instead "
                     f"of workload {w.kind.value}'s text prompts")
        cfg = replace(cfg, workload=replace(w, prompts=None, prompts_file=None, chat_template=False, num_requests=n))
    return cfg


# ---- keys without effect ------------------------------------------------------------------------------

Rule = tuple[str, Callable[[Config], "str | None"]]  # (key or key prefix, cfg -> why it has no effect, or None)


def _poisson(c: Config) -> str | None:
    w = c.workload
    if w.kind == WorkloadKind.poisson or w.poisson:
        return None
    arrivals = ("arrivals come from workload.input_timestamps_file" if w.kind == WorkloadKind.timestamps
                else "every request arrives at t=0")
    return f"workload={w.kind.value} ({arrivals}); it needs workload=poisson (or workload.poisson=true)"


def _text(c: Config) -> bool:
    return c.workload.prompts is not None or bool(c.workload.prompts_file)


def _sizes(which: str) -> Callable[[Config], str | None]:
    def why(c: Config) -> str | None:
        if c.workload.input_sizes_file:
            return (f"the {which} come from workload.input_sizes_file (workload={c.workload.kind.value}); it needs "
                    f"fixed sizes (workload=fixed or workload=poisson without a sizes file)")
        if which == "prompt sizes" and _text(c):
            return ("text prompts (workload.prompts) have their own lengths; random-id prompts of that length "
                    "need workload.prompts=null (or workload=poisson)")
        return None
    return why


def _random_ids(c: Config) -> str | None:
    return ("text prompts (workload.prompts) are not drawn at random; it needs random-id prompts "
            "(workload.prompts=null, or workload=poisson)") if _text(c) else None


def _text_prompts(c: Config) -> str | None:
    return None if _text(c) else ("the prompts are random token ids; it needs text prompts "
                                  "(workload.prompts or workload.prompts_file)")


def _sampling(c: Config) -> str | None:
    return None if c.workload.temperature > 0 else "workload.temperature=0 is greedy decoding; it needs workload.temperature > 0"


def _gpu(c: Config) -> str | None:
    return None if c.backend.device == "cuda" else f"backend.device={c.backend.device}; it needs backend.device=cuda (backend=nccl)"


def _mpi(c: Config) -> str | None:
    return None if c.backend.name == BackendName.mpi else (f"backend={c.backend.name.value}; it needs backend=mpi "
                                                            f"(with runner=mpirun)")


def _runner(kind: RunnerKind) -> Callable[[Config], str | None]:
    def why(c: Config) -> str | None:
        return None if c.runner.kind == kind else f"runner={c.runner.kind.value}; it needs runner={kind.value}"
    return why


def _wandb(c: Config) -> str | None:
    return None if c.logger.kind == LoggerKind.wandb else "logger=none; it needs logger=wandb_offline or logger=wandb_online"


def _random_weights(c: Config) -> str | None:
    weights = c.model.get("weights", "checkpoint") if isinstance(c.model, dict) else "checkpoint"
    return None if weights == "random" else f"model.weights={weights}; it needs model.weights=random"


def _auto_topology(c: Config) -> str | None:
    return None if c.topology.name == "auto" else f"topology={c.topology.name}; it needs topology=auto (the planner)"


RULES: list[Rule] = [
    ("workload.rps", _poisson), ("workload.arrival_seed", _poisson),
    ("workload.input_len", _sizes("prompt sizes")), ("workload.output_len", _sizes("generated lengths")),
    ("workload.prompt_seed", _random_ids), ("workload.chat_template", _text_prompts),
    ("workload.top_k", _sampling), ("workload.top_p", _sampling), ("workload.seed", _sampling),
    ("backend.cuda_graphs", _gpu),
    *((f"backend.{k}", _mpi) for k in ("btl_tcp_max_send_size", "btl_sm_max_send_size", "btl_tcp_progress_thread",
                                       "btl_tcp_if_exclude", "mca")),
    ("runner.controller_host", _runner(RunnerKind.ssh)),
    *((f"runner.{k}", _runner(RunnerKind.mpirun)) for k in ("mpirun", "bind_to", "oversubscribe", "extra_args")),
    *((f"cluster.{k}", _runner(RunnerKind.ssh)) for k in ("ssh", "remote_dir", "python", "venv", "setup",
                                                          "system_site_packages", "pip_args")),
    *((f"logger.{k}", _wandb) for k in ("mode", "project", "entity", "tags")),
    ("model.weights_seed", _random_weights),
    ("topology.resident_buffers", lambda c: None if c.topology.swapping else
     "topology.swapping=false (every microbatch in flight has its own KV buffer); it needs topology.swapping=true"),
    ("planner", _auto_topology),
]


def noop_keys(cfg: Config, overrides: Sequence[str]) -> list[str]:
    """A problem per command-line key that the chosen options ignore."""
    problems = []
    for key, value in overrides_keys(overrides).items():
        if value.strip().lower() in _CLEARED:
            continue  # turning a setting off or clearing it asks for nothing that could be ignored
        for rule, why in RULES:
            if key == rule or key.startswith(rule + "."):
                reason = why(cfg)
                if reason:
                    problems.append(f"{key}={value} has no effect with {reason}")
                break
    return problems
