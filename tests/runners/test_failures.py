"""Fault tolerance end to end through `dejavu-run`: real worker processes, real SIGKILL / SIGSTOP from the
runner, restarts, hot spares, manual restarts; every run must end with the failure-free run's outputs.

The reference is a failure-free run of the same workload (its ``outputs_sha256``). Replication bounds the
recomputation: a microbatch resumes from its last step held by every stage, so at most the pipeline's depth
of steps per request is recomputed; the baseline without replication recomputes every generated token of
the unfinished requests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from runner_helpers import dejavu_run, dejavu_run_started, leftover_processes

from test_config import problems

pytestmark = pytest.mark.slow

UBATCH, REQUESTS, NEW = 2, 8, 12


def workload(sampled: bool = False) -> list[str]:
    w = ["workload=fixed", "workload.prompts=null", "workload.chat_template=false", f"workload.num_requests={REQUESTS}",
         "workload.input_len=8", f"workload.output_len={NEW}", "print_answers=false", "logger=none",
         f"topology.ubatch_size={UBATCH}"]
    if sampled:
        w += ["workload.temperature=0.8", "workload.top_k=20", "workload.seed=7"]
    return w


def model(ckpt) -> list[str]:
    return ["model.source=hf_folder", f"+model.path={ckpt}", "model.name=tiny-llama"]


BASELINE3 = ["topology=baseline", "topology.num_peers=3", "topology.num_token_peers=3"]
DISAGG12 = ["topology=disagg", "topology.num_peers=3", "topology.num_prompt_peers=1", "topology.num_token_peers=2"]
TP2 = ["topology=baseline", "topology.num_peers=4", "topology.num_token_peers=2", "topology.tensor_parallelism=2"]
FAST = ["failure.heartbeat_interval_s=0.25", "failure.heartbeat_timeout_s=3"]


def run(tmp_path, name: str, args: list[str], timeout: float = 240):
    out = tmp_path / name
    r = dejavu_run([*args, f"hydra.run.dir={out}"], timeout=timeout)
    return r, out


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def all_ok(out) -> bool:
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return len(recs) == REQUESTS and all(r["status"] == "ok" for r in recs)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("llama-gqa-bias")


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The failure-free runs' digests, greedy and sampled (any layout gives the same tokens)."""
    out = {}
    for sampled in (False, True):
        d = tmp_path_factory.mktemp("ref")
        r = dejavu_run([*model(ckpt), *workload(sampled), *BASELINE3, f"hydra.run.dir={d}"])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "failures" not in summary(d)
        out[sampled] = summary(d)["outputs_sha256"]
    return out


def check_recovered(r, out, digest: str, failures: int = 1) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = summary(out)
    assert all_ok(out)
    assert s["outputs_sha256"] == digest, "outputs differ from the failure-free run"
    assert len(s["failures"]) == failures, s["failures"]
    for f in s["failures"]:
        assert f["resumed_s"] is not None and f["recovery_s"] >= 0 and f["detected_s"] >= 0
    assert s["recovery"]["failures"] == failures
    assert leftover_processes(out) == []
    return s


def test_kill_mid_decode_resumes_from_replicas_and_the_baseline_recomputes(ckpt, reference, tmp_path):
    r, out = run(tmp_path, "ft", [*model(ckpt), *workload(), *BASELINE3, "failure=kill_one"])
    s = check_recovered(r, out, reference[False])
    f = s["failures"][0]
    assert f["ranks"] == [2] and f["restart"] == "runner" and f["ubatches_resumed"] >= 1
    # Every microbatch that had begun resumes; one still waiting for a KV buffer is only queued again.
    assert f["ubatches_restarted"] == 0
    assert f["ubatches_resumed"] + f["ubatches_requeued"] == REQUESTS // UBATCH
    # Resumed from the last replicated step: at most the pipeline's depth of steps per request recomputed.
    assert f["tokens_recomputed"] <= 3 * UBATCH * f["ubatches_resumed"]
    assert f["restored_bytes"] > 0 and s["recovery"]["replication_bytes"] > 0
    assert "FAILURE" in r.stdout and "serving resumes" in r.stdout and "SIGKILL to worker 2" in r.stdout
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("cat") == "failure" for e in trace["traceEvents"])
    assert (out / "plots" / "latency_vs_arrival.png").is_file()

    # The paper's comparison point: no replicas, every unfinished request starts again from its prompt.
    r, out = run(tmp_path, "baseline", [*model(ckpt), *workload(), *BASELINE3, "failure=kill_one",
                                        "failure.with_ft=false"])
    b = check_recovered(r, out, reference[False])["failures"][0]
    assert b["ubatches_resumed"] == 0 and b["ubatches_restarted"] >= 3
    assert b["tokens_recomputed"] >= 4 * UBATCH  # the killed microbatch had reached step 4
    assert b["tokens_recomputed"] > f["tokens_recomputed"]


def test_disaggregated_sampled_run_survives_a_token_stage_kill(ckpt, reference, tmp_path):
    r, out = run(tmp_path, "disagg", [*model(ckpt), *workload(sampled=True), *DISAGG12, "failure=kill_one"])
    s = check_recovered(r, out, reference[True])
    assert s["failures"][0]["ranks"] == [2]


def test_hang_is_found_by_the_deadline_and_a_hot_spare_takes_over(ckpt, reference, tmp_path):
    t0 = time.monotonic()
    r, out = run(tmp_path, "hang", [*model(ckpt), *workload(), *BASELINE3, "failure=hang", "failure.spares=1"])
    s = check_recovered(r, out, reference[False])
    f = s["failures"][0]
    assert f["restart"] == "spare" and "heartbeats" in f["cause"]
    assert 2.5 <= f["detection_s"] <= 3 + 2.0  # the 3 s deadline, plus the runner's reaction
    assert "SIGSTOP to worker 2" in r.stdout and "hot spare" in r.stdout
    assert time.monotonic() - t0 < 120


def test_three_failures_in_a_row_same_rank_twice(ckpt, reference, tmp_path):
    r, out = run(tmp_path, "three", [*model(ckpt), *workload(), *BASELINE3, "failure=kill_three"])
    s = check_recovered(r, out, reference[False], failures=3)
    assert [f["ranks"] for f in s["failures"]] == [[2], [1], [2]]


def test_kill_during_prefill_redoes_that_prompt(ckpt, reference, tmp_path):
    r, out = run(tmp_path, "prefill", [*model(ckpt), *workload(), *BASELINE3, "failure=kill_one",
                                       "failure.failures=[{rank: 1, phase: prefill}]"])
    f = check_recovered(r, out, reference[False])["failures"][0]
    assert f["ubatches_restarted"] >= 1


def test_kill_during_the_handover(ckpt, reference, tmp_path):
    r, out = run(tmp_path, "handover", [*model(ckpt), *workload(), *DISAGG12, "failure=kill_one",
                                        "failure.failures=[{rank: 1, phase: handover}]"])
    f = check_recovered(r, out, reference[False])["failures"][0]
    assert f["ranks"] == [1] and f["ubatches_restarted"] >= 1


def test_tensor_parallel_shard_killed(ckpt, reference, tmp_path):
    r, out = run(tmp_path, "tp", [*model(ckpt), *workload(), *TP2, "failure=kill_one"])
    s = check_recovered(r, out, reference[False])
    assert s["failures"][0]["ranks"] == [3] and s["failures"][0]["restored_bytes"] > 0


def test_manual_restart_with_the_seeds_flags(ckpt, reference, tmp_path):
    out = tmp_path / "manual"
    p = dejavu_run_started([*model(ckpt), *workload(), *BASELINE3, "failure=kill_one", "failure.restart=manual",
                            f"hydra.run.dir={out}"])
    script = out / "restart_worker2.sh"
    try:
        deadline = time.monotonic() + 120
        while not script.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert script.exists(), "the runner did not write the manual restart command"
        text = script.read_text()
        assert "--rank 2" in text and "--restart --failures 1" in text
        by_hand = subprocess.Popen(["sh", str(script)], start_new_session=True)
        stdout, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stdout[-3000:]
    by_hand.wait(timeout=30)
    s = summary(out)
    assert s["outputs_sha256"] == reference[False] and s["failures"][0]["restart"] == "manual"


def test_a_rank_that_never_comes_back_ends_the_run_with_every_request_accounted(ckpt, tmp_path):
    t0 = time.monotonic()
    r, out = run(tmp_path, "gone", [*model(ckpt), *workload(), *BASELINE3, "failure=kill_one",
                                    "failure.restart=manual", "failure.recovery_timeout_s=4"])
    assert r.returncode != 0
    assert time.monotonic() - t0 < 90
    text = r.stdout + r.stderr
    assert "rank 2 on host" in text and "recovery_timeout_s=4" in text
    assert "Traceback" not in r.stdout
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(recs) == REQUESTS and {r["status"] for r in recs} <= {"ok", "failed", "unfinished"}
    assert any(r["status"] == "failed" for r in recs)
    for rec in recs:  # tokens so far, never from two attempts: a prefix of the failure-free answer
        assert rec["status"] != "ok" or len(rec["output_ids"]) == NEW
    assert leftover_processes(out) == []


@pytest.mark.parametrize("overrides,key", [
    (["failure.with_ft=true", "topology=baseline", "backend=mpi", "runner=mpirun"], "backend=gloo or nccl"),
    (["failure=kill_one", "topology=baseline", "failure.failures=[{rank: 5, phase: decode}]"], "failure.failures[0].rank=5"),
    (["failure=kill_one", "topology=baseline", "failure.failures=[{host: 10.9.9.9, phase: decode}]"],
     "failure.failures[0].host=10.9.9.9"),
    (["failure=kill_one", "topology=baseline", "failure.heartbeat_timeout_s=-1"], "failure.heartbeat_timeout_s=-1"),
    (["failure=kill_one", "topology=baseline", "failure.recovery_timeout_s=0"], "failure.recovery_timeout_s=0"),
    (["failure.spares=1", "topology=baseline"], "failure.spares=1 without failure.with_ft"),
    (["failure=kill_three", "topology=baseline", "failure.max_restarts=2"], "failure.max_restarts=2"),
    (["failure=kill_one"], "topology.num_token_peers=1"),
    (["failure=kill_one", "topology=baseline", "failure.failures=[{rank: 1}]"], "exactly one trigger"),
    (["failure=kill_one", "topology=baseline", "failure.failures=[{rank: 1, phase: handover}]"], "disaggregated"),
])
def test_bad_failure_config_is_refused_naming_the_key(overrides, key):
    assert key in problems(*overrides)


def test_host_kill_on_the_ssh_runner_restarts_there(sshd, ckpt, reference, tmp_path):
    hosts = tmp_path / "ip_info"
    hosts.write_text("127.0.0.1\n127.0.0.2\n127.0.0.2\n")
    r, out = run(tmp_path, "ssh", [*sshd.overrides(hosts), "cluster.setup=pythonpath", *model(ckpt), *workload(),
                                   *BASELINE3, "failure=kill_one", "failure.failures=[{host: 127.0.0.2, phase: decode, step: 4}]"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # Both workers of the host die at once; the controller may find them in one generation or two.
    s = check_recovered(r, out, reference[False], failures=len(summary(out)["failures"]))
    assert sorted(r for f in s["failures"] for r in f["ranks"]) == [1, 2]
    assert {h for f in s["failures"] for h in f["hosts"]} == {"127.0.0.2"}
    assert all(f["detection_s"] is not None for f in s["failures"])
    assert "every worker on host 127.0.0.2" in r.stdout


def test_swapping_composes_with_fault_tolerance(ckpt, reference, tmp_path):
    """Three microbatches in flight, two resident buffers: caches swap in and out while a stage is killed;
    the replacement restores into the swapping pool and a survivor's swapped-out cache is a cache like
    any other."""
    r, out = run(tmp_path, "swap", [*model(ckpt), *workload(), *BASELINE3, "topology.swapping=true",
                                    "topology.inflight_ubatches=3", "topology.resident_buffers=2", "failure=kill_one"])
    s = check_recovered(r, out, reference[False])
    assert s["kv_memory"]["swap"]["count"] > 0


def test_a_dead_worker_without_fault_tolerance_leaves_tracebacks_in_the_logs_only(ckpt, tmp_path):
    """No failure config: the run ends at a worker's death, the console says which worker and where the
    logs are; the survivors' tracebacks (gloo's connection reset) stay in their log files."""
    r, out = run(tmp_path, "dead", [*model(ckpt), *workload(), *BASELINE3,
                                    "+cluster.env.DEJAVU_FAULT='rank=1,at=decode,step=2,how=exit'"])
    assert r.returncode != 0
    console = r.stdout + r.stderr
    assert "worker 1" in console and "logs/" in console
    assert "Traceback (most recent call last)" not in console
    logs = " ".join(p.read_text(errors="replace") for p in (out / "logs").glob("worker*.log"))
    if "Traceback (most recent call last)" in logs:  # a survivor raised before the controller's abort came
        assert "traceback: see the log" in console or "tracebacks are there" in console
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert {rec["status"] for rec in recs} <= {"ok", "failed", "unfinished"} and len(recs) == REQUESTS


def test_another_rank_fails_during_recovery(ckpt, reference, tmp_path):
    """Worker 2 is killed by the scenario; while the runner waits to restart it (restart_delay_s), worker 1
    is killed too (by hand, from outside). The recovery starts over for both and ends with the same tokens;
    worker 1's replicas died with worker 2's store, so its microbatches come back through the prompts."""
    import re

    out = tmp_path / "during"
    p = dejavu_run_started([*model(ckpt), *workload(), *BASELINE3, "failure=kill_one", "failure.restart_delay_s=3",
                            f"hydra.run.dir={out}"])
    seen, pid1, killed = [], None, False
    try:
        for line in p.stdout:
            seen.append(line)
            m = re.search(r"worker 1 \(stage1 on \S+ pid (\d+)\) ready", line)
            if m:
                pid1 = int(m.group(1))
            if "FAILURE (generation 1)" in line and pid1 and not killed:
                os.killpg(pid1, signal.SIGKILL)  # each worker leads its own process group
                killed = True
        p.wait(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    text = "".join(seen)
    assert killed and p.returncode == 0, text[-3000:]
    s = summary(out)
    assert s["outputs_sha256"] == reference[False] and all_ok(out)
    assert sorted(r for f in s["failures"] for r in f["ranks"]) == [1, 2]
    assert "FAILURE (generation 2)" in text
