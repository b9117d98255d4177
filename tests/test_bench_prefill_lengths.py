"""bench/prefill_lengths.py compares GPU attention backends; without a GPU it must say so and stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_refuses_clearly_without_a_gpu():
    r = subprocess.run([sys.executable, "bench/prefill_lengths.py", "--device", "cpu"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs --device cuda" in r.stderr
