"""Orchestration: turn a composed Hydra config into controller and worker processes.

``app`` is the Hydra entry point (`dejavu-run`); ``plan`` decides which process runs where with which
flags and environment; ``local``, ``ssh`` and ``mpirun`` start, supervise and stop them.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf


def conf_dir() -> Path:
    """The config tree: conf/ next to this package, or DEJAVU_CONF_DIR — the same rule as
    dejavu.model.registry.default_conf_dir, repeated here so composing a config never imports torch."""
    return Path(os.environ.get("DEJAVU_CONF_DIR") or Path(__file__).resolve().parents[1] / "conf").resolve()


# ${dejavu_conf:workload/files/x.json} -> an absolute path inside conf/, so presets can ship small files.
if not OmegaConf.has_resolver("dejavu_conf"):
    OmegaConf.register_new_resolver("dejavu_conf", lambda rel="": str(conf_dir() / rel))


def sweep_point_name(num, *, _root_) -> str:
    """A multirun job's folder name: its number and the values of the swept keys only, e.g.
    "1_topology=disagg,workload.rps=2" (Hydra's override_dirname would list every override)."""
    swept = set(OmegaConf.select(_root_, "hydra.sweeper.params", default=None) or {})
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [a for a in sys.argv[1:] if not a.startswith("-")]
        swept |= {o.key_or_group for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001 — a name is a convenience; the job number alone is enough
        pass
    task = OmegaConf.select(_root_, "hydra.overrides.task", default=None) or []
    parts = [t.lstrip("+~") for t in task if t.split("=", 1)[0].lstrip("+~") in swept]
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "-", ",".join(parts))[:100]
    return f"{num}_{name}" if name else str(num)


if not OmegaConf.has_resolver("dejavu_sweep_point"):
    OmegaConf.register_new_resolver("dejavu_sweep_point", sweep_point_name)
