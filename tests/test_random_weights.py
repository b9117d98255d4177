"""Random weights (model.weights=random, --load_format dummy): every slice is a slice of one model.

Each tensor is a hash of (seed, name, flat index), so a stage or a TP shard computes only its own part and
every layout of the same seed holds the same weights: the engine gives the same tokens at 1 stage, at 2
stages and at TP 2, and the full tensors load into transformers' own class as a coherent checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.random_weights import RandomWeights, hash_uniform, tensor_key
from dejavu.model.tp import ThreadGroup
from dejavu.model.weights import Shard
from dejavu.sampling import SamplingParams
from tiny_models import REFERENCE_PROMPTS as PROMPTS

CONFIGS = {
    "opt": dict(model_type="opt", vocab_size=96, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128, do_layer_norm_before=True,
                bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "llama": dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(model_type="gpt2", vocab_size=96, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                 bos_token_id=1, eos_token_id=2),
    "bloom": dict(model_type="bloom", vocab_size=96, hidden_size=64, n_layer=4, n_head=4, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0),
}
NEW = 8


def test_hash_matches_a_python_splitmix64():
    key, mask = tensor_key(7, "w"), (1 << 64) - 1

    def reference(i: int) -> float:
        z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return ((z ^ (z >> 31)) >> 40) / (1 << 24)

    idx = [0, 1, 2, 1000, 2**33 + 5]
    assert hash_uniform(key, torch.tensor(idx)).tolist() == [reference(i) for i in idx]


def test_shards_are_slices_of_the_one_tensor_and_seeds_differ():
    src = RandomWeights(CONFIGS["opt"], seed=3)
    name = "model.decoder.layers.1.fc1.weight"
    full = src.get(name)
    assert tuple(full.shape) == (128, 64) and full.dtype == torch.float32
    assert 0.015 < full.std().item() < 0.025 and full.abs().max().item() <= 0.0347
    for dim in (0, 1):
        parts = [src.get(name, Shard(dim, r, 4)) for r in range(4)]
        assert torch.equal(torch.cat(parts, dim), full)
    assert torch.equal(RandomWeights(CONFIGS["opt"], seed=3).get(name), full)  # another process, same seed
    assert not torch.equal(RandomWeights(CONFIGS["opt"], seed=4).get(name), full)
    norm = src.get("model.decoder.layers.1.final_layer_norm.weight")
    assert 0.9 <= norm.min().item() and norm.max().item() <= 1.1
    half = RandomWeights(CONFIGS["opt"], seed=3, dtype=torch.float16).get(name)
    assert torch.equal(half, full.half())


def _generate(family: str, stages: int, comm=None) -> list[list[int]]:
    cfg = ModelConfig.from_hf(CONFIGS[family])
    src = RandomWeights(CONFIGS[family], seed=0, dtype=torch.float64)
    engine = Engine(build_stages(cfg, src, stages, comm=comm, dtype="fp64"))
    return [g.output_ids for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_layout_holds_the_same_random_model(family):
    one = _generate(family, 1)
    assert _generate(family, 2) == one
    shard0, shard1 = ThreadGroup(2).run(lambda comm: _generate(family, 2, comm), timeout=120)
    assert shard0 == shard1 == one
    assert len({tuple(o) for o in one}) > 1  # not a degenerate model that says one thing to everything


def test_the_random_model_is_a_coherent_checkpoint_for_transformers():
    """The full tensors, loaded by name into transformers' own OPT class, give the engine's tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(CONFIGS["opt"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf)).double().eval()
    src = RandomWeights(CONFIGS["opt"], seed=0, dtype=torch.float64)
    model.load_state_dict({name: src.get(name) for name in model.state_dict()})
    expected = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW,
                           min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
        expected.append(y[0, len(ids):].tolist())
    assert _generate("opt", 1) == expected
