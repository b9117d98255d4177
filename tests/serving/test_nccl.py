"""The same end-to-end check on GPUs: NCCL for activations, TP all-reduce and the KV hand-over.

Skipped without two CUDA devices. Workers run in fp32 and must give the CPU engine's tokens (the tiny
model's next-token distributions are peaked, so GPU/CPU rounding does not flip a greedy choice).
"""

from __future__ import annotations

import json

import pytest
import torch

from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.weights import HFCheckpoint

from serving_harness import TRACE, UBATCH, check_matches, run_serving

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import llama

    return llama(tmp_path_factory.mktemp("model") / "tiny", layers=4)


@pytest.mark.parametrize("prompt,token,tp", [(0, 2, 1), (1, 1, 1), (0, 1, 2)],
                         ids=["baseline-2", "disagg-1+1", "tp2"])
def test_nccl_topologies_match_engine(prompt, token, tp, model, tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(TRACE))
    run = run_serving(tmp_path, model, prompt=prompt, token=token, tp=tp, backend="nccl", ubatch=UBATCH,
                      controller_args=["--input_sizes_file", str(trace)],
                      worker_args=["--inference_data_type", "fp32"], timeout=240)
    engine = Engine(build_stages(ModelConfig.from_folder(model), HFCheckpoint(model), 1))
    check_matches(run, engine)
    assert "nccl on cuda" in run.log("worker0")
