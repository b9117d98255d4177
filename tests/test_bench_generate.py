"""bench/generate.py on the CPU (tiny shapes): ours against transformers with the match rate it reports,
and --variants with --rounds (each cell the median of its passes)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/generate.py", "--device", "cpu", "--shapes", "tiny-opt",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ours_against_transformers_on_tiny_opt(tmp_path):
    out = tmp_path / "gen.json"
    r = _run("--batches", "1,2", "--prompt", "16", "--gen", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    ours = {r["batch"]: r for r in rows if r["impl"] == "ours"}
    hf = {r["batch"]: r for r in rows if r["impl"] == "hf"}
    assert set(ours) == set(hf) == {1, 2}
    for b in (1, 2):
        # fp32 on both sides, same weights: greedy ids must agree token for token.
        assert ours[b]["match_vs_hf_fp32"]["rate"] == 1.0, ours[b]
        assert ours[b]["decode_step_ms"] > 0 and ours[b]["floor_ms"] > 0
    assert "| tiny-opt | fp32 | 1 |" in r.stdout


def test_variant_rounds_report_the_median(tmp_path):
    out = tmp_path / "variants.json"
    r = _run("--variants", "--rounds", "3", "--batches", "1,2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [row for row in json.loads(out.read_text())["results"] if row["impl"] == "variant"]
    assert {row["batch"] for row in rows} == {1, 2}  # on the CPU only the eager variant runs
    for row in rows:
        assert len(row["decode_step_ms_rounds"]) == 3
        assert row["decode_step_ms"] == statistics.median(row["decode_step_ms_rounds"])
    assert r.stdout.count("round 3/3") == 2


def test_rounds_must_be_positive():
    r = _run("--variants", "--rounds", "0")
    assert r.returncode == 2 and "--rounds must be at least 1, got 0" in r.stderr
