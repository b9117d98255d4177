"""What a new user trips on (issue 28): shape-only models, keys without effect, refused configs.

A shape-only model is refused at validation unless it runs with random weights, and then serves end to
end with the same tokens at 2 stages, at TP 2 and in the single-process engine; keys that the chosen
options would ignore, and keys no group has, are refused before launch naming what would use them; a
refused config leaves only the record of its refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import runners.schema  # noqa: F401  (registers the structured config)
from runners import conf_dir
from runners.validate import ConfigError, check

from runner_helpers import dejavu_run

CONF = conf_dir()


def checked(*overrides: str):
    """check() as dejavu-run calls it: the composed config and the command line's overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return check(cfg, overrides=list(overrides))


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        checked(*overrides)
    return str(e.value)


def only_the_refusal(run: Path) -> dict:
    """The run folder of a refused config: Hydra's record of what was asked and failed.json, nothing else."""
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "failed.json"], sorted(p.name for p in run.iterdir())
    record = json.loads((run / "failed.json").read_text())
    assert record["exit_code"] == 2 and record["refused"] is True
    return record


# ---- shape-only models ----------------------------------------------------------------------------------

def test_a_shape_only_model_is_refused_at_validation_unless_random_weights():
    msg = refused("model=opt-125m")
    assert "model=opt-125m is a shape-only entry" in msg and "model.weights=random" in msg
    c = checked("model=opt-125m", "model.weights=random")
    # The workload's text prompts give way to random ids, and the run says so.
    assert c.cfg.workload.prompts is None and not c.cfg.workload.chat_template
    assert any("random token ids" in n for n in c.notes)
    assert "model.weights='nonsense'" in refused("model=opt-125m", "model.weights=nonsense")
    # Text prompts asked for on the command line have no use with random weights: refused, not dropped.
    assert "workload.prompts_file" in refused("model=opt-125m", "model.weights=random", "workload.prompts_file=/x.txt")
    # The model-free stand-in needs no weights.
    check(compose_plain("model=opt-125m", "entry=runners.standin"))


def compose_plain(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_the_command_line_refuses_a_shape_only_model_and_keeps_only_the_refusal(tmp_path):
    run = tmp_path / "run"
    r = dejavu_run(["model=opt-125m", "logger=none", f"hydra.run.dir={run}"], timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nothing was started" in r.stderr and "model.weights=random" in r.stderr
    assert "failed.json" in r.stderr
    assert "shape-only" in only_the_refusal(run)["reason"]


def test_generate_names_the_shape_only_model():
    from dejavu.cli import main

    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["generate", "--model", "opt-125m", "hi"]) == 2
    assert "'opt-125m' is a shape-only entry" in err.getvalue() and "'model'" not in err.getvalue()


def test_random_weights_serve_end_to_end_with_one_digest_across_topologies(tmp_path):
    """opt-125m with random weights at 2 pipeline stages and at TP 2: the same tokens, also the engine's."""
    common = ["model=opt-125m", "model.weights=random", "model.weights_seed=5", "logger=none",
              "workload.num_requests=2", "workload.input_len=8", "workload.output_len=4"]
    runs = {}
    for name, layout in (("stages", ["topology=baseline"]),
                         ("tp", ["topology.tensor_parallelism=2", "topology.num_peers=2"])):
        run = tmp_path / name
        r = dejavu_run([*common, *layout, f"hydra.run.dir={run}"], timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "weights: RANDOM" in r.stdout and "answers as token ids (model.weights=random" in r.stdout
        summary = json.loads((run / "summary.json").read_text())
        assert summary["run"]["weights"] == {"kind": "random", "seed": 5}
        assert summary["counts"]["completed"] == 2
        runs[name] = summary, [json.loads(line) for line in (run / "requests.jsonl").read_text().splitlines()]
    assert "baseline: 2 stages" in (tmp_path / "stages" / "logs" / "controller.log").read_text()
    assert "one stage, tensor parallelism 2" in (tmp_path / "tp" / "logs" / "controller.log").read_text()
    assert runs["stages"][0]["outputs_sha256"] == runs["tp"][0]["outputs_sha256"]

    # The same random model in one process: the engine gives the runs' tokens.
    import torch

    from dejavu.engine import Engine, build_stages
    from dejavu.model.random_weights import RandomWeights
    from dejavu.model.registry import resolve_model
    from dejavu.sampling import SamplingParams

    records = sorted(runs["stages"][1], key=lambda r: r["id"])
    assert [len(r["prompt_ids"]) for r in records] == [8, 8]
    model = resolve_model("opt-125m", weights=False)
    stages = build_stages(model.config, RandomWeights(model.hf_config, 5, dtype=torch.float32), 1)
    out = Engine(stages).generate([r["prompt_ids"] for r in records], SamplingParams(max_new_tokens=4))
    assert [g.output_ids for g in out] == [r["output_ids"] for r in records]


def test_the_layout_is_named_as_it_is():
    from dejavu.controller import describe_topology
    from dejavu.worker.topology import Topology

    assert describe_topology(Topology(1, 0, 1, 4)) == "single worker (the whole model)"
    assert describe_topology(Topology(1, 0, 2, 4)).startswith("baseline: 2 stages")
    assert describe_topology(Topology(2, 0, 1, 4)).startswith("one stage, tensor parallelism 2")
    assert describe_topology(Topology(1, 1, 1, 4)).startswith("disaggregated: 1 prompt + 1 token stage,")


# ---- keys without effect, unknown keys --------------------------------------------------------------------

@pytest.mark.parametrize("overrides,expect", [
    (["workload.rps=2"], ["workload.rps=2 has no effect with workload=fixed", "needs workload=poisson"]),
    (["workload=timestamps", "workload.arrival_seed=3"], ["workload.arrival_seed=3", "input_timestamps_file"]),
    (["workload.input_len=64"], ["workload.input_len=64", "text prompts", "workload.prompts=null"]),
    (["workload=trace", "workload.output_len=8"], ["workload.output_len=8", "workload.input_sizes_file"]),
    (["workload.top_p=0.9"], ["workload.top_p=0.9", "needs workload.temperature > 0"]),
    (["workload=poisson", "workload.chat_template=true"], ["workload.chat_template=true", "needs text prompts"]),
    (["cluster.ssh.user=me"], ["cluster.ssh.user=me", "needs runner=ssh"]),
    (["+backend.mca.btl=tcp"], ["backend.mca.btl=tcp", "needs backend=mpi"]),
    (["logger=none", "logger.project=x"], ["logger.project=x", "logger=wandb_offline"]),
    (["model.weights_seed=3"], ["model.weights_seed=3", "needs model.weights=random"]),
    (["+workload.path=/x.json"], ["workload.path", "would be ignored"]),
    (["+topology.ranks=4"], ["topology.ranks", "would be ignored"]),
    (["+model.wieghts=random"], ["model.wieghts", "did you mean model.weights"]),
])
def test_keys_without_effect_are_refused_naming_what_would_use_them(overrides, expect):
    msg = refused(*overrides)
    for word in expect:
        assert word in msg, msg


@pytest.mark.parametrize("overrides", [
    ["workload=poisson", "workload.rps=2", "workload.arrival_seed=1"],
    ["workload.prompts=null", "workload.input_len=64", "workload.chat_template=false"],
    ["workload.temperature=0.7", "workload.top_p=0.9", "workload.seed=3"],
    ["backend.cuda_graphs=false"],  # turning a setting off asks for nothing that could be ignored
    ["+experiment=disagg_vs_baseline", "workload.rps=1"],
    ["+cluster.env.FOO=1", "model=opt-125m", "model.weights=random", "model.weights_seed=2"],
])
def test_keys_that_take_effect_pass(overrides):
    checked(*overrides)


def test_the_readme_sweep_of_a_key_without_effect_is_refused_point_by_point(tmp_path):
    sweep = tmp_path / "sweep"
    r = dejavu_run(["-m", "topology=baseline,disagg", "workload.rps=1,2", "logger=none",
                    f"hydra.sweep.dir={sweep}"], timeout=180)
    assert r.returncode != 0
    points = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(points) == 4
    for point in points:
        assert "needs workload=poisson" in only_the_refusal(point)["reason"]
    index = json.loads((sweep / "sweep_index.json").read_text())
    assert all(run["failed"]["refused"] for run in index["runs"])


def test_token_id_answers_say_why_once():
    from runners.app import token_ids_note

    note = token_ids_note(checked("workload=poisson").cfg, random=False)
    assert "workload=poisson draws its prompts as random token ids" in note
    assert "model.weights=random" in token_ids_note(checked().cfg, random=True)
