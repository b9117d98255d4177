"""The simulator against reality: real `dejavu-run` runs on this machine next to `dejavu simulate`'s prediction.

For one model and one Poisson workload it

1. profiles the model with `dejavu profile` on this machine (the threads a worker of the runs gets, the
   run's microbatch size and lengths, and the gloo data plane between two worker processes: `--comm`);
2. runs each topology for real with `dejavu-run` (baseline and disaggregated, 2-4 stages);
3. simulates the same topology, the same requests and the same arrival times twice: from that profile
   alone, and from the run's own step times (the mean prefill, decode and KV-receive interval of each
   stage in its events.jsonl, data-plane latencies from the profile);
4. prints measured, predicted and predicted/measured for throughput and p50 latency (and TTFT, TPOT),
   and exits 1 if a throughput or p50-latency ratio of the run-step prediction is outside 1 +- --tolerance
   (with --strict, the profile-only one too).

The two predictions separate the two sources of error: the run-step prediction checks the simulator's
model (scheduling, queueing, rendezvous sends, hand-overs, feedback); the profile-only one adds the
profile's view of the step times, which on a machine shared with other jobs drifts with their load (the
load average is printed).

    python bench/simulator_check.py                              # SmolLM2-135M shape, 2 workers: 2 vs 1+1
    python bench/simulator_check.py --topologies 0+2,1+1,0+3,1+2  # also 3 stages (3 workers on this machine)
    python bench/simulator_check.py --model /path/to/hf_folder --rps 2 --requests 24

The default model is a random Llama of SmolLM2-135M's shape saved in a temporary folder (no download, no
GGUF conversion); any conf/model name or checkpoint folder works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import entry_point, model_overrides  # noqa: E402
from report import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRICS = (("throughput req/s", ("throughput", "requests_per_s")), ("latency p50 s", ("latency_s", "p50")),
           ("TTFT p50 s", ("ttft_s", "p50")), ("TPOT p50 s", ("tpot_s", "p50")),
           ("latency p95 s", ("latency_s", "p95")), ("makespan s", ("makespan_s",)))
CHECKED = ("throughput req/s", "latency p50 s")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="conf/model name or checkpoint folder (default: a random "
                   "Llama of SmolLM2-135M's shape)")
    p.add_argument("--topologies", default="0+2,1+1", help="prompt+token stages, 0+K = baseline (default 0+2,1+1)")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--ubatch-size", type=int, default=2)
    p.add_argument("--rps", type=float, default=3.0, help="Poisson arrival rate")
    p.add_argument("--arrival-seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.2)
    p.add_argument("--strict", action="store_true",
                   help="also hold the profile-only prediction to the tolerance (on a machine nobody else loads)")
    p.add_argument("--profile", default=None, help="use this profile instead of measuring one")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="results/bench/simulator_check.json")
    return p.parse_args(argv)


def smollm2_shaped_llama(folder: Path) -> Path:
    """A random Llama with SmolLM2-135M's shapes (30 layers, hidden 576, GQA 9/3, vocab 49152)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def topologies(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        m, _, k = part.strip().partition("+")
        if not (m.isdigit() and k.isdigit() and int(k) >= 1):
            raise SystemExit(f"--topologies: {part!r} is not M+K (M prompt stages, 0 for the baseline; K >= 1)")
        out.append((int(m), int(k)))
    return out


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)  # what runners/plan.cpu_threads_env gives each worker


def profile(a, model: str, threads: int, out: Path) -> Path:
    cmd = [sys.executable, "-m", "dejavu", "profile", "--model", model, "--device", "cpu", "--threads", str(threads),
           "--ubatch-size", str(a.ubatch_size), "--input-len", str(a.input_len), "--context-len",
           f"{a.input_len},{a.input_len + a.output_len}", "--reps", "7", "--comm", "--full-model", "no",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
    if r.returncode != 0:
        raise RuntimeError(f"profile failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(r.stdout.strip().split("\n", 1)[-1])
    return out


def real_run(a, model_args: list[str], prompt: int, token: int, run_dir: Path) -> dict:
    topo = "baseline" if prompt == 0 else "disagg"
    cmd = [*entry_point(), *model_args, f"topology={topo}", f"topology.num_peers={prompt + token}",
           f"topology.num_prompt_peers={prompt}", f"topology.num_token_peers={token}",
           f"topology.ubatch_size={a.ubatch_size}", "workload=poisson", f"workload.rps={a.rps}",
           f"workload.arrival_seed={a.arrival_seed}", f"workload.num_requests={a.requests}",
           f"workload.input_len={a.input_len}", f"workload.output_len={a.output_len}", "logger=none",
           "print_answers=false", "runner.echo=false", f"runner.timeout_s={a.timeout}", f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout + 60)
    summary = run_dir / "summary.json"
    if r.returncode != 0 or not summary.exists():
        raise RuntimeError(f"run failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(summary.read_text())


def predict(a, prof_path: Path, prompt: int, token: int, trace: Path | None, run_dir: Path | None = None) -> dict:
    """The simulator's prediction from the profile, or (``run_dir``) from the run's own step times."""
    from dejavu.planner.profile import load_profile
    from dejavu.simulator.costs import ProfileCosts, RunCosts
    from dejavu.simulator.engine import SimSetup, requests_from, simulate
    from dejavu.workload import WorkloadSpec, sizes_and_arrivals

    sizes, arrivals = sizes_and_arrivals(WorkloadSpec(kind="poisson", num_requests=a.requests, input_len=a.input_len,
                                                      output_len=a.output_len, rps=a.rps, arrival_seed=a.arrival_seed))
    prof = load_profile(prof_path)
    costs = (ProfileCosts(prof, prompt, token) if run_dir is None else
             RunCosts(run_dir, prompt, token, prof.comm, prof.hidden_size, 2 if prof.dtype in ("fp16", "bf16") else 4))
    res = simulate(requests_from(sizes, arrivals), SimSetup(prompt, token, a.ubatch_size, costs, trace=trace is not None))
    if trace is not None:
        from dejavu.simulator.cli import write_chrome_trace

        write_chrome_trace(res, trace, {"simulated": True, "topology": f"{prompt}+{token}"})
    return res.summary


def pick(summary: dict, path: tuple[str, ...]):
    v = summary
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def label(prompt: int, token: int) -> str:
    return f"baseline {token}" if prompt == 0 else f"disagg {prompt}+{token}"


def table(rows: list[dict]) -> str:
    head = ["metric"]
    for r in rows:
        head += [f"{r['label']} real", "sim (profile)", "ratio", "sim (run's steps)", "ratio"]
    cells = [head]
    for name, _ in METRICS:
        line = [name]
        for r in rows:
            m = r["measured"][name]
            line.append(_n(m))
            for src in ("predicted", "calibrated"):
                s = r[src][name]
                line += [_n(s), f"{s / m:.3f}" if m and s is not None else "-"]
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    fmt = lambda c: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def _n(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def main(argv=None) -> dict:
    a = parse_args(argv)
    topos = topologies(a.topologies)
    out = Path(a.out)
    runs_dir = (out.with_suffix("") / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dejavu-simcheck-"))
    try:
        if a.model is None:
            print("model: a random Llama of SmolLM2-135M's shape (temporary folder)", flush=True)
            model = str(smollm2_shaped_llama(tmp / "smollm2-shaped"))
        else:
            model = a.model
        model_args = model_overrides(model)
        rows = []
        profiles: dict[int, Path] = {}
        for prompt, token in topos:
            workers = prompt + token
            threads = threads_per_worker(workers)
            if threads not in profiles:
                if a.profile:
                    profiles[threads] = Path(a.profile)
                else:
                    print(f"profiling with {threads} thread(s) per worker ...", flush=True)
                    profiles[threads] = profile(a, model, threads, runs_dir / f"profile-{threads}t.json")
            lab = label(prompt, token)
            print(f"{lab}: real run ({a.requests} requests, Poisson {a.rps}/s, input {a.input_len}, output "
                  f"{a.output_len}, ubatch {a.ubatch_size}) ...", flush=True)
            run_dir = runs_dir / lab.replace(" ", "-")
            measured = real_run(a, model_args, prompt, token, run_dir)
            predicted = predict(a, profiles[threads], prompt, token, run_dir / "simulated_trace.json")
            calibrated = predict(a, profiles[threads], prompt, token, None, run_dir)
            row = {"label": lab, "prompt": prompt, "token": token, "run_dir": str(run_dir),
                   "profile": str(profiles[threads]),
                   "measured": {n: pick(measured, p) for n, p in METRICS},
                   "predicted": {n: pick(predicted, p) for n, p in METRICS},
                   "calibrated": {n: pick(calibrated, p) for n, p in METRICS}}
            for key, src in (("ratio", "predicted"), ("calibrated_ratio", "calibrated")):
                row[key] = {n: (row[src][n] / row["measured"][n]) if row["measured"][n] and row[src][n] else None
                            for n, _ in METRICS}
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n== simulator vs reality: {a.requests} requests, Poisson {a.rps}/s (seed {a.arrival_seed}), input "
          f"{a.input_len}, output {a.output_len}, ubatch {a.ubatch_size}, this machine ({os.cpu_count()} cores)\n"
          + table(rows))
    def worst(key: str) -> float:
        return max(abs(r[key][n] - 1) for r in rows for n in CHECKED if r[key][n] is not None)

    w_prof, w_run = worst("ratio"), worst("calibrated_ratio")
    ok = w_run <= a.tolerance and (w_prof <= a.tolerance or not a.strict)
    print(f"\nthroughput and p50 latency, predicted/measured:\n"
          f"  from the profile alone (measured before the runs):  {1 - w_prof:.3f} .. {1 + w_prof:.3f}"
          f" (worst |ratio - 1| = {w_prof:.3f})\n"
          f"  from the runs' own step times (the simulator's model of scheduling, queueing and hand-offs): "
          f"{1 - w_run:.3f} .. {1 + w_run:.3f} (worst {w_run:.3f})\n"
          f"  tolerance {a.tolerance:g} on the latter{' and the former (--strict)' if a.strict else ''}: "
          f"{'OK' if ok else 'OUTSIDE'}; load average during the check: {_load()}")
    worst_dev = w_run
    result = {"args": vars(a), "rows": rows, "worst_deviation": worst_dev, "worst_deviation_profile": w_prof,
              "load_average": _load(), "ok": ok}
    write_json(out, result)
    print(f"wrote {out} (runs, profiles and simulated traces under {runs_dir})")
    return result


if __name__ == "__main__":
    try:
        res = main()
    except RuntimeError as e:
        sys.exit(f"bench/simulator_check.py: {e}")
    sys.exit(0 if res["ok"] else 1)
