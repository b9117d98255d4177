"""GPT-2 and BLOOM in our engine give transformers' greedy tokens: one stage, a pipeline, TP in threads.

BLOOM's ALiBi is where tensor parallelism goes wrong (each shard must use the slopes of its own heads),
so BLOOM is also tested with 6 heads: a non-power-of-two count, whose extra slopes are interleaved, and
which leaves each of 2 shards 3 heads whose slopes are not a prefix of anything.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dejavu.engine import Engine, build_stages
from dejavu.model import bloom as bloom_module
from dejavu.model.config import ModelConfig
from dejavu.model.stage import StageModel
from dejavu.model.tp import ThreadGroup
from dejavu.model.weights import CheckpointError, HFCheckpoint
from dejavu.sampling import SamplingParams
from tiny_models import REFERENCE_NEW as NEW, REFERENCE_PROMPTS as PROMPTS
from tiny_models import hf_greedy

FAMILIES = ["gpt2", "bloom", "bloom-6heads", "bloom-post-ln-residual"]  # tiny checkpoints in conftest


@pytest.fixture
def reference(hf_reference):
    return hf_reference


def generate(folder: Path, stages: int = 1, comm=None, src=None) -> list[list[int]]:
    cfg = ModelConfig.from_folder(folder)
    engine = Engine(build_stages(cfg, src or HFCheckpoint(folder), stages, comm=comm, dtype="fp64"))
    return [g.output_ids for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))]


def in_threads(degree: int, fn) -> list:
    """fn(comm) in one thread per tensor-parallel rank."""
    return ThreadGroup(degree).run(fn, timeout=120)


# ---- tokens equal transformers' --------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stages", [1, 2])
def test_greedy_matches_transformers(tiny_checkpoint, reference, family, stages):
    assert generate(tiny_checkpoint(family), stages) == reference(family)


@pytest.mark.parametrize("family", ["gpt2", "bloom", "bloom-6heads"])
def test_tensor_parallel_two_shards_match_transformers(tiny_checkpoint, reference, family):
    # Two pipeline stages of two shards each: sharded loads of every tensor kind, on both stages.
    folder, want = tiny_checkpoint(family), reference(family)  # built here, not raced by the shard threads
    shard0, shard1 = in_threads(2, lambda comm: generate(folder, 2, comm=comm))
    assert shard0 == shard1 == want


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_bloom_prefill_logits_equal_transformers(tiny_checkpoint, degree):
    """Every position's logits of a right-padded batch: a wrong slope on any head of any shard shows up
    here even where it would not flip a greedy token. (The reference's softmax runs in fp32 even in an
    fp64 model, so agreement is to ~1e-6, not fp64 rounding; a slope bug moves logits by ~0.1 or more.)"""
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint("bloom-6heads")
    batch = torch.zeros(len(PROMPTS), max(map(len, PROMPTS)), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, ids in enumerate(PROMPTS):
        batch[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        want = hf(batch, attention_mask=mask).logits

    def run(comm):
        stage = StageModel(ModelConfig.from_folder(folder), comm=comm, dtype="fp64").load_weights(HFCheckpoint(folder))
        positions = torch.arange(batch.shape[1]).expand(len(PROMPTS), -1)
        return stage(batch, positions, stage.new_cache(len(PROMPTS), batch.shape[1]))

    for got in in_threads(degree, run):
        valid = mask.bool()
        torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=2e-5)


# ---- ALiBi slopes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12, 16, 20, 25, 32, 48, 112])
def test_alibi_slopes_equal_transformers_and_shard_by_head(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    want = _get_alibi_slopes(heads, torch.device("cpu"))
    torch.testing.assert_close(bloom_module.alibi_slopes(heads), want, rtol=0, atol=0)
    for tp in [d for d in (2, 4, 8) if heads % d == 0]:
        shards = [bloom_module.shard_slopes(heads, r, tp) for r in range(tp)]
        torch.testing.assert_close(torch.cat(shards), want, rtol=0, atol=0)


def test_each_bloom_shard_holds_its_own_heads_slopes(tiny_checkpoint):
    cfg = ModelConfig.from_folder(tiny_checkpoint("bloom-6heads"))
    full = bloom_module.alibi_slopes(6)
    for rank in range(2):
        stage = StageModel(cfg, 1, 3, comm=ThreadGroup(2).member(rank), dtype="bf16")
        for block in stage.layers:
            # fp32 whatever the model's dtype, as the reference builds them; heads 3*rank .. 3*rank+2.
            assert block.attn.alibi_slopes.dtype == torch.float32
            torch.testing.assert_close(block.attn.alibi_slopes, full[3 * rank:3 * rank + 3], rtol=0, atol=0)


# ---- tiny_checkpoint layouts and bad checkpoints ----------------------------------------------------------

def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_hub_layout_without_transformer_prefix(tiny_checkpoint, reference, family, tmp_path):
    # openai-community/gpt2 and bigscience/bloom-* store "h.0..." / "wte.weight", not "transformer.h.0...".
    def strip(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)

    folder = _rewrite(tiny_checkpoint(family), tmp_path, strip)
    assert not any(k.startswith("transformer.") for k in HFCheckpoint(folder)._file_of)
    assert generate(folder, 2) == reference(family)


@pytest.mark.parametrize("family, name, first, last", [
    ("gpt2", "transformer.h.2.attn.c_attn.weight", 2, 4),
    ("gpt2", "transformer.wpe.weight", 0, 1),
    ("gpt2", "transformer.ln_f.bias", 3, 4),
    ("bloom", "transformer.h.3.self_attention.query_key_value.bias", 2, 4),
    ("bloom", "transformer.word_embeddings_layernorm.weight", 0, 1),
    ("bloom", "transformer.h.1.mlp.dense_4h_to_h.weight", 1, 2),
])
def test_missing_tensor_is_named(tiny_checkpoint, tmp_path, family, name, first, last):
    folder = _rewrite(tiny_checkpoint(family), tmp_path, lambda t: t.pop(name))
    cfg = ModelConfig.from_folder(folder)
    with pytest.raises(CheckpointError, match=f"{name.replace('.', '[.]')}' is missing"):
        StageModel(cfg, first, last).load_weights(HFCheckpoint(folder))


@pytest.mark.parametrize("family, name, shape, message", [
    # Conv1D weights are reported in the stored [in, out] layout, as the file holds them.
    ("gpt2", "transformer.h.1.mlp.c_fc.weight", (64, 200), r"has shape \(64, 200\) but the model expects \(64, 256\)"),
    ("gpt2", "transformer.h.0.attn.c_proj.weight", (64, 32), r"has shape \(64, 32\) but the model expects \(64, 64\)"),
    ("gpt2", "transformer.h.3.attn.c_attn.weight", (64, 96), r"has shape \(64, 32\) .*expects \(64, 64\)"),
    ("gpt2", "transformer.wte.weight", (90, 64), r"has shape \(90, 64\) but the model expects \(96, 64\)"),
    ("bloom", "transformer.h.2.self_attention.query_key_value.weight", (96, 64), r"has shape \(96, 64\)"),
    ("bloom", "transformer.h.0.mlp.dense_h_to_4h.bias", (255,), r"has shape \(255,\)"),
    ("bloom", "transformer.ln_f.weight", (65,), r"has shape \(65,\) but the model expects \(64,\)"),
])
def test_wrong_shape_is_named(tiny_checkpoint, tmp_path, family, name, shape, message):
    def edit(tensors):
        tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)

    folder = _rewrite(tiny_checkpoint(family), tmp_path, edit)
    with pytest.raises(CheckpointError, match=f"{name.replace('.', '[.]')} {message}"):
        StageModel(ModelConfig.from_folder(folder)).load_weights(HFCheckpoint(folder))


def test_tensor_parallel_shard_of_a_wrong_qkv_is_named(tiny_checkpoint, tmp_path):
    # 3 x 60 columns split into 3 x 2 shards: each shard's slice is 30 wide where 32 are expected.
    name = "transformer.h.1.attn.c_attn.weight"
    folder = _rewrite(tiny_checkpoint("gpt2"), tmp_path, lambda t: t.__setitem__(name, torch.zeros(64, 180)))
    cfg = ModelConfig.from_folder(folder)
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} has shape \(64, 30\) "
                                              r"\(slice 1 of 6 along dim 1\)"):
        StageModel(cfg, 1, 2, comm=ThreadGroup(2).member(1)).load_weights(HFCheckpoint(folder))


# ---- config.json readers and registry entries ----------------------------------------------------------

def _hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("key, value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)])
def test_gpt2_attention_variants_we_cannot_run_are_refused(tiny_checkpoint, key, value):
    hf = {**_hf_config(tiny_checkpoint("gpt2")), key: value}
    with pytest.raises(ValueError, match=f"{key}={str(value).lower()}.*expected {str(not value).lower()}"):
        ModelConfig.from_hf(hf)


def test_bloom_reader_takes_hub_spellings(tiny_checkpoint):
    hf = _hf_config(tiny_checkpoint("bloom"))
    hub = {k: v for k, v in hf.items() if k not in ("hidden_size", "n_head")}
    hub.update(n_embed=hf["hidden_size"], num_attention_heads=hf["n_head"])
    assert ModelConfig.from_hf(hub) == ModelConfig.from_hf(hf)


# name: (hidden, layers, heads, published parameter count — the model cards' / BLOOM paper's, tied head once)
SHAPES = {
    "gpt2": (768, 12, 12, 124_439_808), "gpt2-medium": (1024, 24, 16, 354_823_168),
    "gpt2-large": (1280, 36, 20, 774_030_080), "gpt2-xl": (1600, 48, 25, 1_557_611_200),
    "bloom-560m": (1024, 24, 16, 559_214_592), "bloom-1b1": (1536, 24, 16, 1_065_314_304),
    "bloom-1b7": (2048, 24, 16, 1_722_408_960), "bloom-3b": (2560, 30, 32, 3_002_557_440),
    "bloom-7b1": (4096, 30, 32, 7_069_016_064), "bloom-176b": (14336, 70, 112, 176_247_271_424),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_registry_entries_have_the_published_shapes(name):
    """Shapes, and the parameter count of our stage against transformers' own model, both on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dejavu.model.registry import resolve_model

    resolved = resolve_model(name, weights=False)
    cfg = resolved.config
    hidden, layers, heads, published = SHAPES[name]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (hidden, layers, heads)
    assert cfg.vocab_size == (50257 if name.startswith("gpt2") else 250880)
    hf = dict(resolved.hf_config)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    ours = StageModel(cfg, device="meta")
    tied_head = cfg.vocab_size * cfg.hidden_size  # our last stage holds its own copy of the tied matrix
    assert sum(p.numel() for p in ours.parameters()) - tied_head == published
    assert sum(p.numel() for p in reference.parameters()) == published


# ---- the serving system: real controller and worker processes ------------------------------------------

@pytest.mark.parametrize("family, tp", [("gpt2", 1), ("bloom", 1), ("bloom-6heads", 2)])
def test_disaggregated_serving_matches_engine_and_transformers(tiny_checkpoint, family, tp, tmp_path):
    """One prompt stage hands its KV cache to one token stage (each TP-sharded for the 6-head BLOOM: four
    processes, the ALiBi slopes split across real process boundaries); tokens equal the Engine's and
    transformers'."""
    sys.path.insert(0, str(Path(__file__).parent / "serving"))
    import serving_harness as harness

    folder = tiny_checkpoint(family)
    sizes = tmp_path / "sizes.json"  # unequal prompts: right-padded microbatches of 2
    sizes.write_text(json.dumps([[len(p), NEW] for p in PROMPTS]))
    run = harness.run_serving(tmp_path, folder, prompt=1, token=1, tp=tp, ubatch=2,
                              controller_args=["--input_sizes_file", str(sizes)],
                              worker_args=["--inference_data_type", "fp64"])
    assert run.controller_rc == 0 and run.worker_rcs == [0] * (2 * tp), run.all_logs()[-4000:]
    records = sorted(run.records, key=lambda r: r["id"])
    prompts = [r["prompt_ids"] for r in records]
    assert sorted(map(len, prompts)) == sorted(map(len, PROMPTS))
    served = [r["output_ids"] for r in records]
    engine = Engine(build_stages(ModelConfig.from_folder(folder), HFCheckpoint(folder), 1, dtype="fp64"))
    assert served == [g.output_ids for g in engine.generate(prompts, SamplingParams(max_new_tokens=NEW))]
    assert served == hf_greedy(folder, prompts, NEW)
