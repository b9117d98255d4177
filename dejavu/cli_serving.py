"""``dejavu controller`` and ``dejavu worker``: the seed's two programs, with the seed's flag names.

    dejavu controller --num_peers N --num_prompt_peers M --num_token_peers K --tensor_parallelism Y \\
        --controller_ip IP --port P --ubatch_size b --num_requests X --input_len P --output_len G --model M
    DEJAVU_CONTROLLER_IP=IP DEJAVU_CONTROLLER_PORT=P MASTER_ADDR=... MASTER_PORT=... \\
        dejavu worker --tensor_para_size=Y --prompt_pipeline_para_size=M --token_pipeline_para_size=K \\
        --ckpt_path M --backend gloo --rank i --world_size N ...
    mpirun -n N -x DEJAVU_CONTROLLER_IP=IP dejavu worker ... --backend mpi   # rank and size from MPI

Also ``python -m dejavu.cli_serving {controller,worker} ...``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _env_default(name: str, fallback):
    return os.environ.get(name) or fallback


def controller_parser() -> argparse.ArgumentParser:
    from .controller.options import DEFAULT_PORT

    p = argparse.ArgumentParser(prog="dejavu controller", description="The DejaVu serving controller.")
    g = p.add_argument_group("topology (the seed's flags)")
    g.add_argument("--num_peers", type=int, required=True, help="workers in all")
    g.add_argument("--num_prompt_peers", type=int, default=0, help="prompt pipeline stages (0: baseline)")
    g.add_argument("--num_token_peers", type=int, default=None, help="token pipeline stages")
    g.add_argument("--tensor_parallelism", type=int, default=1)
    g.add_argument("--ubatch_size", type=int, default=8, help="requests per microbatch")
    g.add_argument("--controller_ip", default=_env_default("DEJAVU_CONTROLLER_IP", "127.0.0.1"),
                   help="interface to listen on (default $DEJAVU_CONTROLLER_IP or 127.0.0.1)")
    g.add_argument("--port", type=int, default=int(_env_default("DEJAVU_CONTROLLER_PORT", DEFAULT_PORT)))
    g.add_argument("--workers_ip_file", default=None, help="one worker address per line (checked against --num_peers)")
    g.add_argument("--with_ft", action="store_true",
                   help="fault tolerance: workers replicate their KV caches; a failure resumes from the last "
                        "replicated step (implies --recoverable)")
    g.add_argument("--model", default=None, help="registered name, checkpoint folder or .gguf (the workers' --ckpt_path)")
    g.add_argument("--load_format", default="auto", choices=("auto", "dummy"),
                   help="what the workers were given (recorded in summary.json): dummy = random weights")
    g.add_argument("--weights_seed", type=int, default=0, help="seed of the workers' --load_format dummy")
    g.add_argument("--run_dir", default=None, help="results folder (default results/<time>)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload_kind", default=None, choices=("fixed", "trace", "poisson", "timestamps"),
                   help="default: from the files given (trace / timestamps), else fixed")
    w.add_argument("--num_requests", type=int, default=None)
    w.add_argument("--input_len", type=int, default=16)
    w.add_argument("--output_len", "--max_new_tokens", dest="output_len", type=int, default=16)
    w.add_argument("--input_sizes_file", default=None, help="JSON list of [prompt_size, num_generated_tokens]")
    w.add_argument("--poisson", action="store_true")
    w.add_argument("--rps", type=float, default=1.0)
    w.add_argument("--arrival_seed", type=int, default=0)
    w.add_argument("--input_timestamps_file", default=None, help="JSON list of arrival seconds")
    w.add_argument("--prompts_file", default=None, help="text prompts, one per line")
    w.add_argument("--prompt", dest="prompts", action="append", default=None, help="a text prompt (repeatable)")
    w.add_argument("--chat_template", action="store_true")
    w.add_argument("--prompt_seed", type=int, default=0)
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--top_k", type=int, default=0)
    w.add_argument("--top_p", type=float, default=1.0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--min_new_tokens", type=int, default=0)
    w.add_argument("--stop_token_ids", type=int, nargs="+", default=None)
    f = p.add_argument_group("failure detection")
    f.add_argument("--heartbeat_interval", type=float, default=0.5)
    f.add_argument("--heartbeat_timeout", type=float, default=5.0)
    f.add_argument("--startup_timeout", type=float, default=120.0)
    f.add_argument("--ready_timeout", type=float, default=1800.0)
    f.add_argument("--progress_timeout", type=float, default=600.0)
    f.add_argument("--stats_timeout", type=float, default=30.0)
    f.add_argument("--recoverable", action="store_true",
                   help="survive a worker's failure (restart it, rebuild the data plane, go on); without "
                        "--with_ft its unfinished requests start again from their prompts")
    f.add_argument("--max_restarts", type=int, default=3, help="failures the run survives")
    f.add_argument("--recovery_timeout", type=float, default=120.0,
                   help="seconds for a lost worker to come back and every worker to rejoin")
    f.add_argument("--restart_mode", default="auto", choices=("auto", "manual"),
                   help="auto: the runner (or a hot spare) replaces a lost worker; manual: start "
                        "`dejavu worker ... --rank R --restart --failures F` yourself")
    f.add_argument("--failure_scenario", default=None,
                   help="JSON list of failures to inject, e.g. "
                        "'[{\"ranks\": [1], \"phase\": \"decode\", \"step\": 3, \"signal\": \"kill\"}]'")
    p.add_argument("--no_plots", action="store_true", help="skip plots/*.png in the results folder")
    return p


def controller_options(args: argparse.Namespace):
    from .controller.options import ControllerOptions
    from .workload import WorkloadSpec

    kind = args.workload_kind
    if kind is None:
        kind = "timestamps" if args.input_timestamps_file else "trace" if args.input_sizes_file else "fixed"
    num_requests = args.num_requests
    if num_requests is None and kind == "fixed" and not (args.prompts or args.prompts_file):
        num_requests = 8
    spec = WorkloadSpec(kind=kind, num_requests=num_requests, input_len=args.input_len, output_len=args.output_len,
                        input_sizes_file=args.input_sizes_file, poisson=args.poisson, rps=args.rps,
                        arrival_seed=args.arrival_seed, input_timestamps_file=args.input_timestamps_file,
                        prompt_seed=args.prompt_seed, prompts=args.prompts, prompts_file=args.prompts_file,
                        chat_template=args.chat_template, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, min_new_tokens=args.min_new_tokens,
                        stop_token_ids=list(args.stop_token_ids or []))
    return ControllerOptions(
        num_peers=args.num_peers, num_prompt_peers=args.num_prompt_peers, num_token_peers=args.num_token_peers,
        tensor_parallelism=args.tensor_parallelism, controller_ip=args.controller_ip, port=args.port,
        workers_ip_file=args.workers_ip_file, ubatch_size=args.ubatch_size, model=args.model, run_dir=args.run_dir,
        workload=spec, load_format=args.load_format, weights_seed=args.weights_seed, with_ft=args.with_ft,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout, startup_timeout_s=args.startup_timeout,
        ready_timeout_s=args.ready_timeout, progress_timeout_s=args.progress_timeout,
        stats_timeout_s=args.stats_timeout, recoverable=args.recoverable, max_restarts=args.max_restarts,
        recovery_timeout_s=args.recovery_timeout, restart=args.restart_mode,
        injections=_failure_scenario(args.failure_scenario))


def _failure_scenario(text: str | None) -> list:
    if not text:
        return []
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"dejavu controller: error: --failure_scenario is not JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SystemExit("dejavu controller: error: --failure_scenario must be a JSON list of objects")
    return value


def controller_main(argv: list[str] | None = None) -> int:
    args = controller_parser().parse_args(argv)
    from .controller import run_controller

    return run_controller(controller_options(args), plots=not args.no_plots)


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu worker", description="One DejaVu serving worker (one stage shard).")
    p.add_argument("--tensor_para_size", type=int, default=1)
    p.add_argument("--prompt_pipeline_para_size", type=int, default=0, help="prompt pipeline stages (0: baseline)")
    p.add_argument("--token_pipeline_para_size", type=int, default=1, help="token pipeline stages")
    p.add_argument("--ckpt_path", required=True, help="registered model name, checkpoint folder or .gguf")
    p.add_argument("--load_format", default="auto", choices=("auto", "dummy"),
                   help="auto: the checkpoint's weights; dummy: random weights built on this worker from "
                        "--weights_seed (any model, shape-only entries too; real timings, meaningless tokens)")
    p.add_argument("--weights_seed", type=int, default=0, help="seed of --load_format dummy")
    p.add_argument("--backend", default="gloo", help="gloo (CPU), nccl (GPU) or mpi (under mpirun)")
    p.add_argument("--weights_data_type", default="fp32")
    p.add_argument("--inference_data_type", default="auto", help="fp32, fp16, bf16 (auto: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--ubatch_size", type=int, default=8)
    p.add_argument("--num_requests", type=int, default=None)
    p.add_argument("--input_len", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="default $RANK (or MPI's rank)")
    p.add_argument("--world_size", type=int, default=None, help="default $WORLD_SIZE (or MPI's size)")
    p.add_argument("--controller_ip", default=None, help="default $DEJAVU_CONTROLLER_IP or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="controller port; default $DEJAVU_CONTROLLER_PORT or 5600")
    p.add_argument("--kv_window", type=int, default=2,
                   help="prompt stages: microbatches whose KV hand-over may be outstanding")
    p.add_argument("--no_cuda_graphs", action="store_true",
                   help="on a GPU, run decode steps and short prefills eagerly instead of replaying them as CUDA graphs")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="GPU: positions of the KV buffers allocated and captured at start-up "
                        "(default: the model's, at most 2048; longer requests get longer buffers when they come)")
    p.add_argument("--swapping", action="store_true",
                   help="microbatch swapping: keep only --resident_buffers KV buffers on the device, the caches of "
                        "the other microbatches in flight in pinned host memory, prefetched before their turn")
    p.add_argument("--resident_buffers", type=int, default=2,
                   help="with --swapping: KV buffers kept on the device (>= 2: the microbatch running and the next)")
    p.add_argument("--inflight_ubatches", type=int, default=None,
                   help="microbatches the pipeline keeps in flight (default: one per stage of its pipeline)")
    p.add_argument("--kv_memory_gb", type=float, default=None,
                   help="device memory (GB) for KV buffers; a configuration whose caches do not fit is refused "
                        "before serving (default: 90%% of the free memory on a GPU, unchecked on the CPU)")
    f = p.add_argument_group("fault tolerance (the seed's --restart --failures F)")
    f.add_argument("--with_ft", action="store_true",
                   help="replicate this stage's KV cache into the host memory of the next stage's worker (a ring)")
    f.add_argument("--recoverable", action="store_true",
                   help="survive a peer's failure: keep the caches, rejoin a rebuilt data plane (implied by "
                        "--with_ft; without it, unfinished requests restart from their prompts)")
    f.add_argument("--restart", action="store_true",
                   help="replace the failed worker --rank: restore its cache from its successor's replicas and rejoin")
    f.add_argument("--failures", type=int, default=None,
                   help="with --restart: the failure generation to join (how many failures the run has had)")
    f.add_argument("--spare", action="store_true",
                   help="a hot spare: start and warm up now, take over a failed rank when the controller says")
    f.add_argument("--listen_ip", default=None,
                   help="interface of this worker's replica store (default: the one facing the controller)")
    f.add_argument("--recovery_timeout", dest="recovery_timeout_s", type=float, default=300.0,
                   help="seconds a rebuilt data plane waits for every rank")
    return p


def worker_main(argv: list[str] | None = None) -> int:
    args = worker_parser().parse_args(argv)
    from .worker.main import WorkerOptions, run_worker

    return run_worker(WorkerOptions(**vars(args)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("controller", "worker"):
        print("usage: python -m dejavu.cli_serving {controller,worker} ...", file=sys.stderr)
        return 2
    return (controller_main if argv[0] == "controller" else worker_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
