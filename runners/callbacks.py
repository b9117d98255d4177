"""Hydra callbacks: after a multirun, index its run folders (sweep_index.json) for `dejavu compare`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepIndex(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dejavu.results.compare import write_sweep_index

        from dejavu.results.compare import failed_points

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            path = write_sweep_index(sweep_dir)
            print(f"sweep index: {path}\ncompare the points with: dejavu compare {sweep_dir}")
            failed = failed_points(sweep_dir)
            if failed:
                lines = [f"  {r['run_dir']}: exit {r['failed']['exit_code']}: {r['failed']['reason']}" for r in failed]
                print(f"dejavu-run: {len(failed)} sweep point(s) failed:\n" + "\n".join(lines), file=sys.stderr)
                sys.exit(1)
