"""Start a real controller and real workers as subprocesses (or workers under mpirun) and wait for them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dejavu.results.metrics import outputs_sha256
from dejavu.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]

UBATCH = 2
# [prompt_size, new_tokens]; grouped by 2 in this order. The last microbatch generates one token each.
TRACE = [[5, 7], [3, 4], [6, 5], [2, 2], [7, 8], [4, 3], [3, 1], [5, 1]]


def reference(engine, records):
    """The engine's tokens for each request, run on the same microbatches as the workers."""
    recs = sorted(records, key=lambda r: r["id"])
    want = {}
    for i in range(0, len(recs), UBATCH):
        ub = recs[i:i + UBATCH]
        params = [SamplingParams(max_new_tokens=TRACE[r["id"]][1]) for r in ub]
        for r, g in zip(ub, engine.generate([r["prompt_ids"] for r in ub], params)):
            want[r["id"]] = g.output_ids
    return want


def check_matches(run, engine):
    """The run ended well and every request's tokens equal the engine's on the same microbatches."""
    assert run.controller_rc == 0, run.all_logs()
    assert all(rc == 0 for rc in run.worker_rcs), run.all_logs()
    assert len(run.records) == len(TRACE)
    assert all(r["status"] == "ok" for r in run.records)
    assert [len(r["prompt_ids"]) for r in sorted(run.records, key=lambda r: r["id"])] == [p for p, _ in TRACE]
    want = reference(engine, run.records)
    assert run.outputs() == want
    assert run.summary["outputs_sha256"] == outputs_sha256(want)
    for r in run.records:
        assert r["arrival_s"] <= r["first_token_s"] <= r["finish_s"]
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    controller_rc: int | None
    worker_rcs: list[int | None]
    run_dir: Path
    logs: dict[str, Path]
    records: list[dict] = field(default_factory=list)
    summary: dict | None = None

    def log(self, name: str) -> str:
        p = self.logs.get(name)
        return p.read_text(errors="replace") if p and p.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(f"---- {n} ----\n{self.log(n)}" for n in self.logs)

    def outputs(self) -> dict[int, list[int]]:
        return {r["id"]: r["output_ids"] for r in self.records}


def run_serving(tmp: Path, model: Path, *, prompt: int = 0, token: int = 1, tp: int = 1, backend: str = "gloo",
                ubatch: int = 2, controller_args: list[str] = (), worker_args: list[str] = (),
                worker_env: dict[int, dict[str, str]] | None = None, timeout: float = 90.0,
                heartbeat_timeout: float = 10.0) -> Run:
    world = (prompt + token) * tp
    run_dir = tmp / "run"
    logs_dir = tmp / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    port, master = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "DEJAVU_CONTROLLER_IP": "127.0.0.1", "DEJAVU_CONTROLLER_PORT": str(port),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "PYTHONUNBUFFERED": "1"}
    env.pop("DEJAVU_FAULT", None)
    py = [sys.executable, "-m", "dejavu.cli_serving"]
    ctl_cmd = py + ["controller", "--num_peers", str(world), "--num_prompt_peers", str(prompt), "--num_token_peers",
                    str(token), "--tensor_parallelism", str(tp), "--port", str(port), "--model", str(model),
                    "--ubatch_size", str(ubatch), "--run_dir", str(run_dir), "--no_plots",
                    "--heartbeat_interval", "0.25", "--heartbeat_timeout", str(heartbeat_timeout),
                    "--startup_timeout", "60", "--progress_timeout", "60", "--stats_timeout", "20",
                    *controller_args]
    wk = ["--tensor_para_size", str(tp), "--prompt_pipeline_para_size", str(prompt), "--token_pipeline_para_size",
          str(token), "--ckpt_path", str(model), "--backend", backend, "--ubatch_size", str(ubatch), *worker_args]
    logs = {"controller": logs_dir / "controller.log"}
    procs: dict[str, subprocess.Popen] = {}
    files = []

    def start(name, cmd, e):
        f = open(logs_dir / f"{name}.log", "wb")
        files.append(f)
        logs[name] = logs_dir / f"{name}.log"
        procs[name] = subprocess.Popen(cmd, env=e, stdout=f, stderr=subprocess.STDOUT, cwd=tmp,
                                       start_new_session=True)

    start("controller", ctl_cmd, env)
    if backend == "mpi":
        mpi_env = {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                   "OMPI_MCA_rmaps_base_oversubscribe": "1"}
        cmd = ["mpirun", "-n", str(world), "--oversubscribe", "--bind-to", "none",
               "-x", "DEJAVU_CONTROLLER_IP", "-x", "DEJAVU_CONTROLLER_PORT", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
        for k, v in (worker_env or {}).get(-1, {}).items():
            mpi_env[k] = v
            cmd += ["-x", k]
        start("mpirun", cmd + py + ["worker", *wk], mpi_env)
    else:
        for rank in range(world):
            e = {**env, **(worker_env or {}).get(rank, {})}
            start(f"worker{rank}", py + ["worker", *wk, "--rank", str(rank), "--world_size", str(world)], e)

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if procs["controller"].poll() is not None:
                break
            time.sleep(0.1)
        # Workers get a few seconds to exit on their own once the controller is done.
        grace = time.monotonic() + 15
        while time.monotonic() < grace and any(p.poll() is None for p in procs.values()):
            time.sleep(0.1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        for f in files:
            f.close()
    rcs = [procs[n].returncode for n in sorted(procs) if n.startswith("worker")]
    if backend == "mpi":
        rcs = [procs["mpirun"].returncode]
    run = Run(procs["controller"].returncode, rcs, run_dir, logs)
    req = run_dir / "requests.jsonl"
    if req.exists():
        run.records = [json.loads(line) for line in req.read_text().splitlines() if line.strip()]
    if (run_dir / "summary.json").exists():
        run.summary = json.loads((run_dir / "summary.json").read_text())
    return run
