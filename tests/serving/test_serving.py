"""End to end on real processes: a controller and workers (gloo on the CPU, MPI under mpirun).

Every topology must give, request for request, the tokens of the single-process engine on the same
microbatches (same prompts, same padding); the engine itself is checked against transformers in
tests/test_engine_hf.py. The workload mixes prompt and output lengths (a trace file) and ends with a
microbatch whose requests all stop at their first token (the prompt pipeline's drop path).
"""

from __future__ import annotations

import json
import shutil

import pytest

from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.weights import HFCheckpoint

from serving_harness import TRACE, UBATCH, check_matches, run_serving

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import llama

    return llama(tmp_path_factory.mktemp("model") / "tiny", layers=4)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.json"
    path.write_text(json.dumps(TRACE))
    return path


@pytest.fixture(scope="module")
def engine(model):
    cfg = ModelConfig.from_folder(model)
    return Engine(build_stages(cfg, HFCheckpoint(model), 1))


TOPOLOGIES = {
    # id: (prompt stages, token stages, tensor parallelism)
    "1-worker": (0, 1, 1),
    "baseline-2": (0, 2, 1),
    "baseline-3": (0, 3, 1),
    "disagg-1+1": (1, 1, 1),
    "disagg-1+2": (1, 2, 1),
    "disagg-2+1": (2, 1, 1),
    "disagg-2+2": (2, 2, 1),
    "disagg-1+1-tp2": (1, 1, 2),  # TP 2 in every stage of both pipelines
}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_gloo_topologies_match_engine(name, model, trace, engine, tmp_path):
    prompt, token, tp = TOPOLOGIES[name]
    args = ["--input_sizes_file", str(trace)]
    if name in ("baseline-3", "disagg-2+1"):
        args += ["--poisson", "--rps", "40"]  # arrivals spread out: microbatches join a busy pipeline
    run = run_serving(tmp_path, model, prompt=prompt, token=token, tp=tp, ubatch=UBATCH, controller_args=args)
    check_matches(run, engine)
    summary = run.summary
    assert summary["counts"] == {"total": 8, "completed": 8, "failed": 0, "unfinished": 0}
    assert set(summary["workers"]) == {str(r) for r in range((prompt + token) * tp)}
    if "--poisson" in args:
        arrivals = [r["arrival_s"] for r in sorted(run.records, key=lambda r: r["id"])]
        assert arrivals == sorted(arrivals) and arrivals[-1] > 0
    if prompt:
        # The token side received every prompt's cache: layers x (k, v) x slots x kv heads x prompt x dim.
        cfg = ModelConfig.from_folder(model)
        per_pos = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32
        want = sum(max(TRACE[i][0], TRACE[i + 1][0]) * 2 * per_pos for i in range(0, len(TRACE), 2))
        assert summary["kv_streams"]["prompt->token"]["bytes"] == want
        kinds = {e["kind"] for e in map(json.loads, (run.run_dir / "events.jsonl").read_text().splitlines())}
        assert {"prefill", "decode", "stream", "idle"} <= kinds


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_mpi_under_mpirun_matches_engine(model, trace, engine, tmp_path):
    # mpirun -n 4: point-to-point, side channels and KV hand-over over MPI, TP all-reduce on Split comms.
    run = run_serving(tmp_path, model, prompt=1, token=1, tp=2, backend="mpi", ubatch=UBATCH,
                      controller_args=["--input_sizes_file", str(trace)])
    check_matches(run, engine)
    assert "mpi on cpu" in run.log("mpirun")


def test_worker_crash_at_startup_ends_the_run(model, trace, tmp_path):
    run = run_serving(tmp_path, model, token=2, ubatch=UBATCH, controller_args=["--input_sizes_file", str(trace)],
                      worker_env={1: {"DEJAVU_FAULT": "rank=1,at=startup,how=raise"}}, timeout=60)
    assert run.controller_rc == 1, run.all_logs()
    log = run.log("controller")
    assert "the run failed" in log and "worker 1" in log and "injected fault" in log
    assert [r["status"] for r in run.records] == ["unfinished"] * len(TRACE)
    assert run.summary["run"]["status"] == "failed"


def test_worker_dying_mid_run_ends_the_run_with_records(model, tmp_path):
    # Microbatch 0 needs one decode step, the others eight: rank 1 dies at decode step 4, after
    # microbatch 0 is done and while the others are in flight.
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps([[4, 2], [4, 2], [4, 9], [4, 9], [4, 9], [4, 9]]))
    run = run_serving(tmp_path, model, token=2, ubatch=UBATCH, controller_args=["--input_sizes_file", str(sizes)],
                      worker_env={1: {"DEJAVU_FAULT": "rank=1,at=decode,step=4,how=exit"}}, timeout=60)
    assert run.controller_rc == 1, run.all_logs()
    log = run.log("controller")
    assert "worker 1 (stage1" in log and "stopped sending heartbeats" in log
    status = {r["id"]: r["status"] for r in run.records}
    assert status[0] == status[1] == "ok"
    assert {status[i] for i in range(2, 6)} == {"failed"}
    assert all(r["error"] for r in run.records if r["status"] != "ok")
    assert run.summary["counts"]["completed"] == 2 and run.summary["counts"]["failed"] == 4


def test_refused_worker_flag_reaches_the_controller(model, tmp_path):
    run = run_serving(tmp_path, model, token=1, ubatch=UBATCH, worker_args=["--swapping", "--resident_buffers", "1"],
                      controller_args=["--num_requests", "2"], timeout=60)
    assert run.worker_rcs == [2]
    assert "--resident_buffers must be >= 2" in run.log("worker0")
    log = run.log("controller")
    assert run.controller_rc == 1 and "worker 0 (stage0" in log and "--resident_buffers" in log
    assert "heartbeats" not in log  # it said why it stopped: not reported as lost


def test_stuck_pipeline_ends_after_the_progress_timeout(model, tmp_path):
    # The worker stays alive (its heartbeat goes on) but its main loop stops: only the progress deadline sees it.
    run = run_serving(tmp_path, model, token=1, ubatch=UBATCH, worker_env={0: {"DEJAVU_FAULT": "rank=0,at=decode,step=2,how=hang"}},
                      controller_args=["--num_requests", "2", "--output_len", "6", "--progress_timeout", "3"], timeout=60)
    assert run.controller_rc == 1, run.all_logs()
    assert "no token for 3 s (--progress_timeout)" in run.log("controller")
    assert {r["status"] for r in run.records} == {"failed"}
    assert run.worker_rcs == [3]  # told to abort
