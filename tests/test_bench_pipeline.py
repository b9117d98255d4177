"""Smoke: bench/pipeline.py runs a 2-worker baseline and a 1+1 disaggregated run through `dejavu-run` and
writes both rows with the same outputs digest. Five requests in microbatches of two: the last one fills
part of a pooled KV buffer, on the baseline stages and through the disaggregated hand-over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import llama

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_bench_pipeline_smoke(tmp_path):
    ckpt = llama(tmp_path / "tiny", layers=4)
    out = tmp_path / "pipeline.json"
    r = subprocess.run([sys.executable, "bench/pipeline.py", "--model", str(ckpt), "--workers", "2",
                        "--requests", "5", "--input-len", "8", "--output-len", "4", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["workloads"]["default"]["rows"]
    assert [x["label"] for x in rows] == ["baseline 2", "disagg 1+1"]
    assert all(x["completed"] == 5 == x["total"] for x in rows)
    assert rows[0]["outputs_sha256"] == rows[1]["outputs_sha256"]
    assert set(rows[1]["bubble_by_stage"]) == {"prompt0", "token0"}
    assert "outputs_sha256 equal across runs" in r.stdout
