"""The serving controller: ``run_controller(ControllerOptions) -> exit code``.

It checks everything it can before listening (peer counts against the model, the host file, the
workload and its files), builds the requests, runs the serving loop (``server.Controller``) and writes
the results folder — also when the run fails, so that the folder says which requests finished.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .options import ControllerOptions, OptionsError, check_options
from .server import Controller, RunFailed, default_run_dir, print_failure

__all__ = ["ControllerOptions", "OptionsError", "prepare", "run_controller"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def prepare(opts: ControllerOptions):
    """Checks and requests, before any socket opens: (topology, requests, tokenizer or None)."""
    from ..workload import WorkloadError, build_workload

    if not opts.model:
        raise OptionsError("--model is required: the controller checks the topology against the model and "
                           "draws prompts from its vocabulary (a registered name, a checkpoint folder or a .gguf)")
    from ..model.registry import resolve_model

    spec = opts.workload
    text = bool(spec.prompts or spec.prompts_file)
    try:
        model = resolve_model(opts.model, weights=text)  # text prompts need the (converted) tokenizer
    except (ValueError, FileNotFoundError) as e:
        raise OptionsError(f"--model {opts.model!r}: {e}") from None
    cfg = model.config
    topo = check_options(opts, cfg)
    tokenizer = None
    if text:
        from ..model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model.tokenizer_dir, model_name=model.name)
        if not spec.stop_token_ids:
            # Real text: stop at the model's end of sequence, as `dejavu generate` does.
            eos = list(cfg.eos_token_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
            spec.stop_token_ids = eos
    special = [t for t in (cfg.bos_token_id, cfg.pad_token_id, *cfg.eos_token_ids) if t is not None]
    try:
        requests = build_workload(spec, vocab_size=cfg.vocab_size, max_positions=cfg.max_positions,
                                  tokenizer=tokenizer, special_ids=special)
    except WorkloadError as e:
        raise OptionsError(str(e).replace("workload.", "--")) from None
    return topo, requests, tokenizer


def run_controller(opts: ControllerOptions, *, plots: bool = True, log=None) -> int:
    log = log or (lambda msg: print(f"[controller] {msg}", flush=True))
    try:
        topo, requests, tokenizer = prepare(opts)
    except (OptionsError, ValueError, FileNotFoundError) as e:
        print(f"dejavu controller: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    run_dir = Path(opts.run_dir) if opts.run_dir else default_run_dir()
    weights = "; random weights (seed %d)" % opts.weights_seed if opts.load_format == "dummy" else ""
    log(f"{describe_topology(topo)}{weights}; {len(requests)} requests in microbatches of {opts.ubatch_size}; "
        f"results in {run_dir}")
    try:
        server = Controller(opts, topo, requests, log=log)
    except RunFailed as e:
        print(f"dejavu controller: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    t0 = time.perf_counter()
    try:
        result = server.run()
    finally:
        server.close()
    if tokenizer is not None:
        from ..model.tokenizer import decode

        for rec in result.records:
            rec.text = decode(tokenizer, rec.output_ids)
    from ..results.writer import write_results

    extra = {"run": {"status": "ok" if result.ok else "failed", "error": result.error,
                     "topology": {"prompt_stages": topo.prompt_stages, "token_stages": topo.token_stages,
                                  "tensor_parallelism": topo.tp, "workers": topo.world_size,
                                  "layout": describe_topology(topo)},
                     "weights": weights_record(opts),
                     "wall_s": time.perf_counter() - t0}}
    if result.failures is not None:
        from .recovery import recovery_summary

        extra["failures"] = result.failures
        extra["recovery"] = recovery_summary(result.failures, result.worker_stats)
        extra["run"]["fault_tolerance"] = {"with_ft": opts.with_ft, "max_restarts": opts.max_restarts}
    summary = write_results(run_dir, result.records, result.events, result.worker_stats, opts.to_config(),
                            extra=extra, plots=plots)
    if not result.ok:
        print_failure(result.error or "unknown error", result.records)
        log(f"results (partial) in {run_dir}")
        return EXIT_FAILED
    tp = summary.get("throughput", {})
    log(f"done: {summary['counts']['completed']}/{len(requests)} requests, "
        f"{tp.get('output_tokens')} tokens, {tp.get('output_tokens_per_s') or 0:.1f} tok/s; "
        f"outputs_sha256 {summary['outputs_sha256'][:16]}...; results in {run_dir}")
    return EXIT_OK


def describe_topology(topo) -> str:
    """The layout in words: "single worker (the whole model)", "baseline: 2 stages, tensor parallelism 1,
    2 workers", "disaggregated: 1 prompt + 1 token stage, tensor parallelism 1, 2 workers"."""
    if topo.world_size == 1:
        return "single worker (the whole model)"
    workers = f"tensor parallelism {topo.tp}, {topo.world_size} workers"
    if topo.disaggregated:
        return (f"disaggregated: {topo.prompt_stages} prompt + {topo.token_stages} token "
                f"stage{'s' if topo.token_stages > 1 else ''}, {workers}")
    if topo.token_stages == 1:
        return f"one stage, {workers}"
    return f"baseline: {topo.token_stages} stages, {workers}"


def weights_record(opts: ControllerOptions) -> dict:
    """summary.json's run.weights: where the workers' weights came from (random: a benchmark of timings only)."""
    if opts.load_format == "dummy":
        return {"kind": "random", "seed": opts.weights_seed}
    return {"kind": "checkpoint"}
