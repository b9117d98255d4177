"""``dejavu simulate``: the baseline and disaggregated pipelines under a workload, before renting machines.

    dejavu simulate --profile opt-1.3b-h100 --machines 4 --ubatch-size 8 --workload poisson --rps 20 \
        --input-len 512 --output-len 128 --num-requests 400
    dejavu simulate --profile P --machines 4 --split baseline,auto,1+3 --chrome-trace sim.json
    dejavu simulate --times 0.4,0.02 --machines 8 --ubatch-size 8 --input-len 1000 --output-len 200 --sweep
    dejavu simulate --profile P --machines 4 --failure-rate 0.5 --restart-s 30      # with / without replication
    dejavu simulate --profile P --machines 4 --swap-gbps 25 --ubatch-size 32        # swapping on the token side

Times come from a profile (``dejavu profile``; each stage priced for its layers) or from ``--times Y,t[,c]``
(whole-model prompt and token-step times of one microbatch, and the KV hand-over of one microbatch,
split evenly over a pipeline's stages). The workload takes the same keys as ``conf/workload``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from ..planner.cli import float_list, times_from_profile
from ..planner.plan import GB, PlanError, PlanInputs, plan_split
from ..planner.profile import CommTiming, Profile, ProfileError, load_profile
from .costs import ProfileCosts, WholeModelCosts
from .engine import FailureModel, SimError, SimResult, SimSetup, SwapModel, requests_from, simulate
from .sweep import Split, all_splits, plot_sweep, run_sweep, sweep_table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu simulate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_argument_group("times")
    src.add_argument("--profile", default=None, help="a `dejavu profile` JSON (path or shipped name)")
    src.add_argument("--times", type=float_list, default=None, help="Y,t[,c] seconds: whole-model prompt, token step, KV")
    src.add_argument("--model", default=None, help="conf/model name (default: the profile's model)")
    src.add_argument("--dtype", default=None, help="for model sizes (default: the profile's, else fp16)")
    src.add_argument("--hop-ms", type=float, default=None, help="activation send between stages (overrides the profile)")
    src.add_argument("--feedback-ms", type=float, default=None, help="sampler -> leader (overrides the profile)")
    src.add_argument("--kv-gbps", type=float, default=None, help="KV hand-over rate GB/s (overrides the profile)")
    topo = p.add_argument_group("machines")
    topo.add_argument("--machines", type=int, required=True, help="D")
    topo.add_argument("--split", default="baseline,auto",
                      help="comma-separated: baseline, auto (the planner's pick) or M+K (default baseline,auto)")
    topo.add_argument("--ubatch-size", type=int, default=8)
    topo.add_argument("--memory-gb", type=float, default=None, help="per GPU, for the planner's memory floors")
    topo.add_argument("--gpus-per-machine", type=int, default=1)
    topo.add_argument("--stream-overhead", type=float, default=1.0)
    topo.add_argument("--kv-window", type=int, default=2, help="hand-overs a prompt stage may have outstanding")
    wl = p.add_argument_group("workload (as conf/workload)")
    wl.add_argument("--workload", default="poisson", choices=["fixed", "trace", "poisson", "timestamps"])
    wl.add_argument("--num-requests", type=int, default=None, help="default 200 (null for a whole trace)")
    wl.add_argument("--input-len", type=int, default=512)
    wl.add_argument("--output-len", type=int, default=128)
    wl.add_argument("--rps", type=float, default=1.0)
    wl.add_argument("--poisson", action="store_true", help="Poisson arrivals on top of fixed/trace sizes")
    wl.add_argument("--arrival-seed", type=int, default=0)
    wl.add_argument("--trace", default=None, help="input_sizes_file: JSON [[prompt_size, new_tokens], ...]")
    wl.add_argument("--timestamps", default=None, help="input_timestamps_file: JSON arrival seconds")
    feat = p.add_argument_group("features")
    feat.add_argument("--swap-gbps", type=float, default=None, help="microbatch swapping at this host<->device GB/s")
    feat.add_argument("--resident", type=int, default=2, help="microbatches a swapping token stage keeps resident")
    feat.add_argument("--failure-rate", type=float, default=None, help="failures per machine-hour: runs each split "
                      "without and with replication")
    feat.add_argument("--detect-s", type=float, default=2.0)
    feat.add_argument("--restart-s", type=float, default=30.0)
    feat.add_argument("--replication-overhead", type=float, default=0.02, help="token-step cost of replication")
    feat.add_argument("--failure-seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--chrome-trace", default=None, help="Chrome trace JSON path (one per split: -<split> suffix)")
    out.add_argument("--json", default=None, help="write every result as JSON here")
    out.add_argument("--sweep", action="store_true", help="every split over a range of rates, plotted")
    out.add_argument("--rates", type=float_list, default=None, help="sweep rates req/s (default: around the planner's)")
    out.add_argument("--plot", default="simulate-sweep.png", help="sweep PNG")
    out.add_argument("--price-per-hour", type=float, default=None, help="machine price, for the sweep's cost")
    return p


class CliError(ValueError):
    pass


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return run(a)
    except (CliError, PlanError, ProfileError, SimError, ValueError) as e:
        print(f"dejavu simulate: error: {e}", file=sys.stderr)
        return 2


def _workload(a, num_requests: int | None, rps: float | None = None):
    from ..workload import WorkloadSpec, WorkloadError, sizes_and_arrivals

    spec = WorkloadSpec(kind=a.workload, num_requests=num_requests, input_len=a.input_len, output_len=a.output_len,
                        input_sizes_file=a.trace, poisson=a.poisson or rps is not None,
                        rps=rps if rps is not None else a.rps, arrival_seed=a.arrival_seed,
                        input_timestamps_file=a.timestamps)
    try:
        sizes, arrivals = sizes_and_arrivals(spec)
    except WorkloadError as e:
        raise CliError(str(e).replace("workload.input_sizes_file", "--trace").replace(
            "workload.input_timestamps_file", "--timestamps").replace("workload.", "--").replace("_", "-")) from None
    return requests_from(sizes, arrivals)


def _times(a, model_cfg, model_name: str, prof: Profile | None, reqs) -> tuple[float, float, str, list[str]]:
    """Y and t for the planner at the workload's mean sizes."""
    P = round(sum(r.prompt_len for r in reqs) / len(reqs))
    N = round(sum(r.new_tokens for r in reqs) / len(reqs))
    if prof is not None:
        return times_from_profile(prof, model_cfg=model_cfg, model_name=model_name, ubatch=a.ubatch_size,
                                  input_len=P, new_tokens=N, gpus=a.gpus_per_machine)
    return a.times[0], a.times[1], "given", []


def run(a) -> int:
    from ..model.registry import resolve_model
    from ..planner.sizes import model_sizes

    if a.machines < 1:
        raise CliError(f"--machines={a.machines} must be >= 1")
    if a.ubatch_size < 1:
        raise CliError(f"--ubatch-size={a.ubatch_size} must be >= 1")
    if (a.profile is None) == (a.times is None):
        raise CliError("give exactly one of --profile (a `dejavu profile` JSON) and --times Y,t[,c]")
    if a.times is not None and len(a.times) not in (2, 3):
        raise CliError(f"--times takes Y,t or Y,t,c (seconds), got {len(a.times)} values")
    prof = load_profile(a.profile, "--profile") if a.profile else None
    name = a.model or (prof.model if prof else None)
    if name is None:
        raise CliError("--model: which model (a conf/model name) the times are for: it sets the layers and sizes")
    try:
        model = resolve_model(name, weights=False)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"--model: {e}") from None
    dtype = a.dtype or (prof.dtype if prof else "fp16")
    sizes = model_sizes(model.config, dtype)
    L = model.config.num_layers
    n_req = a.num_requests if a.num_requests is not None else (None if a.trace and a.workload == "trace" else 200)
    reqs = _workload(a, n_req)
    comm = _comm(a, prof)

    Y, t, where, notes = _times(a, model.config, model.name, prof, reqs)
    P = round(sum(r.prompt_len for r in reqs) / len(reqs))
    N = round(sum(r.new_tokens for r in reqs) / len(reqs))
    plan = None
    if a.machines >= 2:
        memory = a.memory_gb * GB * a.gpus_per_machine if a.memory_gb is not None else None
        plan = plan_split(PlanInputs(machines=a.machines, sizes=sizes, input_len=P, new_tokens=N,
                                     ubatch_size=a.ubatch_size, prompt_time_s=Y, token_time_s=t, memory_per_machine=memory,
                                     gpus_per_machine=a.gpus_per_machine, stream_overhead=a.stream_overhead,
                                     model=model.name, times_from=where))
    pick = Split(plan.prompt_machines, plan.token_machines) if plan else Split(0, 1)

    def costs_for(sp: Split):
        if prof is not None:
            return ProfileCosts(prof, sp.prompt, sp.token, comm=comm, gpus_per_stage=a.gpus_per_machine)
        c = a.times[2] if len(a.times) > 2 else 0.0
        kv = sizes.kv_bytes(a.ubatch_size * (P + N))
        return WholeModelCosts(Y, t, c, sp.prompt, sp.token, hop_s=comm.hop_s if comm else 0.0,
                               feedback_s=comm.feedback_s if comm else 0.0, kv_bytes_per_microbatch=kv)

    swap = SwapModel(a.swap_gbps * 1e9, a.resident) if a.swap_gbps else None
    print(f"model {model.name} ({L} layers, {dtype}), times from {where}: Y = {Y * 1e3:.4g} ms, t = {t * 1e3:.4g} ms "
          f"per microbatch of {a.ubatch_size}; {len(reqs)} requests ({a.workload}"
          + (f", {a.rps:g} req/s" if a.workload == "poisson" or a.poisson else "") + f"), mean P={P}, N={N}")
    for n in notes:
        print(f"note: {n}")
    if plan is not None:
        print("planner: " + plan.reasoning[-2 if plan.disaggregated else -1].split(": ", 1)[-1])

    if a.sweep:
        return _sweep(a, plan, pick, costs_for, L, swap)

    splits = _splits(a.split, a.machines, pick, L)
    results: dict[str, SimResult] = {}
    for sp in splits:
        variants = [("", None)]
        if a.failure_rate:
            fm = FailureModel(a.failure_rate, a.detect_s, a.restart_s, False, a.replication_overhead, a.failure_seed)
            variants = [(" no-FT", fm), (" FT", replace(fm, replication=True))]
        for suffix, fm in variants:
            setup = SimSetup(sp.prompt, sp.token, a.ubatch_size, costs_for(sp), kv_window=a.kv_window, swap=swap,
                             failures=fm, trace=True)
            results[sp.label + suffix] = simulate(reqs, setup)
    print(table(results, pick))
    if a.chrome_trace:
        for label, r in results.items():
            path = _suffixed(Path(a.chrome_trace), label) if len(results) > 1 else Path(a.chrome_trace)
            write_chrome_trace(r, path, {"simulated": True, "split": label, "model": model.name})
            print(f"Chrome trace ({label}): {path}")
    if a.json:
        Path(a.json).write_text(json.dumps({"plan": plan.to_dict() if plan else None,
                                            "results": {k: v.summary for k, v in results.items()}},
                                           indent=1, default=str) + "\n")
        print(f"wrote {a.json}")
    return 0


def _comm(a, prof: Profile | None) -> CommTiming | None:
    base = prof.comm if prof is not None else None
    if a.hop_ms is None and a.feedback_ms is None and a.kv_gbps is None:
        return base
    base = base or CommTiming(backend="given", hop_s=0.0)
    return replace(base, hop_s=a.hop_ms / 1e3 if a.hop_ms is not None else base.hop_s,
                   hop_bytes_per_s=None if a.hop_ms is not None else base.hop_bytes_per_s,
                   feedback_s=a.feedback_ms / 1e3 if a.feedback_ms is not None else base.feedback_s,
                   kv_bytes_per_s=a.kv_gbps * 1e9 if a.kv_gbps is not None else base.kv_bytes_per_s,
                   kv_fixed_s=0.0 if a.kv_gbps is not None else base.kv_fixed_s)


def _splits(text: str, D: int, pick: Split, L: int) -> list[Split]:
    out = []
    for part in [x.strip() for x in text.split(",") if x.strip()]:
        if part == "baseline":
            sp = Split(0, D)
        elif part == "auto":
            sp = pick
        else:
            m = re.fullmatch(r"(\d+)\+(\d+)", part)
            if not m or int(m[1]) < 1 or int(m[2]) < 1 or int(m[1]) + int(m[2]) != D:
                raise CliError(f"--split: {part!r} is not baseline, auto or M+K with M, K >= 1 and M+K = --machines ({D})")
            sp = Split(int(m[1]), int(m[2]))
        if max(sp.prompt, sp.token) > L:
            raise CliError(f"--split {sp.label}: a pipeline of more than {L} stages (the model's layers)")
        if sp not in out:
            out.append(sp)
    return out


def _sweep(a, plan, pick: Split, costs_for, L: int, swap) -> int:
    if a.machines < 2:
        raise CliError("--sweep compares splits: it needs --machines >= 2")
    rates = a.rates
    if rates is None:
        top = plan.requests_per_s if plan else 1.0
        rates = [round(top * f, 4) for f in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)]
    n = a.num_requests or 200
    print(f"sweep: {len(all_splits(a.machines, L))} splits x {len(rates)} rates, {n} Poisson requests each")
    points = run_sweep(all_splits(a.machines, L), rates, lambda r: _workload(a, n, rps=r), costs_for, a.ubatch_size,
                       price_per_hour=a.price_per_hour, setup_kw={"kv_window": a.kv_window, "swap": swap})
    print(sweep_table(points, pick, a.price_per_hour))
    try:
        path = plot_sweep(points, Path(a.plot), pick=pick, price_per_hour=a.price_per_hour,
                          title=f"{a.machines} machines, microbatch {a.ubatch_size}: every split (simulated)")
        print(f"plot: {path}")
    except ImportError as e:
        print(f"no plot ({e})")
    if a.json:
        Path(a.json).write_text(json.dumps([{**p.__dict__, "split": p.split.label} for p in points], indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


def _suffixed(path: Path, label: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9+_-]+", "-", label).strip("-")
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def write_chrome_trace(result: SimResult, path: Path, metadata: dict) -> Path:
    """The simulated timeline in the format the runs write (``trace.json``: dejavu.results.trace)."""
    from ..results.trace import write_trace

    span = (result.summary["span_s"]["start"], result.summary["span_s"]["end"])
    return write_trace(path, result.events(), span, metadata)


def _short(stage: str) -> str:
    return stage[0] + re.sub(r"\D", "", stage)  # stage2 -> s2, prompt0 -> p0, token1 -> t1


def table(results: dict[str, SimResult], pick: Split | None = None) -> str:
    def num(v, fmt="{:.4g}"):
        return "-" if v is None else fmt.format(v)

    rows = [
        ("requests", lambda s: f"{s['counts']['completed']}/{s['counts']['total']}"),
        ("throughput req/s", lambda s: num(s["throughput"]["requests_per_s"])),
        ("throughput tok/s", lambda s: num(s["throughput"]["output_tokens_per_s"])),
        ("TTFT p50 s", lambda s: num(s["ttft_s"]["p50"])), ("TTFT p99 s", lambda s: num(s["ttft_s"]["p99"])),
        ("TPOT p50 s", lambda s: num(s["tpot_s"]["p50"])),
        ("latency p50 s", lambda s: num(s["latency_s"]["p50"])), ("latency p95 s", lambda s: num(s["latency_s"]["p95"])),
        ("latency p99 s", lambda s: num(s["latency_s"]["p99"])),
        ("norm. latency p50 s/tok", lambda s: num(s["normalized_latency_s"]["p50"])),
        ("makespan s", lambda s: num(s["makespan_s"])),
        ("bubble mean", lambda s: num(s["bubble_fraction_mean"], "{:.2f}")),
        ("busy per stage", lambda s: " ".join(f"{_short(k)} {v['busy_fraction']:.2f}" for k, v in s["stages"].items())),
        ("prompt-induced bubbles", lambda s: num((s.get("prompt_bubbles") or {}).get("fraction"), "{:.3f}")),
    ]
    if any("swapping" in r.summary for r in results.values()):
        rows.append(("swap stall s", lambda s: num((s.get("swapping") or {}).get("stall_s"))))
    if any("failures" in r.summary for r in results.values()):
        rows += [("failures", lambda s: num((s.get("failures") or {}).get("count"), "{}")),
                 ("time lost s", lambda s: num((s.get("failures") or {}).get("lost_s"))),
                 ("tokens recomputed", lambda s: num((s.get("failures") or {}).get("tokens_recomputed"), "{}"))]
    labels = list(results)
    head = [(lab + (" *" if pick is not None and lab.split(" no-FT")[0].split(" FT")[0] == pick.label else ""))
            for lab in labels]
    cells = [["simulated", *head]] + [[name, *(f(results[lab].summary) for lab in labels)] for name, f in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]

    def fmt(c):
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))

    out = [fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])]
    if pick is not None and any(h.endswith(" *") for h in head):
        out.append("* the planner's pick")
    return "\n".join(out)
