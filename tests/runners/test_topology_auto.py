"""topology=auto: the planner picks the split before launch; it composes, runs (a real dejavu-run) and writes
its reasoning into the run folder; bad inputs are refused naming the key."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

import runners.schema  # noqa: F401  (registers the structured config)
from runners import conf_dir
from runners.validate import ConfigError, check

from runner_helpers import dejavu_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import llama  # noqa: E402

CONF = conf_dir()
GIVEN = ["planner.prompt_time_s=0.5", "planner.token_time_s=0.01"]
SIZES = ["workload=poisson", "workload.input_len=100", "workload.output_len=100", "topology.ubatch_size=1"]


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        check(compose_cfg(*overrides), overrides=list(overrides))
    return str(e.value)


def test_auto_composes_and_the_planner_fills_in_the_split():
    ov = ["topology=auto", "topology.num_peers=8", "model=opt-1.3b", "model.weights=random", *SIZES, *GIVEN]
    checked = check(compose_cfg(*ov), overrides=ov)
    t = checked.cfg.topology
    # D_t = ceil(8 * 100 * 0.01 / (0.5 + 100 * 0.01)) = ceil(5.33) = 6
    assert (t.num_prompt_peers, t.num_token_peers, t.num_peers) == (2, 6, 8)
    reasoning = "\n".join(checked.plan["reasoning"])
    assert "ceil(5.333)" in reasoning and "decided by: balance" in reasoning
    assert "topology.num_prompt_peers=2 topology.num_token_peers=6" in reasoning


def test_auto_memory_floor_and_tensor_parallelism():
    # 4 machines of 2 GPUs each (num_peers=8, TP 2); 2.5 GB per machine cannot hold OPT-1.3B's fp16 layers
    # (24 x 0.1 GB) plus embeddings on one machine, so both sides need more than one.
    ov = ["topology=auto", "topology.num_peers=8", "topology.tensor_parallelism=2", "model=opt-1.3b",
          "model.weights=random", "backend.weights_data_type=fp16", *SIZES, *GIVEN, "planner.machine_memory_gb=2.5"]
    checked = check(compose_cfg(*ov), overrides=ov)
    t, plan = checked.cfg.topology, checked.plan["plan"]
    assert t.num_prompt_peers + t.num_token_peers == 4 and t.num_peers == 8
    assert plan["prompt_floor"]["machines"] == 2 and plan["token_floor"]["machines"] == 2
    assert (t.num_prompt_peers, t.num_token_peers) == (2, 2) and plan["decided_by"] == "prompt memory floor"


@pytest.mark.parametrize("overrides,needle", [
    (["topology.num_peers=0"], "topology.num_peers=0 must be >= 1"),
    (["planner.machine_memory_gb=0.001"], "planner.machine_memory_gb: no feasible split"),
    (["planner.machine_memory_gb=0.6", "topology.num_peers=2"], "topology.num_peers=2: no feasible split"),
    (["planner.prompt_time_s=0.5"], "planner.token_time_s is not set"),
    (["planner.profile=/nonexistent/profile.json"], "planner.profile: profile file"),
])
def test_auto_refuses_bad_inputs_naming_the_key(overrides, needle):
    base = ["topology=auto", "model=opt-1.3b", "model.weights=random", "backend.weights_data_type=fp16", *SIZES]
    if not any(o.startswith(("planner.prompt_time_s", "planner.profile")) for o in overrides):
        base += GIVEN  # times given: no quick profile of OPT-1.3B on this CPU
    assert needle in problems(*base, *overrides)


def test_auto_refuses_a_malformed_profile(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "dejavu-profile/1", "model": "opt-1.3b", "prompt": "fast"}))
    msg = problems("topology=auto", "model=opt-1.3b", "model.weights=random", *SIZES, f"planner.profile={bad}")
    assert "planner.profile" in msg and str(bad) in msg


def test_unknown_model_is_refused_by_name():
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("topology=auto", "model=no-such-model")
    assert "model/no-such-model" in str(e.value)


def test_planner_keys_need_topology_auto():
    assert "planner.machine_memory_gb=8 has no effect with topology=disagg" in problems(
        "topology=disagg", "planner.machine_memory_gb=8")


@pytest.mark.timeout(240)
def test_auto_runs_and_writes_its_reasoning(tmp_path):
    """A real run: the planner profiles the tiny model on this CPU, picks a split of 3 workers, the run
    serves every request and its folder holds planner.txt and planner.json."""
    ckpt = llama(tmp_path / "tiny", layers=4)
    run_dir = tmp_path / "run"
    r = dejavu_run(["topology=auto", "topology.num_peers=3", "model.source=hf_folder", f"+model.path={ckpt}",
                    "model.name=tiny", "workload=poisson", "workload.num_requests=6", "workload.input_len=24",
                    "workload.output_len=6", "workload.rps=20", "logger=none", "print_answers=false",
                    f"hydra.run.dir={run_dir}"], timeout=200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (run_dir / "planner.txt").read_text()
    assert "a quick profile of tiny on this CPU" in text and "balance: D_t = ceil(" in text
    rec = json.loads((run_dir / "planner.json").read_text())
    plan = rec["plan"]
    assert plan["prompt_machines"] + plan["token_machines"] == 3 and plan["prompt_machines"] >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["completed"] == 6
    stages = set(summary["stages"])
    assert {f"prompt{i}" for i in range(plan["prompt_machines"])} <= stages
    assert "topology=auto, the planner's reasoning" in r.stdout
