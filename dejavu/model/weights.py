"""Per-tensor, lazy reads from a Hugging Face checkpoint folder (config.json + safetensors).

A pipeline stage asks only for its own layers' tensors, and a tensor-parallel shard reads only its
slice (``safe_open(...).get_slice``), so no worker ever touches the whole checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the model it claims to be."""


@dataclass(frozen=True)
class Shard:
    """Take slice ``rank`` of ``size`` equal slices along ``dim``."""

    dim: int
    rank: int
    size: int


class HFCheckpoint:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        self._handles: dict[Path, object] = {}
        self._file_of = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            return {name: self.folder / f for name, f in weight_map.items()}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in checkpoint folder {self.folder}")
        names: dict[str, Path] = {}
        for f in files:
            for name in self._open(f).keys():
                names[name] = f
        return names

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for torn headers
                raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from None
            self._handles[path] = handle
        return handle

    def has(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.folder}")
        path = self._file_of[name]
        try:
            view = self._open(path).get_slice(name)
            if shard is None or shard.size == 1:
                return view[:]
            shape = view.get_shape()
            n = shape[shard.dim]
            if n % shard.size:
                raise CheckpointError(
                    f"tensor {name!r} has size {n} along dim {shard.dim}, not divisible into {shard.size} shards")
            step = n // shard.size
            index = [slice(None)] * len(shape)
            index[shard.dim] = slice(shard.rank * step, (shard.rank + 1) * step)
            return view[tuple(index)]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from None


class StateDictSource:
    """The same interface over an in-memory state dict (random models in tests and benchmarks)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "state dict") -> None:
        self.tensors, self.folder = tensors, label

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shard: Shard | None = None) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is missing from {self.folder}")
        t = self.tensors[name]
        if shard is None or shard.size == 1:
            return t
        return t.chunk(shard.size, dim=shard.dim)[shard.rank]
