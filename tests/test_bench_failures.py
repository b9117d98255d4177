"""bench/failures.py and bench/replication.py, small, on the CPU: real dejavu-run processes and a real
replica store; the numbers are not judged here, only that every point ran, gave the same tokens, and
says what it measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_failure_free_overhead_split_runs_three_planes_with_equal_outputs(tmp_path):
    failures = bench_module("failures")
    out = tmp_path / "failures.json"
    res = failures.main(["--failures", "0", "--split-overhead", "--requests", "4", "--input-len", "16",
                         "--output-len", "12", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["digests_equal"] and res["digests_equal"]
    rows = {r["mode"]: r for r in saved["rows"]}
    assert set(rows) == {"with_ft", "none", "plane"}
    # Only the with_ft run replicates; the plane-only run is recoverable but sends no replicas.
    assert rows["with_ft"]["replication_bytes"] > 0
    assert rows["none"]["replication_bytes"] == 0 and rows["plane"]["replication_bytes"] == 0
    assert all(r["tokens_recomputed"] == 0 and r["throughput_tok_s"] > 0 for r in rows.values())
    g = saved["goals"]
    assert {"replication_overhead", "plane_overhead", "replication_over_plane"} <= set(g)
    thr = {m: rows[m]["throughput_tok_s"] for m in rows}
    assert g["replication_over_plane"] == pytest.approx(1 - thr["with_ft"] / thr["plane"])


def test_replication_bench_holder_acknowledges_every_step(tmp_path):
    replication = bench_module("replication")
    out = tmp_path / "replication.json"
    row = replication.main(["--layers", "2", "--heads", "4", "--head-dim", "16", "--slots", "3", "--max-seq", "96",
                            "--prompt-len", "16", "--steps", "40", "--step-ms", "0.2", "--out", str(out)])
    assert row["steps_acked"] == row["steps"] == 40
    # Every step's slice (plus its positions) and the prompt reached the holder's store.
    assert row["bytes_acked"] >= 40 * row["step_bytes"] + 2 * 2 * 3 * 4 * 16 * 16 * 4
    assert json.loads(out.read_text())["results"][0]["stage_us_p50"] > 0
