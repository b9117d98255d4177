"""The config tree: every option of every group and every preset composes and passes the checks; bad
configs fail before anything starts, with messages that name the keys."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import runners.schema  # noqa: F401  (registers the structured config)
from runners import conf_dir
from runners.validate import ConfigError, check

from runner_helpers import REPO, dejavu_run

CONF = conf_dir()
GROUPS = ["cluster", "topology", "workload", "backend", "failure", "logger", "runner"]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def problems(*overrides: str, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        check(compose_cfg(*overrides), **kw)
    return str(e.value)


def test_default_composes_to_the_local_smollm2_run():
    cfg = compose_cfg()
    checked = check(cfg)
    c = checked.cfg
    assert c.model["name"] == "smollm2-135m"
    assert (c.runner.kind.value, c.backend.name.value, c.backend.device, c.topology.num_peers) == ("local", "gloo", "cpu", 1)
    assert c.workload.prompts and c.workload.chat_template and 10 <= c.workload.output_len <= 64
    assert checked.hosts == ["127.0.0.1"]
    assert checked.model_config.num_layers == 30


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes_typed(group, option):
    cfg = compose_cfg(f"{group}={option}")
    obj = OmegaConf.to_object(cfg)  # the structured schema: every key typed
    assert getattr(obj, group) is not None


@pytest.mark.parametrize("option", ["single", "baseline", "disagg"])
def test_topology_presets_pass_the_checks(option):
    check(compose_cfg(f"topology={option}"))


@pytest.mark.parametrize("option", ["fixed", "trace", "poisson", "timestamps"])
def test_workload_presets_pass_the_checks(option):
    check(compose_cfg(f"workload={option}"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_and_checks(name):
    cfg = compose_cfg(f"+experiment={name}")
    assert cfg.experiment == name
    if cfg.get("bench") and not (REPO / cfg.bench.script).exists():
        pytest.skip(f"{cfg.bench.script} is not written yet")
    check(cfg)


def test_disagg_vs_baseline_is_a_one_line_sweep_over_topology():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=disagg_vs_baseline"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.topology == "baseline,disagg"
    # both points use the same workers and workload
    a, b = compose_cfg("+experiment=disagg_vs_baseline", "topology=baseline"), compose_cfg("+experiment=disagg_vs_baseline", "topology=disagg")
    assert a.topology.num_peers == b.topology.num_peers and a.workload == b.workload


@pytest.mark.parametrize("args", [["--cfg", "job"], ["+experiment=disagg_vs_baseline", "--cfg", "job"],
                                  ["runner=ssh", "cluster=ip_info", "topology=disagg", "--cfg", "job"]])
def test_cfg_job_on_the_command_line(args):
    r = dejavu_run(args, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert {"model", "cluster", "topology", "workload", "backend", "failure", "logger", "runner"} <= set(cfg)


# ---- bad configs: each names its keys ---------------------------------------------------------------

def test_peers_mismatch_names_the_topology_keys():
    msg = problems("topology=disagg", "topology.num_peers=3")
    assert "topology.num_peers=3" in msg and "topology.num_prompt_peers=1" in msg
    assert "topology.tensor_parallelism=1" in msg and "topology.num_peers=2" in msg  # what would be right


def test_tp_must_divide_the_heads():
    msg = problems("topology.tensor_parallelism=2", "topology.num_peers=2")  # SmolLM2: 9 heads, 3 KV heads
    assert "topology.tensor_parallelism=2" in msg and "num_heads=9" in msg


def test_more_stages_than_layers():
    msg = problems("topology.num_token_peers=31", "topology.num_peers=31")
    assert "topology.num_token_peers=31" in msg and "30 layers" in msg


def test_missing_host_file(tmp_path):
    msg = problems("runner=ssh", "cluster=ip_info", f"cluster.hosts_file={tmp_path / 'nope'}")
    assert "cluster.hosts_file" in msg and str(tmp_path / "nope") in msg and "does not exist" in msg


def test_too_few_hosts(tmp_path):
    hosts = tmp_path / "ip_info"
    hosts.write_text("10.0.0.1\n")
    msg = problems("runner=ssh", "cluster=ip_info", f"cluster.hosts_file={hosts}", "topology=disagg")
    assert "cluster.hosts_file" in msg and "1 worker address" in msg and "topology.num_peers=2" in msg


def test_ssh_without_a_host_file():
    assert "cluster.hosts_file" in problems("runner=ssh")


def test_backend_and_runner_must_agree():
    assert "runner=mpirun" in problems("backend=mpi")
    assert "backend=mpi" in problems("runner=mpirun")


def test_nccl_needs_gpus():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    msg = problems("backend=nccl")
    assert "backend.device=cuda" in msg and "GPU" in msg
    assert "needs GPUs" in problems("backend=nccl", "backend.device=cpu")


def test_workload_rules_come_from_the_workload_module(tmp_path):
    assert "workload.rps" in problems("workload=poisson", "workload.rps=0")
    bad = tmp_path / "trace.json"
    bad.write_text("[[1, 2, 3]]")
    assert "workload.input_sizes_file" in problems("workload=trace", f"workload.input_sizes_file={bad}")
    msg = problems("workload=poisson", "workload.input_len=9000")  # + output_len > SmolLM2's 8192 positions
    assert "workload.input_len=9000" in msg and "8192" in msg


def test_unknown_model_is_named():
    msg = problems("model.source=hf_folder", "+model.path=/no/such/folder")
    assert "model" in msg and "/no/such/folder" in msg


def test_all_problems_are_reported_at_once():
    msg = problems("topology.num_peers=5", "backend=mpi", "runner.timeout_s=-1")
    assert "topology.num_peers=5" in msg and "backend=mpi" in msg and "runner.timeout_s" in msg


# ---- through the command line: Hydra's own errors and ours, before any process starts -----------------

@pytest.mark.parametrize("args,expect", [
    (["topology=nope"], ["topology", "nope", "baseline"]),  # unknown group option: lists the available ones
    (["topology.num_peers=two"], ["topology.num_peers", "two"]),  # wrong type
    (["backend.name=tcp"], ["backend.name", "tcp"]),  # unknown backend name (enum)
    (["topology.ranks=4"], ["ranks"]),  # unknown key
])
def test_hydra_rejects_bad_overrides(args, expect, tmp_path):
    r = dejavu_run([*args, f"hydra.run.dir={tmp_path / 'run'}"], timeout=60)
    assert r.returncode != 0
    for word in expect:
        assert word in r.stderr, r.stderr
    assert not (tmp_path / "run" / "logs").exists()


def test_cross_key_errors_stop_before_launch(tmp_path):
    r = dejavu_run(["runner=ssh", "cluster=ip_info", f"cluster.hosts_file={tmp_path / 'missing'}", "topology=disagg",
                    "topology.num_peers=3", f"hydra.run.dir={tmp_path / 'run'}"], timeout=60)
    assert r.returncode == 2
    assert "nothing was started" in r.stderr and "cluster.hosts_file" in r.stderr and "topology.num_peers=3" in r.stderr
    assert not (tmp_path / "run" / "logs").exists()


def test_streaming_microbench_preset_runs_the_bench(tmp_path):
    if not (REPO / "bench" / "streaming.py").exists():
        pytest.skip("bench/streaming.py is not written yet")
    run = tmp_path / "run"
    r = dejavu_run(["+experiment=streaming_microbench", "logger=none", f"hydra.run.dir={run}",
                    f"bench.args=[--out,{run}/streaming.json,--skip-e2e,--iters,2]"], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "buffered" in r.stdout
    assert "the targets are GPU targets" in r.stdout  # on the CPU its `false` rows say nothing about them
    assert "ladder" in json.loads((run / "streaming.json").read_text())


def test_gpu_workers_get_the_longest_request_as_their_kv_buffer_length(tmp_path, monkeypatch):
    """GPU workers capture their KV buffers at start-up: the plan sizes them to the longest request."""
    import runners.validate
    from runners.plan import build, local_ports, write_inputs

    monkeypatch.setattr(runners.validate, "_local_gpus", lambda: 1)  # this machine has none; the plan is the same

    def worker_args(*overrides):
        checked = check(compose_cfg("model=opt-125m", "model.weights=random", *overrides))
        plan = build(checked, write_inputs(checked, tmp_path), proc_dir=str(tmp_path), ports=local_ports(checked.cfg),
                     controller_host="127.0.0.1", controller_ip="127.0.0.1")
        return plan.workers[0].args

    gpu = worker_args("backend=nccl", "workload.input_len=100", "workload.output_len=28")
    assert gpu[gpu.index("--max_seq_len") + 1] == "128"
    trace = worker_args("backend=nccl", "workload=trace")  # the bundled trace file's longest entry
    entries = json.loads(open(compose_cfg("workload=trace").workload.input_sizes_file).read())
    assert trace[trace.index("--max_seq_len") + 1] == str(max(p + g for p, g in entries))
    assert "--max_seq_len" not in worker_args("backend=gloo")  # CPU workers size buffers as requests come


def test_gloo_workers_may_share_a_gpu_but_nccl_ranks_may_not(monkeypatch):
    """NCCL refuses two ranks on one GPU; gloo stages through host memory, so its workers share the card
    (how the GPU machine with one card runs a 3-stage pipeline)."""
    import runners.validate

    monkeypatch.setattr(runners.validate, "_local_gpus", lambda: 1)
    gloo = check(compose_cfg("backend.device=cuda", "topology.num_peers=3", "topology.num_token_peers=3"))
    assert any("3 workers share 1 GPU" in n for n in gloo.notes)
    msg = problems("backend=nccl", "topology.num_peers=3", "topology.num_token_peers=3")
    assert "backend=nccl needs 3 GPU(s)" in msg and "backend=gloo" in msg
    monkeypatch.setattr(runners.validate, "_local_gpus", lambda: 0)
    assert "no visible GPU" in problems("backend.device=cuda")
