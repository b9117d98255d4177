"""One worker on one GPU: decode steps replay CUDA graphs in pooled KV buffers (captured at start-up),
and the tokens must still be the CPU engine's. Skipped without a CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.weights import HFCheckpoint

from serving_harness import TRACE, UBATCH, check_matches, run_serving

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_one_gpu_worker_matches_engine(graphs, tmp_path):
    from tiny_models import llama

    model = llama(tmp_path / "tiny", layers=4)
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(TRACE))
    run = run_serving(tmp_path, model, prompt=0, token=1, tp=1, backend="nccl", ubatch=UBATCH,
                      controller_args=["--input_sizes_file", str(trace)],
                      worker_args=["--inference_data_type", "fp32", "--max_seq_len", "64",
                                   *([] if graphs else ["--no_cuda_graphs"])], timeout=240)
    engine = Engine(build_stages(ModelConfig.from_folder(model), HFCheckpoint(model), 1))
    check_matches(run, engine)
