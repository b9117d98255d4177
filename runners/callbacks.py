"""Hydra callbacks: after a multirun, index its run folders (sweep_index.json) for `dejavu compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepIndex(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dejavu.results.compare import write_sweep_index

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            path = write_sweep_index(sweep_dir)
            print(f"sweep index: {path}\ncompare the points with: dejavu compare {sweep_dir}")
