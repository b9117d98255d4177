"""``topology=auto``: the planner picks the prompt/token split before anything starts.

``validate.check`` calls :func:`plan_auto` when ``topology.name`` is ``auto``. It prices the run's model
(``model``; its shapes are enough) for the run's workload (``workload.input_len``/``output_len``, or the
trace's mean sizes) and microbatch (``topology.ubatch_size``), with times from ``planner.profile``,
from ``planner.prompt_time_s`` + ``planner.token_time_s``, or, on a CPU run, from a quick profile of the
model's shape on this machine (a few seconds). The split replaces ``topology.num_prompt_peers`` and
``num_token_peers`` (``num_peers`` = machines x ``tensor_parallelism`` stays); the reasoning lands in the
run folder as ``planner.txt`` and ``planner.json`` (:func:`write_plan_record`). A plan that cannot be made
is a configuration problem naming the key (``topology.num_peers``, ``planner.machine_memory_gb``, ...).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .schema import Config

KEYS = {"machines": "topology.num_peers", "memory": "planner.machine_memory_gb", "gpus": "topology.tensor_parallelism",
        "input_len": "workload.input_len", "new_tokens": "workload.output_len", "ubatch_size": "topology.ubatch_size",
        "prompt_time": "planner.prompt_time_s", "token_time": "planner.token_time_s",
        "stream_overhead": "planner.stream_overhead", "model": "model", "profile": "planner.profile"}
PLAN_FILES = ("planner.txt", "planner.json")


def plan_auto(cfg: Config, problems: list[str]) -> tuple[Config, dict[str, Any] | None]:
    """The config with the planner's split in ``topology``, and the record to write (None on a problem)."""
    from dejavu.planner.plan import GB, PlanError, PlanInputs, plan_split
    from dejavu.planner.profile import ProfileError

    t, pl = cfg.topology, cfg.planner
    tp = max(t.tensor_parallelism, 1)
    if t.num_peers < 1:
        return cfg, None  # the topology checks name it
    if t.num_peers % tp:
        problems.append(f"topology.num_peers={t.num_peers} is not a multiple of topology.tensor_parallelism={tp}: "
                        f"topology=auto splits num_peers / tensor_parallelism machines (stages)")
        return cfg, None
    machines = t.num_peers // tp
    try:
        model = _model(cfg)
        from dejavu.planner.sizes import model_sizes

        P, N, where_sizes = _sizes(cfg)
        Y, T, where, notes = _times(cfg, model, P, N, machines)
        memory, mem_note = _memory(cfg, machines)
        if mem_note:
            notes.append(mem_note)
        if where_sizes:
            notes.append(where_sizes)
        inp = PlanInputs(machines=machines, sizes=model_sizes(model.config, cfg.backend.weights_data_type),
                         input_len=P, new_tokens=N, ubatch_size=t.ubatch_size, prompt_time_s=Y, token_time_s=T,
                         memory_per_machine=memory, stream_overhead=pl.stream_overhead, model=model.name,
                         times_from=where, keys=dict(KEYS))
        plan = plan_split(inp)
    except (PlanError, ProfileError) as e:
        problems.append(f"topology=auto: {e}")
        return cfg, None
    except (ValueError, FileNotFoundError, OSError) as e:
        problems.append(f"topology=auto: model ({cfg.model.get('name') if isinstance(cfg.model, dict) else '?'}): {e}")
        return cfg, None
    if notes:
        plan.notes.extend(notes)
        plan.reasoning[3:3] = [f"note: {n}" for n in notes]
    prompt, token = plan.prompt_machines, plan.token_machines
    plan.reasoning.append(f"topology=auto -> topology.num_prompt_peers={prompt} topology.num_token_peers={token} "
                          f"(num_peers={(prompt + token) * tp})")
    # Machines the plan leaves idle (more than two pipelines of one layer each can use) are not started.
    cfg = replace(cfg, topology=replace(t, num_prompt_peers=prompt, num_token_peers=token, num_peers=(prompt + token) * tp))
    record = {"plan": plan.to_dict(), "reasoning": plan.reasoning}
    return cfg, record


def write_plan_record(record: dict[str, Any] | None, run_dir: Path) -> None:
    if record is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "planner.txt").write_text("\n".join(record["reasoning"]) + "\n")
    (run_dir / "planner.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print("dejavu-run: topology=auto, the planner's reasoning (planner.txt):\n  " + "\n  ".join(record["reasoning"]),
          flush=True)


def _model(cfg: Config):
    from dejavu.model.registry import resolve_entry

    if not isinstance(cfg.model, dict) or not cfg.model:
        raise ValueError("no model selected; pick one with model=NAME")
    return resolve_entry(cfg.model, weights=False)


def _sizes(cfg: Config) -> tuple[int, int, str]:
    """P and N: the workload's fixed sizes, or the trace's means."""
    w = cfg.workload
    if w.input_sizes_file:
        from dejavu.workload import load_trace

        sizes = load_trace(os.path.expanduser(os.path.expandvars(w.input_sizes_file)))
        if w.num_requests:
            sizes = sizes[:w.num_requests]
        P = max(1, round(sum(p for p, _ in sizes) / len(sizes)))
        N = max(1, round(sum(n for _, n in sizes) / len(sizes)))
        return P, N, f"P and N are the trace's means over {len(sizes)} requests"
    if w.prompts is not None or w.prompts_file:
        return w.input_len, w.output_len, (f"text prompts have their own lengths: P taken as workload.input_len="
                                           f"{w.input_len}")
    return w.input_len, w.output_len, ""


def _times(cfg: Config, model, P: int, N: int, machines: int) -> tuple[float, float, str, list[str]]:
    from dejavu.planner.cli import times_from_profile
    from dejavu.planner.plan import PlanError
    from dejavu.planner.profile import load_profile

    pl, t = cfg.planner, cfg.topology
    given = (pl.prompt_time_s is not None, pl.token_time_s is not None)
    if pl.profile:
        if any(given):
            raise PlanError("set either planner.profile or planner.prompt_time_s + planner.token_time_s, not both",
                            "planner.profile")
        prof = load_profile(pl.profile, "planner.profile")
        return times_from_profile(prof, model_cfg=model.config, model_name=model.name, ubatch=t.ubatch_size,
                                  input_len=P, new_tokens=N, gpus=t.tensor_parallelism, key="planner.profile")
    if all(given):
        return float(pl.prompt_time_s), float(pl.token_time_s), "given (planner.prompt_time_s, planner.token_time_s)", []
    if any(given):
        missing = "planner.token_time_s" if given[0] else "planner.prompt_time_s"
        raise PlanError(f"{missing} is not set: give both planner.prompt_time_s and planner.token_time_s, or "
                        f"planner.profile", missing)
    if cfg.backend.device != "cpu":
        raise PlanError(f"planner.profile: topology=auto on backend.device={cfg.backend.device} needs a profile of "
                        f"the model on that device (`dejavu profile --model {model.name} --device cuda`, or a shipped "
                        f"one) or planner.prompt_time_s + planner.token_time_s", "planner.profile")
    return _quick_cpu_profile(cfg, model, P, N, machines)


def _quick_cpu_profile(cfg: Config, model, P: int, N: int, machines: int):
    """A profile of the model's shape on this CPU at the run's (b, P, P + N/2), with the threads a worker
    of this run gets; a few seconds for a small model."""
    from dejavu.planner.measure import GridSpec, measure_profile

    t = cfg.topology
    workers = t.num_peers
    threads = int(cfg.cluster.env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
                  or max(1, (os.cpu_count() or 1) // max(workers, 1)))
    ctx = min(P + max(N // 2, 1), model.config.max_positions - 1)
    grid = GridSpec([t.ubatch_size], [min(P, model.config.max_positions)], [ctx], reps=3, warmup=1)
    prof = measure_profile(model.config, grid, model=model.name, device="cpu", dtype=cfg.backend.inference_data_type,
                           threads=threads, full_model=False, log=lambda s: None)
    Y = prof.prompt_time(t.ubatch_size, P)
    T = prof.token_time(t.ubatch_size, ctx)
    notes = ([f"profiled on the launching machine, not on the hosts of cluster.hosts_file: give planner.profile "
              f"(`dejavu profile` on a host) for their times"] if cfg.cluster.hosts_file else [])
    return Y, T, f"a quick profile of {model.name} on this CPU ({threads} thread(s), {cfg.backend.inference_data_type})", notes


def _memory(cfg: Config, machines: int) -> tuple[float | None, str]:
    from dejavu.planner.plan import GB

    pl = cfg.planner
    if pl.machine_memory_gb is not None:
        return pl.machine_memory_gb * GB, ""
    if cfg.backend.device == "cpu" and not cfg.cluster.hosts_file:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None, "memory floors not applied (planner.machine_memory_gb not set)"
        return total / max(cfg.topology.num_peers, 1), (f"memory per machine: this machine's {total / GB:.3g} GB / "
                                                        f"{cfg.topology.num_peers} workers (planner.machine_memory_gb "
                                                        f"not set)")
    return None, "memory floors not applied (planner.machine_memory_gb not set)"
