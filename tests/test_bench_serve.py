"""bench/serve.py's serving path on the CPU: a real dejavu-run (controller + one worker process) whose
outputs must equal transformers.generate on the prompts the controller drew (fp32, greedy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_serving_path_tokens_equal_transformers(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import serve
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "serve.json"
    # 6 requests in microbatches of 4: the second microbatch runs in part of a pooled KV buffer.
    assert serve.main(["--device", "cpu", "--path", "serving", "--requests", "6", "--batch", "4",
                       "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["serving_equal_hf"] == 1.0
    assert row["serving_tok_per_s"] > 0 and row["requests"] == 6
