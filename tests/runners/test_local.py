"""The local runner: real subprocesses with their own logs and process groups; a crashed worker or Ctrl-C
ends the run with every process gone. Wiring is checked with the model-free stand-in (runners.standin)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from runner_helpers import REPO, dejavu_run, launch_record, leftover_processes, wait_for_text


def test_standin_run_wires_ranks_env_and_logs(tmp_path):
    run = tmp_path / "run"
    r = dejavu_run(["entry=runners.standin", "model=opt-125m", "topology=disagg", "logger=none", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stderr
    assert "What is the capital of France?" in r.stdout and "requests completed" in r.stdout
    for f in ("logs/controller.log", "logs/worker0.log", "logs/worker1.log", "summary.json", "requests.jsonl",
              "inputs/ip_info", "inputs/prompts.txt", "launch.json", ".hydra/config.yaml"):
        assert (run / f).is_file(), f
    seen = json.loads((run / "standin.json").read_text())["workers"]
    assert sorted(seen) == ["0", "1"]
    for rank, w in seen.items():
        env = w["env"]
        assert env["MASTER_ADDR"] == env["PROMPT_MASTER_ADDR"] == env["DEJAVU_CONTROLLER_IP"] == "127.0.0.1"
        assert env["NCCL_COMM_ID"].startswith("127.0.0.1:")
        assert w["argv"][w["argv"].index("--rank") + 1] == rank
        assert w["pgid"] == w["pid"]  # a process group of its own
    argv = seen["0"]["argv"]
    assert argv[argv.index("--prompt_pipeline_para_size") + 1] == "1"
    assert argv[argv.index("--token_pipeline_para_size") + 1] == "1"
    assert leftover_processes(run) == []


def test_a_crashed_worker_stops_the_run_and_is_reported(tmp_path):
    run = tmp_path / "run"
    t0 = time.monotonic()
    r = dejavu_run(["entry=runners.standin", "model=opt-125m", "topology=baseline", "logger=none", "runner.grace_s=2",
                    "+cluster.env.DEJAVU_STANDIN_CRASH_RANK=1", "+cluster.env.DEJAVU_STANDIN_HOLD_S=60",
                    f"hydra.run.dir={run}"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t0 < 45  # no hang: the controller was stopped after the grace period
    assert "worker1 exited with code 3" in r.stderr
    assert "crashing on purpose" in r.stderr  # the end of its log is shown
    assert leftover_processes(run) == []


def test_ctrl_c_stops_every_process(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "DEJAVU_STANDIN_HOLD_S": "120"}
    p = subprocess.Popen([sys.executable, "-m", "runners.app", "entry=runners.standin", "model=opt-125m", "topology=baseline",
                          "logger=none", f"hydra.run.dir={run}"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_text(run / "logs" / "controller.log", "[2/2]", timeout=60)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err
    record = launch_record(run)
    assert record["exit_codes"]["controller"] is not None
    assert leftover_processes(run) == []


def test_default_command_serves_smollm2_and_answers(tmp_path, smollm2_dir):
    """`dejavu-run` as README's main command: SmolLM2 on one CPU worker, real prompts via the chat template,
    answers and a metrics table printed, the results folder written and logged to W&B offline."""
    run = tmp_path / "run"
    r = dejavu_run(["workload.num_requests=2", "workload.output_len=16", f"hydra.run.dir={run}"], timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "What is the capital of France?" in r.stdout and "Paris" in r.stdout
    assert "throughput tok/s" in r.stdout and "outputs_sha256" in r.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["counts"]["completed"] == 2
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert leftover_processes(run) == []
