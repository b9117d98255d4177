"""Fault tolerance: the same workload with 0, 1, 2 and 3 failures, with DéjàVu's replication and without.

Each point is a real `dejavu-run` (controller + workers as processes); a failure is a SIGKILL of a worker
mid-decode from the runner (at evenly spaced decode steps of the workload), which restarts it. With ``failure.with_ft=true`` the stages replicate their
KV caches into their successors' host memory and a failure resumes from the last replicated step; without
it (the paper's baseline) every unfinished request starts again from its prompt. Printed side by side:
completion time, p50/p99 latency, detection and recovery time, tokens recomputed, and the replication
overhead on failure-free throughput (with_ft vs not, failure-free, same run of this script):

    python bench/failures.py                                   # tiny random Llama, 3 CPU stages
    python bench/failures.py --model smollm2-135m --requests 16 --output-len 32
    python bench/failures.py --device cuda --model opt-1.3b    # several stage processes sharing one GPU (gloo)
    python bench/failures.py --failures 0,1 --out /tmp/f.json  # smoke
    python bench/failures.py --failures 0,1 --spares 1         # with_ft takes a hot spare instead of a restart
    python bench/failures.py --failures 0 --split-overhead     # + the recoverable data plane without replication

Goals (the issue's): replication overhead <= 2% of failure-free throughput; one failure costs at most the
restart time + 10% of the failure-free completion time with replication, and clearly less than without.
Every run must give the failure-free run's outputs (the script exits 1 if not).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import entry_point, model_overrides, run_and_read, tiny_llama  # noqa: E402
from report import write_json  # noqa: E402

PRESETS = {0: "none", 1: "kill_one", 2: "kill_two", 3: "kill_three"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="registry name, HF folder or .gguf (default: a tiny random Llama)")
    p.add_argument("--stages", type=int, default=3, help="baseline pipeline stages (workers)")
    p.add_argument("--failures", default="0,1,2,3", help="failure counts to run (0..3)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--ubatch-size", type=int, default=2)
    p.add_argument("--rps", type=float, default=None, help="Poisson arrivals (default: all at t=0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (workers share the GPU; the data plane is gloo)")
    p.add_argument("--spares", type=int, default=0,
                   help="hot spares for the with_ft runs (failure.spares): a failure takes one instead of "
                        "waiting for a restarted process to load its stage; the baseline still restarts")
    p.add_argument("--split-overhead", action="store_true",
                   help="also run the failure-free workload on the recoverable data plane without replication "
                        "(failure.with_ft=false and a failure that never fires), to split the overhead of with_ft "
                        "into the data plane's and the replication's")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every point, alternating, and report each point's median run (noisy machines)")
    p.add_argument("--out", default="results/bench/failures.json")
    a = p.parse_args(argv)
    a.failures = [int(x) for x in a.failures.split(",")]
    if any(n not in PRESETS for n in a.failures):
        p.error(f"--failures: each count must be one of {sorted(PRESETS)}")
    if a.spares < 0:
        p.error(f"--spares={a.spares} must be >= 0")
    return a


NEVER = "failure.failures=[{rank: -1, after_tokens: 1000000000}]"  # keeps the recoverable plane, never fires
MODES = {"with_ft": "with_ft", "none": "none", "plane": "plane only"}  # the table's "replication" column


def run_point(a, model: list[str], failures: int, mode: str, run_dir: Path) -> dict:
    with_ft = mode == "with_ft"
    work = (["workload=poisson", f"workload.rps={a.rps}"] if a.rps else
            ["workload=fixed", "workload.prompts=null", "workload.chat_template=false"])
    cmd = [*entry_point(), *model, "topology=baseline", f"topology.num_peers={a.stages}",
           f"topology.num_token_peers={a.stages}", f"topology.ubatch_size={a.ubatch_size}", *work,
           f"workload.num_requests={a.requests}", f"workload.input_len={a.input_len}",
           f"workload.output_len={a.output_len}", f"failure={PRESETS[failures]}", f"failure.with_ft={str(with_ft).lower()}",
           *(scenario_override(failures, a.output_len) if mode != "plane" else [NEVER]),
           *([f"failure.spares={a.spares}"] if with_ft and a.spares else []),
           "failure.heartbeat_interval_s=0.25", f"failure.heartbeat_timeout_s={a.heartbeat_timeout}",
           f"backend.device={a.device}", *dtype_overrides(a.device), "logger=none", "print_answers=false", "runner.echo=false",
           f"runner.timeout_s={a.timeout}", f"hydra.run.dir={run_dir}"]
    return run_and_read(cmd, run_dir, a.timeout)


def dtype_overrides(device: str) -> list[str]:
    d = "fp16" if device.startswith("cuda") else "fp32"  # the GPU runs in the dtype a user serves in
    return [f"backend.weights_data_type={d}", f"backend.inference_data_type={d}"]


def scenario_override(failures: int, output_len: int) -> list[str]:
    """The presets' failures moved to evenly spaced decode steps of this workload (the last worker, then
    worker 1, alternating), so a failure lands mid-generation whatever --output-len is."""
    if failures == 0:
        return []
    specs = [f"{{rank: {-1 if i % 2 == 0 else 1}, phase: decode, step: {(i + 1) * output_len // (failures + 1)}}}"
             for i in range(failures)]
    return [f"failure.failures=[{', '.join(specs)}]"]


def row(failures: int, mode: str, s: dict) -> dict:
    rec = s.get("recovery") or {}
    fails = s.get("failures") or []
    return {"failures": failures, "mode": mode, "with_ft": mode == "with_ft", "completion_s": s.get("makespan_s"),
            "throughput_tok_s": s["throughput"]["output_tokens_per_s"],
            "latency_p50_s": s["latency_s"]["p50"], "latency_p99_s": s["latency_s"]["p99"],
            "detection_s": rec.get("detection_s_mean"), "recovery_s": rec.get("recovery_s_mean"),
            "downtime_s": rec.get("downtime_s_total"), "tokens_recomputed": rec.get("tokens_recomputed", 0),
            "replication_bytes": rec.get("replication_bytes", 0), "restarts": [f["restart"] for f in fails],
            "outputs_sha256": s["outputs_sha256"]}


def table(rows: list[dict]) -> str:
    def num(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    head = ["failures", "replication", "completion s", "tok/s", "p50 s", "p99 s", "detect s", "recover s",
            "tokens recomputed", "replicated MB", "back by"]
    lines = [head]
    for r in rows:
        lines.append([str(r["failures"]), MODES[r["mode"]], num(r["completion_s"]),
                      num(r["throughput_tok_s"]), num(r["latency_p50_s"]), num(r["latency_p99_s"]),
                      num(r["detection_s"]), num(r["recovery_s"]), str(r["tokens_recomputed"]),
                      num((r["replication_bytes"] or 0) / 1e6), ",".join(r["restarts"]) or "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def goals(rows: list[dict]) -> dict:
    """The issue's goals, from this run's rows (None where a needed point was not run)."""
    by = {(r["failures"], r["mode"]): r for r in rows}
    out: dict = {}

    def cost(mode: str, against: str) -> float:
        return 1 - by[(0, mode)]["throughput_tok_s"] / by[(0, against)]["throughput_tok_s"]

    if (0, "with_ft") in by and (0, "none") in by:
        out["replication_overhead"] = cost("with_ft", "none")
        out["replication_overhead_ok"] = out["replication_overhead"] <= 0.02
        if (0, "plane") in by:  # the split: the recoverable data plane alone, then the replication on top of it
            out["plane_overhead"] = cost("plane", "none")
            out["replication_over_plane"] = cost("with_ft", "plane")
    if (1, "with_ft") in by and (0, "with_ft") in by:
        base = by[(0, "with_ft")]["completion_s"]
        one = by[(1, "with_ft")]
        restart = one["recovery_s"] or 0.0
        out["one_failure_extra_s"] = one["completion_s"] - base
        out["one_failure_budget_s"] = restart + (one["detection_s"] or 0.0) + 0.10 * base
        out["one_failure_ok"] = out["one_failure_extra_s"] <= out["one_failure_budget_s"]
        if (1, "none") in by:
            out["one_failure_baseline_extra_s"] = by[(1, "none")]["completion_s"] - base
            out["less_than_baseline"] = out["one_failure_extra_s"] < out["one_failure_baseline_extra_s"]
    return out


def result_of(a, runs: dict[tuple[int, str], list[dict]], complete: bool) -> dict:
    """Each point's median run by completion time (the same run's numbers stay together), and the goals."""
    rows = [dict(sorted(rs, key=lambda r: r["completion_s"])[len(rs) // 2]) for rs in runs.values()]
    for r in rows:
        r["completion_s_all"] = [x["completion_s"] for x in runs[(r["failures"], r["mode"])]]
    digests = sorted({r["outputs_sha256"] for rs in runs.values() for r in rs})
    return {"args": vars(a), "complete": complete, "rows": rows, "goals": goals(rows), "digests": digests,
            "digests_equal": len(digests) == 1}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    out = Path(a.out)
    runs_dir = out.with_suffix("") / time.strftime("%Y-%m-%d_%H-%M-%S")
    tmp = None
    if a.model is None:
        tmp = Path(tempfile.mkdtemp(prefix="dejavu-bench-"))
        model = model_overrides(str(tiny_llama(tmp / "tiny-llama")))
    else:
        model = model_overrides(a.model)
    runs: dict[tuple[int, str], list[dict]] = {}
    try:
        for k in range(a.rounds):
            for n in a.failures:
                for mode in ("with_ft", "none", *(["plane"] if n == 0 and a.split_overhead else [])):
                    run_dir = (runs_dir / f"{n}-failures-{mode}-{k}").resolve()
                    print(f"round {k + 1}/{a.rounds}: {n} failure(s), {MODES[mode]} ...", flush=True)
                    runs.setdefault((n, mode), []).append(row(n, mode, run_point(a, model, n, mode, run_dir)))
                    # After every run, so a bench cut short (a timeout, a failed point) keeps what it measured.
                    write_json(out, result_of(a, runs, complete=False))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = result_of(a, runs, complete=True)
    rows, g, digests = result["rows"], result["goals"], result["digests"]
    print(f"\n== {a.stages} stages on {a.device}, {a.requests} requests, input {a.input_len} / output "
          f"{a.output_len}, ubatch {a.ubatch_size}, median of {a.rounds} round(s)\n{table(rows)}")
    for k, v in g.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    print("outputs_sha256 " + ("equal across runs" if len(digests) == 1 else f"DIFFER: {sorted(digests)}"))
    write_json(out, result)
    print(f"wrote {out} (run folders under {runs_dir})")
    return result


if __name__ == "__main__":
    try:
        res = main()
    except RuntimeError as e:
        sys.exit(f"bench/failures.py: {e}")
    sys.exit(0 if res["digests_equal"] else 1)
