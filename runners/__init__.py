"""Orchestration: turn a composed Hydra config into controller and worker processes.

``app`` is the Hydra entry point (`dejavu-run`); ``plan`` decides which process runs where with which
flags and environment; ``local``, ``ssh`` and ``mpirun`` start, supervise and stop them.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def conf_dir() -> Path:
    """The config tree: conf/ next to this package, or DEJAVU_CONF_DIR — the same rule as
    dejavu.model.registry.default_conf_dir, repeated here so composing a config never imports torch."""
    return Path(os.environ.get("DEJAVU_CONF_DIR") or Path(__file__).resolve().parents[1] / "conf").resolve()


# ${dejavu_conf:workload/files/x.json} -> an absolute path inside conf/, so presets can ship small files.
if not OmegaConf.has_resolver("dejavu_conf"):
    OmegaConf.register_new_resolver("dejavu_conf", lambda rel="": str(conf_dir() / rel))
