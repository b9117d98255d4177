"""Bad input is refused before any process starts, with a message naming the flag; protocol and layout."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
import pytest

from dejavu.controller import prepare
from dejavu.controller.options import ControllerOptions, OptionsError, topology_of
from dejavu.protocol import Error, Hello, ProtocolError, Submit, Tokens, from_msg, to_msg
from dejavu.worker.main import WorkerOptions, check_options
from dejavu.worker.topology import Topology, TopologyError, make_topology
from dejavu.workload import WorkloadSpec

from serving_harness import REPO


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import llama

    return llama(tmp_path_factory.mktemp("model") / "tiny", layers=4)  # 4 heads, 2 KV heads


def opts(model, **kw) -> ControllerOptions:
    spec = kw.pop("workload", WorkloadSpec(num_requests=4, input_len=4, output_len=4))
    return ControllerOptions(**{"num_peers": 1, "model": str(model), "workload": spec, **kw})


@pytest.mark.parametrize("kw,needle", [
    (dict(num_peers=3, num_prompt_peers=1, num_token_peers=1), "--num_peers=3 does not match"),
    (dict(num_peers=9, num_prompt_peers=1, num_token_peers=2, tensor_parallelism=3), "--tensor_parallelism=3 does not divide"),
    (dict(num_peers=5, num_token_peers=5), "--num_token_peers gives 5 stages but the model has only 4 layers"),
    (dict(num_peers=2, num_prompt_peers=0, num_token_peers=1, tensor_parallelism=2, with_ft=True), "--with_ft"),
    (dict(num_peers=1, num_prompt_peers=1, num_token_peers=0), "--num_token_peers must be >= 1"),
    (dict(num_peers=1, ubatch_size=0), "--ubatch_size must be >= 1"),
])
def test_bad_topology_flags_are_named(model, kw, needle):
    with pytest.raises(OptionsError, match=needle.replace("(", r"\(")):
        prepare(opts(model, **kw))


def test_peer_counts_in_stages_or_in_workers():
    # The project's reading: stages x TP ...
    assert topology_of(ControllerOptions(num_peers=8, num_prompt_peers=2, num_token_peers=2, tensor_parallelism=2)) \
        == Topology(2, 2, 2, 2)
    # ... and the seed's: workers, each pipeline a multiple of TP (its workers get M//Y stages).
    t = topology_of(ControllerOptions(num_peers=4, num_prompt_peers=2, num_token_peers=2, tensor_parallelism=2))
    assert (t.prompt_stages, t.token_stages, t.world_size) == (1, 1, 4)


def test_host_file_with_too_few_hosts(model, tmp_path):
    hosts = tmp_path / "ip_info"
    hosts.write_text("10.0.0.1\n10.0.0.2\n")
    with pytest.raises(OptionsError, match="--workers_ip_file .* lists 2 hosts but --num_peers=3"):
        prepare(opts(model, num_peers=3, num_token_peers=3, workers_ip_file=str(hosts)))
    with pytest.raises(OptionsError, match="--workers_ip_file: cannot read"):
        prepare(opts(model, workers_ip_file=str(tmp_path / "missing")))


@pytest.mark.parametrize("content,needle", [
    ([[4, 2], [3]], "entry 1"),
    ([[4, 0]], "must both be >= 1"),
    ({"a": 1}, "must hold a JSON list"),
    ([[120, 20]], "128"),  # beyond the model's positions
])
def test_malformed_trace_files_are_named(model, tmp_path, content, needle):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(content))
    spec = WorkloadSpec(kind="trace", num_requests=None, input_sizes_file=str(path))
    with pytest.raises(OptionsError, match="--input_sizes_file") as e:
        prepare(opts(model, workload=spec))
    assert needle in str(e.value)


def test_worker_flags_refused_or_unknown():
    with pytest.raises(ValueError, match="--resident_buffers must be >= 2"):
        check_options(WorkerOptions(ckpt_path="x", swapping=True, resident_buffers=1))
    with pytest.raises(ValueError, match="--failures F goes with --restart"):
        check_options(WorkerOptions(ckpt_path="x", failures=1))
    with pytest.raises(ValueError, match="--backend 'tcp' is unknown; expected one of gloo, nccl, mpi"):
        check_options(WorkerOptions(ckpt_path="x", backend="tcp"))
    with pytest.raises(ValueError, match="--inference_data_type"):
        check_options(WorkerOptions(ckpt_path="x", inference_data_type="fp8"))
    with pytest.raises(ValueError, match="--max_seq_len must be >= 1"):
        check_options(WorkerOptions(ckpt_path="x", max_seq_len=0))


def test_worker_topology_checks(model):
    from dejavu.model.config import ModelConfig

    cfg = ModelConfig.from_folder(model)
    with pytest.raises(TopologyError, match=r"--world_size=3 does not match \(--prompt_pipeline_para_size=1"):
        make_topology(tp=1, prompt_stages=1, token_stages=1, world_size=3, cfg=cfg)
    with pytest.raises(TopologyError, match="--tensor_para_size=4 does not divide the model's num_key_value_heads=2"):
        make_topology(tp=4, prompt_stages=0, token_stages=1, world_size=4, cfg=cfg)
    with pytest.raises(TopologyError, match="--token_pipeline_para_size gives 5 stages"):
        make_topology(tp=1, prompt_stages=0, token_stages=5, world_size=5, cfg=cfg)


def test_rank_layout_and_uneven_layer_splits():
    topo = Topology(tp=2, prompt_stages=2, token_stages=3, num_layers=7)
    roles = topo.roles()
    assert [(r.pipeline, r.stage, r.tp_rank) for r in roles[:4]] == [("prompt", 0, 0), ("prompt", 0, 1),
                                                                      ("prompt", 1, 0), ("prompt", 1, 1)]
    assert [r.layers for r in roles if r.pipeline == "token" and r.tp_rank == 0] == [(0, 3), (3, 5), (5, 7)]
    assert [r.layers for r in roles if r.pipeline == "prompt" and r.tp_rank == 1] == [(0, 4), (4, 7)]
    assert topo.token_leader == 4 and topo.sampler_rank == 8 and topo.prompt_sampler_rank == 2
    assert [r.is_leader for r in roles].count(True) == 2
    assert Topology(1, 0, 2, 4).role(0).name == "stage0"  # the baseline names its stages stageN


def test_protocol_round_trip_and_rejects_garbage():
    for m in (Hello(3, 4, 99, "h", 1.5), Submit(0, [1, 2], [[5, 6], [7]], [{"max_new_tokens": 3}] * 2),
              Tokens(1, 0, 2, [1], [9], [True], 0.5), Error(2, "boom", "decode ubatch 1 step 3")):
        assert from_msg(to_msg(m)) == m
    with pytest.raises(ProtocolError, match="not valid msgpack|not a message map"):
        from_msg(b"\xc1\xff")
    with pytest.raises(ProtocolError, match="unknown message type"):
        from_msg(msgpack.packb({"type": "Pickle", "x": 1}))
    with pytest.raises(ProtocolError, match="lacks"):
        from_msg(msgpack.packb({"type": "Tokens", "rank": 1}))


def test_controller_cli_exits_2_before_listening(model):
    # 3 workers cannot make 1 prompt + 1 token stage: refused before any socket opens.
    r = subprocess.run([sys.executable, "-m", "dejavu.cli_serving", "controller", "--num_peers", "3",
                        "--num_prompt_peers", "1", "--num_token_peers", "1", "--model", str(model), "--port", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert "--num_peers=3 does not match" in r.stderr and "listening" not in r.stdout
