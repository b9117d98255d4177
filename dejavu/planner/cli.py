"""``dejavu profile`` and ``dejavu plan``.

    dejavu profile --model opt-1.3b --device cuda --dtype fp16 --ubatch-size 1,4,16 --input-len 128,512,1024
    dejavu profile --model smollm2-135m --device cpu --threads 1 --comm --out smollm2-cpu.json
    dejavu plan --machines 8 --memory-gb 80 --model opt-66b --input-len 1000 --new-tokens 1000 \
        --ubatch-size 8 --profile opt-66b-h100
    dejavu plan --machines 4 --model opt-1.3b --input-len 512 --new-tokens 128 --ubatch-size 8 \
        --prompt-time 0.12 --token-time 0.01

Lists are comma-separated. A profile is a JSON file written by ``dejavu profile`` (a path, or the name of
one kept in dejavu/planner/profiles/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plan import GB, PlanError, PlanInputs, largest_ubatch, plan_split
from .profile import Profile, ProfileError, load_profile, shipped_profiles


def int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be an integer >= 1")
    return sorted(set(vals))


def float_list(text: str) -> list[float]:
    try:
        vals = [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be > 0")
    return vals


# ---- dejavu profile -------------------------------------------------------------------------------------

def profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu profile", description=(
        "Measure prompt and token times of a model shape with our engine (random weights) and write a JSON "
        "profile for `dejavu plan` and `dejavu simulate`."))
    p.add_argument("--model", required=True, help="a name from conf/model/ (shape only is enough) or a checkpoint folder")
    p.add_argument("--ubatch-size", type=int_list, default=[1, 2, 4, 8], help="microbatch sizes, e.g. 1,4,16")
    p.add_argument("--input-len", type=int_list, default=[64, 128, 256, 512], help="prompt lengths, e.g. 128,512")
    p.add_argument("--context-len", type=int_list, default=None,
                   help="context lengths of the token steps (default: the prompt lengths and twice the longest)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's); a worker gets cores / workers")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per point (median)")
    p.add_argument("--mid-layers", type=int, default=4, help="layers of the larger middle stage timed")
    p.add_argument("--no-cuda-graphs", action="store_true", help="time eager steps on a GPU")
    p.add_argument("--full-model", choices=["auto", "yes", "no"], default="auto",
                   help="also time the whole model (auto: when it fits the device)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget: past half of it, the whole-model check is skipped (the layers are enough)")
    p.add_argument("--comm", action="store_true", help="also time the data plane between two worker processes (gloo)")
    p.add_argument("--out", default=None, help="JSON path (default: profile-<model>-<device>.json)")
    p.add_argument("--plot", default=None, help="PNG of prompt vs token time (default: next to the JSON)")
    return p


def profile_main(argv: list[str]) -> int:
    a = profile_parser().parse_args(argv)
    import torch

    from ..model.config import DTYPES
    from ..model.registry import resolve_model
    from .measure import GridSpec, measure_comm, measure_profile

    dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        return _fail("profile", f"--dtype {dtype!r} is not a data type; one of {sorted(DTYPES)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        return _fail("profile", f"--device {a.device}: no CUDA device is visible; use --device cpu")
    if a.device not in ("cpu",) and not a.device.startswith("cuda"):
        return _fail("profile", f"--device {a.device!r} must be cpu or cuda")
    try:
        model = resolve_model(a.model, weights=False)
    except (ValueError, FileNotFoundError) as e:
        return _fail("profile", f"--model: {e}")
    cfg = model.config
    ctx = a.context_len or sorted(set(a.input_len) | {2 * max(a.input_len)})
    ctx = [c for c in ctx if c < cfg.max_positions] or [cfg.max_positions - 1]
    inputs = [p for p in a.input_len if p <= cfg.max_positions]
    if not inputs:
        return _fail("profile", f"--input-len: every length is beyond the model's {cfg.max_positions} positions")
    grid = GridSpec(a.ubatch_size, inputs, ctx, reps=a.reps, mid_layers=a.mid_layers)
    print(f"dejavu profile: {model.name} ({cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}) on "
          f"{a.device}, {dtype}; ubatch {grid.ubatch_sizes}, input {grid.input_lens}, context {grid.context_lens}",
          flush=True)
    full = {"auto": None, "yes": True, "no": False}[a.full_model]
    prof = measure_profile(cfg, grid, model=model.name, device=a.device, dtype=dtype, cuda_graphs=not a.no_cuda_graphs,
                           threads=a.threads, full_model=full, budget_s=a.budget_s, log=lambda s: print(s, flush=True))
    if a.comm:
        print("  data plane: two worker processes over gloo ...", flush=True)
        prof.comm = measure_comm(cfg.hidden_size, dtype=dtype, ubatch_size=max(grid.ubatch_sizes),
                                 input_len=max(grid.input_lens))
    out = Path(a.out or f"profile-{model.name}-{prof.device}.json")
    prof.save(out)
    print(profile_table(prof))
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    try:
        plot_profile(prof, plot)
        print(f"plot: {plot}")
    except ImportError as e:  # matplotlib missing on a bare GPU image: the JSON is what matters
        print(f"no plot ({e})")
    print(f"profile: {out}")
    return 0


def profile_table(prof: Profile) -> str:
    lines = [f"{prof.model} on {prof.device_name} ({prof.device}, {prof.dtype}"
             + (f", {prof.threads} threads" if prof.threads else "") + (", CUDA graphs" if prof.cuda_graphs else "")
             + f"){' — EXTRAPOLATED from a few layers' if prof.extrapolated else ''}",
             f"{'ubatch':>6} {'input':>6} {'prompt Y':>11} {'measured':>11} {'per layer':>11} | {'context':>7} "
             f"{'token t':>10} {'measured':>10} {'Y/t':>7}"]
    ctx = sorted({p.length for p in prof.token})
    for b in sorted({p.ubatch_size for p in prof.prompt}):
        for i, pp in enumerate(sorted((p for p in prof.prompt if p.ubatch_size == b), key=lambda p: p.length)):
            y = prof.prompt_time(b, pp.length)
            c = ctx[min(i, len(ctx) - 1)]
            tp = next((p for p in prof.token if p.ubatch_size == b and p.length == c), prof.token_at(b, c))
            t = prof.token_time(b, c)
            lines.append(f"{b:>6} {pp.length:>6} {_fmt(y):>11} {_fmt(pp.full_model_s):>11} {_fmt(pp.per_layer_s):>11} | "
                         f"{c:>7} {_fmt(t):>10} {_fmt(tp.full_model_s):>10} {y / t:>7.1f}")
    if prof.comm:
        c = prof.comm
        lines.append(f"data plane ({c.backend}): activation send {_fmt(c.hop_s)}"
                     + (f" + {c.hop_bytes_per_s / 1e9:.3g} GB/s" if c.hop_bytes_per_s else "")
                     + f", feedback {_fmt(c.feedback_s)}, KV hand-over {_fmt(c.kv_fixed_s)}"
                     + (f" + {c.kv_bytes_per_s / 1e9:.3g} GB/s" if c.kv_bytes_per_s else ""))
    lines.append(prof.note)
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e6:.0f} us" if x < 1e-3 else f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def plot_profile(prof: Profile, path: Path) -> Path:
    """Prompt vs token time per microbatch over microbatch sizes (the paper's Figure 2 shape)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    bs = sorted({p.ubatch_size for p in prof.prompt})
    for length in sorted({p.length for p in prof.prompt}):
        ax.plot(bs, [prof.prompt_time(b, length) * 1e3 for b in bs], marker="o", label=f"prompt, {length} tokens")
    for length in sorted({p.length for p in prof.token}):
        ax.plot(bs, [prof.token_time(b, length) * 1e3 for b in bs], marker="s", linestyle="--",
                label=f"token step, context {length}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("microbatch size")
    ax.set_ylabel("time per microbatch, whole model (ms)")
    ax.set_title(f"{prof.model}: prompt vs token time ({prof.device_name}, {prof.dtype})"
                 + (" [extrapolated]" if prof.extrapolated else ""), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


# ---- dejavu plan --------------------------------------------------------------------------------------

def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu plan", description=(
        "Split D machines into a prompt and a token pipeline (the DéjàVu planner): the balance formula, "
        "each side's memory floor, which constraint decided, the predicted throughput."))
    p.add_argument("--machines", type=int, required=True, help="D, the number of machines")
    p.add_argument("--memory-gb", type=float, default=None, help="memory per GPU in GB (10^9 bytes); none: no floors")
    p.add_argument("--gpus-per-machine", type=int, default=1)
    p.add_argument("--model", required=True, help="a name from conf/model/ (no weights needed)")
    p.add_argument("--input-len", type=int, required=True, help="P, prompt tokens")
    p.add_argument("--new-tokens", "--output-len", dest="new_tokens", type=int, required=True, help="N, new tokens")
    p.add_argument("--ubatch-size", type=int, required=True, help="b, requests per microbatch")
    p.add_argument("--dtype", default="fp16", help="weights and KV cache data type (default fp16)")
    p.add_argument("--profile", default=None, help="a `dejavu profile` JSON (path or shipped name)")
    p.add_argument("--prompt-time", type=float, default=None, help="Y seconds (instead of a profile)")
    p.add_argument("--token-time", type=float, default=None, help="t seconds (instead of a profile)")
    p.add_argument("--stream-overhead", type=float, default=1.0, help="m >= 1: prompt time with KV streaming / without")
    p.add_argument("--swapping", action="store_true", help="token stages keep 2 microbatches resident (swapping)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def times_from_profile(prof: Profile, *, model_cfg, model_name: str, ubatch: int, input_len: int, new_tokens: int,
                       gpus: int = 1, key: str = "--profile") -> tuple[float, float, str, list[str]]:
    """(Y, t, where, notes) for the plan: Y at (b, P), t at the mean context P + N/2, per machine."""
    same_shape = (prof.num_layers, prof.hidden_size, prof.family) == (model_cfg.num_layers, model_cfg.hidden_size,
                                                                      model_cfg.family)
    if prof.model != model_name and not same_shape:
        raise PlanError(f"{key}: profile '{prof.source or prof.model}' is of model {prof.model} ({prof.num_layers} "
                        f"layers, hidden {prof.hidden_size}), not of {model_name} ({model_cfg.num_layers} layers, "
                        f"hidden {model_cfg.hidden_size}); profile that model with `dejavu profile --model {model_name}`",
                        key)
    ctx = input_len + new_tokens / 2
    y = prof.prompt_time(ubatch, input_len) / gpus
    t = prof.token_time(ubatch, ctx) / gpus
    notes = [f"extrapolated beyond the profile's grid: {w}" for w in prof.outside_grid(ubatch, input_len, ctx)]
    if prof.extrapolated:
        notes.append(f"profile times are extrapolated from {prof.measured_layers} layer(s) of the shape")
    if gpus > 1:
        notes.append(f"times of one {prof.device_name} divided by {gpus} GPUs per machine (ideal tensor parallelism)")
    where = f"profile {Path(prof.source).name if prof.source else prof.model}: {prof.device_name}, {prof.dtype}"
    return y, t, where, notes


def plan_main(argv: list[str]) -> int:
    a = plan_parser().parse_args(argv)
    try:
        plan = build_plan(a)
    except (PlanError, ProfileError) as e:
        return _fail("plan", str(e))
    if a.json:
        print(json.dumps(plan.to_dict(), indent=1, default=str))
        return 0
    print("\n".join(plan.reasoning))
    mem = plan.inputs.memory_per_machine
    if mem is not None and plan.token_machines:
        s = plan.inputs.sizes
        kw = dict(input_len=a.input_len, new_tokens=a.new_tokens)
        print(f"largest microbatch the {plan.token_machines} token machine(s) hold: "
              f"{largest_ubatch(s, plan.token_machines, mem, swapping=False, **kw)} without swapping, "
              f"{largest_ubatch(s, plan.token_machines, mem, swapping=True, **kw)} with swapping")
    print(f"\ntopology: num_prompt_peers={plan.prompt_machines} num_token_peers={plan.token_machines}")
    return 0


def build_plan(a: argparse.Namespace):
    from ..model.config import DTYPES
    from ..model.registry import resolve_model
    from .sizes import model_sizes

    if a.machines < 1:
        raise PlanError(f"--machines={a.machines} must be >= 1", "--machines")
    if a.memory_gb is not None and a.memory_gb <= 0:
        raise PlanError(f"--memory-gb={a.memory_gb:g} must be > 0", "--memory-gb")
    if a.dtype not in DTYPES:
        raise PlanError(f"--dtype={a.dtype!r} is not a data type; one of {sorted(DTYPES)}", "--dtype")
    try:
        model = resolve_model(a.model, weights=False)
    except (ValueError, FileNotFoundError) as e:
        raise PlanError(f"--model: {e}", "--model") from None
    notes: list[str] = []
    if a.profile:
        if a.prompt_time is not None or a.token_time is not None:
            raise PlanError("give either --profile or --prompt-time/--token-time, not both", "--profile")
        prof = load_profile(a.profile, "--profile")
        y, t, where, notes = times_from_profile(prof, model_cfg=model.config, model_name=model.name,
                                                ubatch=a.ubatch_size, input_len=a.input_len, new_tokens=a.new_tokens,
                                                gpus=a.gpus_per_machine)
    elif a.prompt_time is not None and a.token_time is not None:
        y, t, where = a.prompt_time, a.token_time, "given"
    else:
        names = ", ".join(p.stem for p in shipped_profiles()) or "none"
        raise PlanError(f"--profile: the planner needs prompt and token times: a profile (`dejavu profile`; shipped: "
                        f"{names}) or both --prompt-time and --token-time", "--profile")
    memory = a.memory_gb * GB * a.gpus_per_machine if a.memory_gb is not None else None
    inp = PlanInputs(machines=a.machines, sizes=model_sizes(model.config, a.dtype), input_len=a.input_len,
                     new_tokens=a.new_tokens, ubatch_size=a.ubatch_size, prompt_time_s=y, token_time_s=t,
                     memory_per_machine=memory, gpus_per_machine=a.gpus_per_machine, stream_overhead=a.stream_overhead,
                     swapping=a.swapping, model=model.name, times_from=where)
    plan = plan_split(inp)
    if notes:
        plan.notes.extend(notes)
        plan.reasoning[3:3] = [f"note: {n}" for n in notes]
    return plan


def _fail(cmd: str, msg: str) -> int:
    print(f"dejavu {cmd}: error: {msg}", file=sys.stderr)
    return 2
