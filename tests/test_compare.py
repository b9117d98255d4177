"""``dejavu compare`` and the sweep index: tables, digest verdicts, plots, errors."""

from __future__ import annotations

import json

import pytest

from dejavu.records import RequestRecord
from dejavu.results import write_results
from dejavu.results.compare import SWEEP_INDEX, compare, load_runs, main, write_sweep_index


def make_run(folder, outputs, speed=1.0, overrides=None):
    recs = [RequestRecord(id=i, prompt_ids=[1, 2], output_ids=list(ids), arrival_s=0.0, first_token_s=0.1 / speed,
                          finish_s=(0.1 + 0.05 * len(ids)) / speed, status="ok") for i, ids in enumerate(outputs)]
    s = write_results(folder, recs, [], None, {"speed": speed}, plots=False)
    if overrides is not None:  # what Hydra leaves in a multirun job folder
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return s


OUT_A = [[5, 6, 7], [8, 9]]
OUT_B = [[5, 6, 7], [8, 10]]  # one token differs


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    make_run(d / "0", OUT_A, 1.0, ["topology=baseline", "workload.rps=1"])
    make_run(d / "1", OUT_A, 2.0, ["topology=disagg", "workload.rps=1"])
    make_run(d / "10", OUT_A, 4.0, ["topology=disagg", "workload.rps=4"])  # natural order: after 1, not before
    return d


def test_sweep_index(sweep):
    path = write_sweep_index(sweep)
    assert path == sweep / SWEEP_INDEX
    index = json.loads(path.read_text())
    assert index["format"] == "dejavu-sweep-index/1"
    assert [r["run_dir"] for r in index["runs"]] == ["0", "1", "10"]
    assert index["runs"][1]["overrides"] == ["topology=disagg", "workload.rps=1"]
    s1 = json.loads((sweep / "1" / "summary.json").read_text())
    assert index["runs"][1]["summary"]["throughput/requests_per_s"] == s1["throughput"]["requests_per_s"]
    assert index["runs"][1]["summary"]["outputs_sha256"] == s1["outputs_sha256"]
    # Explicit overrides win over Hydra's file.
    index = json.loads(write_sweep_index(sweep, overrides={"0": ["x=1"]}).read_text())
    assert index["runs"][0]["overrides"] == ["x=1"]
    # The index alone is enough when run folders are gone (e.g. only the index was copied).
    lone = sweep.parent / "lone"
    lone.mkdir()
    (lone / SWEEP_INDEX).write_text(path.read_text())
    runs = load_runs(lone)
    assert [r.label for r in runs] == ["x=1", "topology=disagg workload.rps=1", "topology=disagg workload.rps=4"]
    assert runs[2].summary["throughput"]["requests_per_s"] == pytest.approx(
        json.loads((sweep / "10" / "summary.json").read_text())["throughput"]["requests_per_s"])


def test_compare_sweep_identical_outputs(sweep, capsys):
    write_sweep_index(sweep)
    assert main([str(sweep), "--expect-same"]) == 0
    out = capsys.readouterr().out
    assert "A = topology=baseline workload.rps=1" in out and "C = topology=disagg workload.rps=4" in out
    assert "outputs_sha256: IDENTICAL across A, B, C" in out
    row = next(line for line in out.splitlines() if line.startswith("throughput req/s"))
    s = [json.loads((sweep / k / "summary.json").read_text()) for k in ("0", "1", "10")]
    assert row.split()[2:] == [f"{x['throughput']['requests_per_s']:.4g}" for x in s]
    plots = sorted(p.name for p in (sweep / "compare").glob("*.png"))
    assert "compare_throughput_requests_per_s.png" in plots and "compare_latency_s_p99.png" in plots
    assert "A = topology=baseline" in (sweep / "compare" / "legend.txt").read_text()


def test_compare_flags_differing_outputs(tmp_path, sweep, capsys):
    other = tmp_path / "other-run"
    make_run(other, OUT_B)
    result = compare([sweep / "0", other], out=tmp_path / "cmp", stream=False)
    assert result.same_outputs is False and sorted(map(sorted, result.digest_groups.values())) == [["A"], ["B"]]
    assert (tmp_path / "cmp" / "compare_throughput_output_tokens_per_s.png").exists()
    assert main([str(sweep / "0"), str(other), "--no-plots", "--expect-same"]) == 1
    out = capsys.readouterr().out
    assert "outputs_sha256: DIFFER" in out and "A = " in out and "B = " in out
    # Without --expect-same, a difference is reported but is not an error.
    assert main([str(sweep), str(other), "--no-plots"]) == 0
    assert "DIFFER — A, B, C = " in capsys.readouterr().out


def test_compare_errors(tmp_path, capsys, monkeypatch):
    assert main([str(tmp_path / "nope")]) == 2
    assert "dejavu compare: error: '" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no summary.json or sweep_index.json in or under" in capsys.readouterr().err
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert main(["--wandb-group", "g", "--wandb-project", "p"]) == 2
    assert "needs an API key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
