"""The ``dejavu`` console script: one entry point, one subcommand per job.

    dejavu generate     single-process generation (the engine on its own)
    dejavu controller   the serving controller (seed flags)
    dejavu worker       one serving worker (seed flags)
    dejavu compare      side-by-side comparison of run or sweep folders
    dejavu profile      prompt and token times of a model shape, measured with our engine (JSON profile)
    dejavu plan         how many of D machines should do prompts and how many tokens (the planner)
    dejavu simulate     discrete-event simulation of the baseline and disaggregated pipelines
    dejavu make-trace   a synthetic request-size trace in the seed's format

Subcommands import their modules lazily so that ``dejavu generate`` starts without the serving stack.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SUBCOMMANDS = {
    # name: (module, function taking argv, one-line help)
    "generate": ("dejavu.cli", "generate_main", "generate text with the single-process engine"),
    "controller": ("dejavu.cli_serving", "controller_main", "start the serving controller"),
    "worker": ("dejavu.cli_serving", "worker_main", "start one serving worker"),
    "compare": ("dejavu.results.compare", "main", "compare run or sweep folders"),
    "profile": ("dejavu.planner.cli", "profile_main", "measure prompt/token times of a model shape (JSON profile)"),
    "plan": ("dejavu.planner.cli", "plan_main", "split D machines into prompt and token pipelines"),
    "simulate": ("dejavu.simulator.cli", "main", "simulate the baseline and disaggregated pipelines"),
    "make-trace": ("dejavu.planner.tracegen", "main", "write a synthetic [prompt, new tokens] trace"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<11} {helptext}" for name, (_, _, helptext) in SUBCOMMANDS.items()]
        print("usage: dejavu {" + ",".join(SUBCOMMANDS) + "} ...\n\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ndejavu: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module, func, _ = SUBCOMMANDS[argv[0]]
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


def generate_parser() -> argparse.ArgumentParser:
    from .model import switches

    p = argparse.ArgumentParser(prog="dejavu generate", description="Generate with the single-process engine.",
                                epilog=switches.table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--model", default="smollm2-135m", help="a name from conf/model/, a checkpoint folder or a .gguf file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--stages", type=int, default=1, help="split the model into this many stages, run in turn")
    return p


def generate_main(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    from .engine import Engine, build_stages
    from .model.registry import resolve_model
    from .model.tokenizer import decode, encode_prompts, load_tokenizer
    from .model.weights import HFCheckpoint
    from .sampling import SamplingParams

    try:
        model = resolve_model(args.model)
        if not model.has_weights:
            raise ValueError(f"model {model.name!r} is a shape-only entry (conf/model/{model.name}.yaml: its shapes, "
                             f"no weights, no tokenizer), so there is nothing to generate text with; pick a model "
                             f"with weights (e.g. --model smollm2-135m, a checkpoint folder or a .gguf file). "
                             f"Shape-only models serve with random weights for timings: dejavu-run "
                             f"model={model.name} model.weights=random")
        tokenizer = load_tokenizer(model.tokenizer_dir, model_name=model.name)
        prompt_ids = encode_prompts(tokenizer, args.prompts, chat=args.chat)
        stop = tuple(model.config.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        params = SamplingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed, stop_token_ids=stop)
        stages = build_stages(model.config, HFCheckpoint(model.checkpoint_dir), args.stages,
                              dtype=args.dtype, device=args.device)
        results = Engine(stages).generate(prompt_ids, params)
    except (ValueError, FileNotFoundError) as e:
        print(f"dejavu generate: error: {e}", file=sys.stderr)
        return 2
    for prompt, gen in zip(args.prompts, results):
        text = decode(tokenizer, gen.output_ids)
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_ids": gen.prompt_ids, "output_ids": gen.output_ids,
                              "text": text, "finish_reason": gen.finish_reason}))
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
