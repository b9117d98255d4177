"""Bad input to the engine gives a clear error naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.stage import StageModel
from dejavu.model.tp import ThreadGroup
from dejavu.model.weights import CheckpointError, HFCheckpoint
from dejavu.sampling import SamplingParams


def test_layer_range_outside_the_model(tiny_checkpoint):
    cfg = ModelConfig.from_folder(tiny_checkpoint("opt-pre"))
    with pytest.raises(ValueError, match=r"layer range \[2, 9\) is outside the model's 4 layers"):
        StageModel(cfg, 2, 9)
    with pytest.raises(ValueError, match="cannot split 4 layers into 5 stages"):
        build_stages(cfg, HFCheckpoint(tiny_checkpoint("opt-pre")), 5)


def test_tensor_parallel_degree_must_divide_heads(tiny_checkpoint):
    cfg = ModelConfig.from_folder(tiny_checkpoint("llama-gqa-bias"))  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="tensor parallel degree 3 does not divide the model's num_heads=4"):
        StageModel(cfg, comm=ThreadGroup(3).member(0))


def test_prompt_longer_than_positions(tiny_checkpoint):
    folder = tiny_checkpoint("opt-pre")
    engine = Engine(build_stages(ModelConfig.from_folder(folder), HFCheckpoint(folder)))
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        engine.generate([list(range(1, 100))], SamplingParams(max_new_tokens=64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 2, 500]], SamplingParams(max_new_tokens=4))


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("llama-gqa-bias")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    cfg = ModelConfig.from_folder(tmp_path)
    StageModel(cfg, 0, 2).load_weights(HFCheckpoint(tmp_path))  # a stage that doesn't need it loads fine
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight.* is missing"):
        StageModel(cfg, 2, 4).load_weights(HFCheckpoint(tmp_path))


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("opt-pre")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = load_file(src / "model.safetensors")
    tensors["model.decoder.layers.1.fc1.weight"] = tensors["model.decoder.layers.1.fc1.weight"][:, :10].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.decoder.layers.1.fc1.weight has shape \(128, 10\)"):
        StageModel(ModelConfig.from_folder(tmp_path)).load_weights(HFCheckpoint(tmp_path))


def test_corrupt_or_missing_files(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        HFCheckpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        HFCheckpoint(tmp_path)
    shutil.copy(tiny_checkpoint("opt-pre") / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint file .*model.safetensors"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ModelConfig.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba' in config.json is not supported"):
        ModelConfig.from_folder(tmp_path)
