"""`dejavu-run`: compose a config with Hydra, check it, start the processes, report and log the run.

    dejavu-run                                   # SmolLM2, one CPU worker, a few real prompts
    dejavu-run topology=disagg                   # 1 prompt + 1 token worker, KV cache streamed
    dejavu-run -m topology=baseline,disagg workload=poisson workload.rps=1,2
    dejavu-run runner=ssh cluster=ip_info cluster.ssh.user=me   # the seed's /tmp/ip_info hosts
    dejavu-run runner=mpirun backend=mpi topology=baseline
    dejavu-run +experiment=disagg_vs_baseline    # Figure 8 style sweep
    dejavu-run --cfg job                         # print the composed config and exit

The run folder is Hydra's output dir (results/<time>/, or results/multirun/<time>/<n>_<overrides>/):
the controller writes the results there; the runner adds logs/, inputs/ and launch.json.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import conf_dir
from . import schema  # noqa: F401  (registers the structured config)
from .plan import Plan
from .schema import Config, LoggerKind, RunnerKind
from .supervise import LaunchError, Outcome, failure_report, sigterm_as_interrupt
from .validate import Checked, ConfigError, check


def launch(checked: Checked, run_dir: Path) -> tuple[Outcome, Any, Plan]:
    kind = checked.cfg.runner.kind
    if kind == RunnerKind.local:
        from .local import prepare_local, run_local

        plan = prepare_local(checked, run_dir)
        outcome, procs = run_local(plan, run_dir, checked.cfg.runner, checked.cfg)
    elif kind == RunnerKind.mpirun:
        from .mpirun import prepare_mpirun, run_mpirun

        plan = prepare_mpirun(checked, run_dir)
        outcome, procs = run_mpirun(plan, checked, run_dir)
    else:
        from .ssh import SSHRunner

        runner = SSHRunner(checked, run_dir)
        try:
            plan = runner.prepare()
        except BaseException:
            runner.close()
            raise
        outcome, procs = runner.run(plan), runner
    return outcome, procs, plan


def write_launch_record(plan: Plan, run_dir: Path, outcome: Outcome | None = None) -> None:
    """launch.json: every process's host, command line and our environment variables, and how it ended."""
    from dejavu.results.scrub import scrub

    rec = {"entry": plan.entry, "proc_dir": plan.proc_dir,
           "procs": [{"name": p.name, "host": p.host, "rank": p.rank, "args": p.args, "env": p.env}
                     for p in plan.procs]}
    if outcome is not None:
        rec["exit_codes"] = outcome.exit_codes
        rec["problems"] = outcome.problems
    (run_dir / "launch.json").write_text(json.dumps(scrub(rec), indent=1) + "\n")


def print_report(cfg: Config, run_dir: Path) -> None:
    from dejavu.results.compare import load_runs, render_table
    from dejavu.results.writer import load_records

    random = isinstance(cfg.model, dict) and cfg.model.get("weights") == "random"
    if cfg.print_answers:
        prompts = cfg.workload.prompts or []
        records = load_records(run_dir)
        if any(r.text is None for r in records):
            print(token_ids_note(cfg, random))
        for r in records:
            q = prompts[r.id % len(prompts)] if prompts else f"<{len(r.prompt_ids)} prompt tokens>"
            a = r.text if r.text is not None else f"<{len(r.output_ids)} tokens: {r.output_ids[:8]}...>"
            print(f"[{r.id}] {q}\n    -> {a.strip() if isinstance(a, str) else a}")
        print()
    print(render_table(load_runs(run_dir)))
    if random:
        print(f"\nweights: RANDOM (model.weights=random, model.weights_seed={cfg.model.get('weights_seed', 0)}): "
              f"{cfg.model.get('name')}'s shapes with made-up weights; the timings are real, the tokens are not "
              f"answers (summary.json: run.weights)")
    print(f"\nresults: {run_dir}")


def token_ids_note(cfg: Config, random: bool) -> str:
    """Said once above the answers when they are token ids rather than text: why."""
    if random:
        why = "model.weights=random: the prompts are random token ids and a made-up model's answers are not text"
    elif cfg.workload.prompts is None and not cfg.workload.prompts_file:
        why = (f"workload={cfg.workload.kind.value} draws its prompts as random token ids "
               f"(sized by workload.input_len or the trace), so there is no text to show; text prompts and "
               f"decoded answers come with workload.prompts (the default workload=fixed)")
    else:
        why = "the model has no tokenizer to decode them"
    return f"answers as token ids ({why}):"


def wandb_group(cfg: Config) -> str | None:
    """The points of one multirun share a W&B group: the preset's name (or "sweep") and the sweep folder."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"{cfg.experiment or 'sweep'}-{Path(hc.sweep.dir).name}"


def log_to_wandb(cfg: Config, raw: DictConfig, run_dir: Path) -> None:
    if cfg.logger.kind == LoggerKind.none or not (run_dir / "summary.json").exists():
        return
    from dejavu.results.wandb_log import log_run

    group = wandb_group(cfg)
    tags = [*cfg.logger.tags, cfg.topology.name, cfg.runner.kind.value] + ([cfg.experiment] if cfg.experiment else [])
    if isinstance(cfg.model, dict) and cfg.model.get("weights") == "random":
        tags.append("random-weights")  # timings only: the outputs of a made-up model
    info = log_run(run_dir, config=OmegaConf.to_container(raw, resolve=True), mode=cfg.logger.mode.value,
                   project=cfg.logger.project, entity=cfg.logger.entity, group=group,
                   name=run_dir.name, tags=tags)
    if info is not None:
        where = info.url or info.dir
        print(f"W&B ({info.mode}): run {info.id}" + (f" in group {group}" if group else "") + f" -> {where}")


def run_bench(cfg: Config, raw: DictConfig, run_dir: Path) -> int:
    """Presets like streaming_microbench run a benchmark script's main(argv) in this process; a bench that
    returns its numbers (a dict) gets them logged to W&B like a run's summary."""
    script = Path(__file__).resolve().parents[1] / cfg.bench.script
    spec = importlib.util.spec_from_file_location(f"dejavu_bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [str(a).replace("{run_dir}", str(run_dir)) for a in cfg.bench.args]
    print(f"dejavu-run: {cfg.bench.script} {' '.join(args)}  (run folder {run_dir})", flush=True)
    result = module.main(args)
    if isinstance(result, dict) and cfg.logger.kind != LoggerKind.none:
        from dejavu.results.wandb_log import log_run

        info = log_run(run_dir, summary=result, config=OmegaConf.to_container(raw, resolve=True),
                       mode=cfg.logger.mode.value, project=cfg.logger.project, entity=cfg.logger.entity,
                       group=wandb_group(cfg), name=run_dir.name, tags=[*cfg.logger.tags, cfg.experiment or "bench"])
        if info is not None:
            print(f"W&B ({info.mode}): run {info.id} -> {info.url or info.dir}")
    return result if isinstance(result, int) else 0


def end_point(run_dir: Path, code: int, reason: str) -> None:
    """End this run with exit ``code``. In a sweep, a failed point is recorded in its folder
    (``failed.json``, listed by the sweep index) and the sweep goes on to the next one; the sweep exits
    non-zero at its end (``runners.callbacks.SweepIndex``). An interrupt (130) still ends the sweep."""
    if HydraConfig.get().mode != RunMode.MULTIRUN or code == 130:
        sys.exit(code)
    from dejavu.results.compare import FAILED_POINT
    from dejavu.results.scrub import scrub_text

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_POINT).write_text(json.dumps({"exit_code": code, "reason": scrub_text(reason)}, indent=1) + "\n")
    print(f"dejavu-run: this sweep point failed (exit {code}); going on with the next one", file=sys.stderr)


def refuse(run_dir: Path, error: ConfigError) -> None:
    """A refused config: nothing ran, so the run folder keeps only the record of the refusal, in a single
    run as in a sweep point: ``failed.json`` (exit code 2 and the problems) beside Hydra's ``.hydra/``
    (the config and overrides asked for). Whatever else was written for it (inputs/, logs/, an empty
    log file) is removed."""
    import shutil

    from dejavu.results.compare import FAILED_POINT
    from dejavu.results.scrub import scrub_text

    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name in ("inputs", "logs") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name == "launch.json" or (p.suffix == ".log" and p.is_file() and p.stat().st_size == 0):
                p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"exit_code": 2, "refused": True, "reason": scrub_text(f"configuration: {error}"),
              "problems": [scrub_text(p) for p in error.problems]}
    (run_dir / FAILED_POINT).write_text(json.dumps(record, indent=1) + "\n")
    print(f"dejavu-run: {error}\n(the refusal is recorded in {run_dir / FAILED_POINT})", file=sys.stderr)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(2)
    print("dejavu-run: this sweep point was refused (exit 2); going on with the next one", file=sys.stderr)


def run(raw: DictConfig) -> dict[str, Any] | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        checked = check(raw, overrides=list(HydraConfig.get().overrides.task))
    except ConfigError as e:
        return refuse(run_dir, e)
    cfg = checked.cfg
    for note in checked.notes:
        print(f"dejavu-run: note: {note}", flush=True)
    if checked.plan is not None:  # topology=auto: the planner's reasoning goes into the run folder
        from .autoplan import write_plan_record

        write_plan_record(checked.plan, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.bench is not None:
        code = run_bench(cfg, raw, run_dir)
        if code:
            return end_point(run_dir, code, f"benchmark exited with {code}")
        return None

    plan = None
    with sigterm_as_interrupt():
        try:
            outcome, procs, plan = launch(checked, run_dir)
        except ConfigError as e:  # found while preparing: still before launch
            return refuse(run_dir, e)
        except LaunchError as e:  # a host unreachable or unprepared, or a process that would not start
            print(f"dejavu-run: cannot launch (nothing was started, or what was started has been stopped):\n{e}",
                  file=sys.stderr)
            return end_point(run_dir, 3, f"launch: {e}")
        except KeyboardInterrupt:
            print("dejavu-run: interrupted while starting; every process started was stopped", file=sys.stderr)
            sys.exit(130)
    write_launch_record(plan, run_dir, outcome)
    if not (run_dir / "config.yaml").exists():
        from dejavu.results.writer import write_config

        write_config(run_dir, raw)
    if not outcome.ok:
        print(failure_report(outcome, procs, run_dir, echoed=cfg.runner.echo), file=sys.stderr)
        if not outcome.interrupted:  # the controller's partial results say which requests finished: log them
            try:
                log_to_wandb(cfg, raw, run_dir)
            except Exception as e:  # noqa: BLE001 — the run's failure is the message that matters
                print(f"dejavu-run: could not log the failed run to W&B: {e}", file=sys.stderr)
        return end_point(run_dir, 130 if outcome.interrupted else 1, "the run failed; see its logs/ and the report above")
    print_report(cfg, run_dir)
    log_to_wandb(cfg, raw, run_dir)
    return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else None


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> Any:
    return run(cfg)


if __name__ == "__main__":
    main()
