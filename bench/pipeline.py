"""Baseline pipeline versus prompt/token disaggregation: same workload, same number of workers.

Each point is a real `dejavu-run` (controller + workers as processes, Hydra overrides); the numbers are
read back from each run's ``summary.json`` and printed side by side, one column per topology:

    python bench/pipeline.py                                  # tiny random Llama, 4 workers: 4 vs 2+2 vs 1+3
    python bench/pipeline.py --workload both                  # prompt-heavy and token-heavy
    python bench/pipeline.py --model smollm2-135m --requests 16 --rps 4
    python bench/pipeline.py --workers 2 --requests 4 --out /tmp/p.json   # smoke

``bubble`` is the summary's bubble fraction (1 - union of prefill/decode/stream over the run's
span): blocking sends and receives are waits on a neighbour, so they count as bubbles. ``compute`` is
prefill + decode seconds over the span only (without streaming copies).
The outputs of every run must be equal (greedy, same microbatches): the script exits 1 if they are not.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# (input_len, output_len) per workload; --input-len / --output-len override them.
WORKLOADS = {"default": (32, 16), "prompt-heavy": (256, 4), "token-heavy": (8, 64)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None,
                   help="registry name (conf/model), HF checkpoint folder or .gguf file; "
                        "default: a tiny random Llama (8 layers, hidden 256) built in a temp folder")
    p.add_argument("--workers", type=int, default=4, help="workers in every run (default 4)")
    p.add_argument("--splits", default=None,
                   help="disaggregated prompt+token splits, e.g. 2+2,1+3 (default: half+half and 1+rest)")
    p.add_argument("--workload", default="default", choices=[*WORKLOADS, "both"],
                   help="sizes: default 32/16, prompt-heavy 256/4, token-heavy 8/64; both = the two heavy ones")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (overrides the workload's)")
    p.add_argument("--output-len", type=int, default=None, help="new tokens (overrides the workload's)")
    p.add_argument("--ubatch-size", type=int, default=2)
    p.add_argument("--rps", type=float, default=None, help="Poisson arrivals at this rate (default: all at t=0)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--device", default=None, help="cpu | cuda (default: the backend's)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--out", default="results/bench/pipeline.json")
    a = p.parse_args(argv)
    a.splits = parse_splits(a.splits, a.workers)
    return a


def parse_splits(text: str | None, n: int) -> list[tuple[int, int]]:
    if n < 2:
        raise SystemExit(f"--workers: {n} is too few; disaggregation needs at least 2 (1 prompt + 1 token)")
    if text is None:
        return list(dict.fromkeys([(n // 2, n - n // 2), (1, n - 1)]))
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\+(\d+)\s*", part)
        if not m or int(m[1]) < 1 or int(m[2]) < 1 or int(m[1]) + int(m[2]) != n:
            raise SystemExit(f"--splits: {part!r} is not M+K with M, K >= 1 and M+K = --workers ({n}), e.g. 1+{n - 1}")
        out.append((int(m[1]), int(m[2])))
    return out


def tiny_llama(folder: Path) -> Path:
    """A random Llama with peaked logits (wide init) so that greedy tokens are not decided by near-ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return folder


def model_overrides(model: str) -> list[str]:
    path = Path(model).expanduser()
    if path.is_dir():
        return ["model.source=hf_folder", f"+model.path={path.resolve()}", f"model.name={path.name}"]
    if path.suffix == ".gguf" and path.is_file():
        return ["model.source=gguf_file", f"+model.path={path.resolve()}", f"model.name={path.stem}"]
    from dejavu.model.registry import model_entry

    # A shape-only entry (OPT-13B, BLOOM, ...) runs with random weights: the timings are what this bench measures.
    shape_only = model_entry(model).get("source") == "shape_only"
    return [f"model={model}", *(["model.weights=random"] if shape_only else [])]


def entry_point() -> list[str]:
    exe = shutil.which("dejavu-run")
    return [exe] if exe else [sys.executable, "-m", "runners.app"]


def run_point(a, model: list[str], prompt: int, token: int, sizes: tuple[int, int], run_dir: Path) -> dict:
    """One `dejavu-run`; returns its summary.json (raises with the run's output if it failed)."""
    topo = "baseline" if prompt == 0 else "disagg"
    work = (["workload=poisson", f"workload.rps={a.rps}"] if a.rps else
            ["workload=fixed", "workload.prompts=null", "workload.chat_template=false"])
    cmd = [*entry_point(), *model, f"topology={topo}", f"topology.num_peers={a.workers}",
           f"topology.num_prompt_peers={prompt}", f"topology.num_token_peers={token}",
           f"topology.ubatch_size={a.ubatch_size}", *work, f"workload.num_requests={a.requests}",
           f"workload.input_len={sizes[0]}", f"workload.output_len={sizes[1]}", f"backend={a.backend}",
           *([f"backend.device={a.device}"] if a.device else []), "logger=none", "print_answers=false",
           "runner.echo=false", f"runner.timeout_s={a.timeout}", f"hydra.run.dir={run_dir}"]
    return run_and_read(cmd, run_dir, a.timeout)


def run_and_read(cmd: list[str], run_dir: Path, timeout: float) -> dict:
    """Run one `dejavu-run` command line; its summary.json (raises with the run's output if it failed)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout + 60)
    summary = run_dir / "summary.json"
    if r.returncode != 0 or not summary.exists():
        raise RuntimeError(f"run failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    s = json.loads(summary.read_text())
    s["_wall_s"] = time.perf_counter() - t0
    return s


def row(label: str, s: dict, run_dir: Path) -> dict:
    span = s["span_s"]["end"] - s["span_s"]["start"]
    stages = sorted(s["stages"], key=lambda n: (re.sub(r"\d+$", "", n), int(re.search(r"\d*$", n)[0] or 0)))
    compute = {}
    for name in stages:  # prefill + decode seconds of the stage's workers, over the span
        ws = [s["workers"][str(w)]["seconds_by_kind"] for w in s["stages"][name]["workers"]]
        compute[name] = sum(k.get("prefill", 0.0) + k.get("decode", 0.0) for k in ws) / len(ws) / span if span else None
    return {
        "label": label, "run_dir": str(run_dir),
        "completed": s["counts"]["completed"], "total": s["counts"]["total"],
        "requests_per_s": s["throughput"]["requests_per_s"], "tokens_per_s": s["throughput"]["output_tokens_per_s"],
        "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p50_s": s["tpot_s"]["p50"],
        "latency_p50_s": s["latency_s"]["p50"], "latency_p99_s": s["latency_s"]["p99"],
        "normalized_latency_p50_s": s["normalized_latency_s"]["p50"],
        "makespan_s": s["makespan_s"], "bubble_mean": s["bubble_fraction_mean"],
        "bubble_by_stage": {n: s["stages"][n]["bubble_fraction"] for n in stages},
        "compute_by_stage": compute, "outputs_sha256": s["outputs_sha256"], "wall_s": s["_wall_s"],
    }


def short_stage(name: str) -> str:
    return name[0] + re.search(r"\d*$", name)[0]  # stage2 -> s2, prompt0 -> p0, token1 -> t1


def table(rows: list[dict]) -> str:
    def num(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    def stages(d):
        return " ".join(f"{short_stage(n)} {num(v, '{:.2f}')}" for n, v in d.items())

    lines = [
        ("requests ok", lambda r: f"{r['completed']}/{r['total']}"),
        ("throughput req/s", lambda r: num(r["requests_per_s"])),
        ("throughput tok/s", lambda r: num(r["tokens_per_s"])),
        ("TTFT p50 s", lambda r: num(r["ttft_p50_s"])), ("TTFT p99 s", lambda r: num(r["ttft_p99_s"])),
        ("TPOT p50 s", lambda r: num(r["tpot_p50_s"])),
        ("latency p50 s", lambda r: num(r["latency_p50_s"])), ("latency p99 s", lambda r: num(r["latency_p99_s"])),
        ("norm. latency p50 s/tok", lambda r: num(r["normalized_latency_p50_s"])),
        ("makespan s", lambda r: num(r["makespan_s"])),
        ("bubble mean", lambda r: num(r["bubble_mean"], "{:.2f}")),
        ("bubble per stage", lambda r: stages(r["bubble_by_stage"])),
        ("compute per stage", lambda r: stages(r["compute_by_stage"])),
        ("outputs_sha256", lambda r: r["outputs_sha256"][:16]),
    ]
    cells = [["metric", *(r["label"] for r in rows)]] + [[name, *(f(r) for r in rows)] for name, f in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]

    def fmt(c):
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths)))

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    out = Path(a.out)
    runs_dir = out.with_suffix("") / time.strftime("%Y-%m-%d_%H-%M-%S")
    names = ["prompt-heavy", "token-heavy"] if a.workload == "both" else [a.workload]
    tmp = None
    if a.model is None:
        tmp = Path(tempfile.mkdtemp(prefix="dejavu-bench-"))
        model = model_overrides(str(tiny_llama(tmp / "tiny-llama")))
    else:
        model = model_overrides(a.model)
    result = {"args": {k: v for k, v in vars(a).items() if k != "splits"},
              "splits": [f"{m}+{k}" for m, k in a.splits], "model": model, "workloads": {}}
    try:
        for name in names:
            sizes = (a.input_len or WORKLOADS[name][0], a.output_len or WORKLOADS[name][1])
            points = [(f"baseline {a.workers}", 0, a.workers)] + [(f"disagg {m}+{k}", m, k) for m, k in a.splits]
            rows = []
            for label, prompt, token in points:
                run_dir = (runs_dir / f"{name}-{label.replace(' ', '-')}").resolve()
                print(f"[{name}] {label}: {a.requests} requests, input {sizes[0]}, output {sizes[1]} ...", flush=True)
                rows.append(row(label, run_point(a, model, prompt, token, sizes, run_dir), run_dir))
            digests = {r["outputs_sha256"] for r in rows}
            result["workloads"][name] = {"input_len": sizes[0], "output_len": sizes[1], "requests": a.requests,
                                         "rps": a.rps, "rows": rows, "digests_equal": len(digests) == 1}
            print(f"\n== {name}: {a.requests} requests, input {sizes[0]} / output {sizes[1]} tokens, "
                  f"ubatch {a.ubatch_size}, {a.workers} workers, "
                  f"{f'Poisson {a.rps} req/s' if a.rps else 'all arriving at t=0'}\n{table(rows)}")
            same = len(digests) == 1
            print("outputs_sha256 " + (f"equal across runs: {rows[0]['outputs_sha256']}\n" if same
                                       else f"DIFFER across runs: {', '.join(sorted(digests))}\n"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    write_json(out, result)
    print(f"wrote {out} (run folders under {runs_dir})")
    return result


if __name__ == "__main__":
    try:
        res = main()
    except RuntimeError as e:
        sys.exit(f"bench/pipeline.py: {e}")
    sys.exit(0 if all(w["digests_equal"] for w in res["workloads"].values()) else 1)
