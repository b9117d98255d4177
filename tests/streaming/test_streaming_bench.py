"""bench/streaming.py as a smoke test on the CPU: a tiny shape, every section including end to end with
replication through StepReplicator; the replica must restore the caches and the tokens must not change."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "streaming.py"


def test_bench_runs_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_streaming", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "streaming.json"
    result = bench.main(["--device", "cpu", "--iters", "1", "--e2e-repeats", "1", "--vocab", "256",
                         "--out", str(out)])
    assert json.loads(out.read_text())["targets"] == result["targets"]
    rows = {r["what"]: r for r in result["ladder"]}
    assert {"buffered_s", "buffered_generic_s", "raw_s"} <= set(rows["token step slice"])
    assert {"buffered_s", "host_positions_s", "buffered_generic_s"} <= set(rows["replicate_step (per-slot positions)"])
    assert set(result["call_overhead_us"]) >= {"stream_out buffered", "StepReplicator.step (host positions)"}
    e2e = result["end_to_end"]
    assert e2e["same_tokens"] and e2e["replica_matches"] and e2e["pinned_allocs_while_timed"] == 0
    # The one timed call replicated every decode step (new_tokens - 1) and every prompt layer.
    shape = result["shape"]
    tally = e2e["stream_stats"]["replication"]["local"]
    assert tally["count"] == (shape["new_tokens"] - 1) + shape["layers"]
