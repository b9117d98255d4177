"""A Hydra multirun: one result folder per point, a sweep index, offline W&B runs sharing one group, and
`dejavu compare` on the sweep showing both points (and that their outputs are identical)."""

from __future__ import annotations

import json
import subprocess
import sys

from runner_helpers import REPO, dejavu_run, tiny_model_args


def test_two_point_multirun_indexes_logs_and_compares(tmp_path, tiny_checkpoint):
    """The disagg_vs_baseline preset is itself a multirun (hydra.mode=MULTIRUN over topology): one line."""
    from test_wandb import read_offline_run  # the offline W&B record reader of tests/test_wandb.py

    sweep = tmp_path / "sweep"
    r = dejavu_run(["+experiment=disagg_vs_baseline", *tiny_model_args(tiny_checkpoint("llama-gqa-bias")),
                    f"hydra.sweep.dir={sweep}"], timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    points = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in points] == ["0_topology=baseline", "1_topology=disagg"]
    for p in points:
        summary = json.loads((p / "summary.json").read_text())
        assert summary["counts"]["completed"] == 4
        assert (p / "logs" / "worker1.log").is_file()

    index = json.loads((sweep / "sweep_index.json").read_text())
    assert [run["run_dir"] for run in index["runs"]] == [p.name for p in points]
    assert [[o for o in run["overrides"] if o.startswith("topology=")] for run in index["runs"]] == \
        [["topology=baseline"], ["topology=disagg"]]

    groups = set()
    for p in points:
        [folder] = list((p / "wandb").glob("offline-run-*"))
        rec = read_offline_run(folder)
        groups.add(rec["run"].run_group)
        assert rec["summary"]["counts/completed"] == 4
        assert rec["config"]["topology"]["name"] == p.name.split("=")[1]
    [group] = groups
    assert group == f"disagg_vs_baseline-{sweep.name}"

    out = subprocess.run([sys.executable, "-m", "dejavu", "compare", str(sweep), "--no-plots"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "topology=baseline" in out.stdout and "topology=disagg" in out.stdout
    assert "IDENTICAL" in out.stdout  # the same tokens from the baseline pipeline and the disaggregated one


def test_sweep_point_folders_are_named_by_the_swept_keys_only(monkeypatch):
    from omegaconf import OmegaConf

    from runners import sweep_point_name

    task = ["topology=disagg", "workload.rps=2", "+model.path=/a/b", "logger=none"]
    root = OmegaConf.create({"hydra": {"sweeper": {"params": None}, "overrides": {"task": task}}})
    monkeypatch.setattr(sys, "argv", ["dejavu-run", "-m", "topology=baseline,disagg", "workload.rps=2",
                                      "+model.path=/a/b", "logger=none"])
    assert sweep_point_name(1, _root_=root) == "1_topology=disagg"
    # keys swept by a preset (hydra.sweeper.params) count too
    root.hydra.sweeper.params = {"workload.rps": "1,2"}
    assert sweep_point_name(1, _root_=root) == "1_topology=disagg,workload.rps=2"
    monkeypatch.setattr(sys, "argv", ["dejavu-run", "-m", "logger=none"])
    root.hydra.sweeper.params = None
    assert sweep_point_name(4, _root_=root) == "4"


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_checkpoint):
    """The first point asks for prompts longer than the model's positions (refused before launch); the
    second must still run, the index must list both, and the sweep must exit non-zero naming the first."""
    sweep = tmp_path / "sweep"
    r = dejavu_run(["-m", *tiny_model_args(tiny_checkpoint("llama-gqa-bias")), "workload.input_len=100000,12",
                    "logger=none", f"hydra.sweep.dir={sweep}"], timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    index = json.loads((sweep / "sweep_index.json").read_text())
    bad, good = index["runs"]
    assert bad["failed"]["exit_code"] == 2 and "input_len" in bad["failed"]["reason"]
    assert "failed" not in good and good["summary"]["counts/completed"] == 4
    assert "1 sweep point(s) failed" in r.stderr and bad["run_dir"] in r.stderr
