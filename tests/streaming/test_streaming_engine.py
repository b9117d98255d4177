"""Streaming with real model stages: a prompt pipeline hands its cache to a token pipeline with a
different stage count, layer by layer during the prompt's forward; the token pipeline decodes from the
streamed cache, replicates every step, loses a stage's cache mid-way and restores it from the replica.
The tokens must equal the single-stage engine's (itself checked against transformers elsewhere)."""

from __future__ import annotations

import pytest
import torch

from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.weights import HFCheckpoint
from dejavu.sampling import SamplingParams
from dejavu.streaming import (LADDER, LayerwiseStreamer, LocalTransport, Partition, StreamOptions, StreamStats,
                              make_plan, replicate_box, replicate_step, restore, stream_in)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [40]]
NEW = 12


def partition(stage, batch) -> Partition:
    return Partition((stage.first, stage.last), (0, stage.cfg.num_kv_heads), (0, batch))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", LADDER)
def test_disaggregated_generation_with_replication_and_recovery(tiny_checkpoint, mode, device):
    folder = tiny_checkpoint("llama-gqa-bias")
    cfg, src = ModelConfig.from_folder(folder), HFCheckpoint(folder)
    reference = [g.output_ids for g in Engine(build_stages(cfg, src, 1, device=device)).generate(
        PROMPTS, SamplingParams(max_new_tokens=NEW))]

    batch, lengths = len(PROMPTS), torch.tensor([len(p) for p in PROMPTS])
    prompt_len, max_seq = int(lengths.max()), int(lengths.max()) + NEW
    prompt_stages = build_stages(cfg, src, 3, device=device)
    token_stages = build_stages(cfg, src, 2, device=device)
    plan = make_plan([partition(s, batch) for s in prompt_stages], [partition(s, batch) for s in token_stages],
                     (0, prompt_len))
    opts, stats = StreamOptions.named(mode), StreamStats()
    link, replicas = LocalTransport(), LocalTransport()  # prompt->token link; the successors' host memory

    # Prompt pipeline: every stage streams each layer as soon as it has written it.
    tokens = torch.zeros(batch, prompt_len, dtype=torch.long)
    for i, ids in enumerate(PROMPTS):
        tokens[i, : len(ids)] = torch.tensor(ids)
    positions = torch.arange(prompt_len).expand(batch, -1)
    x = tokens.to(device)
    for i, stage in enumerate(prompt_stages):
        cache = stage.new_cache(batch, max_seq)
        streamer = LayerwiseStreamer(cache.data, plan, i, link, prefix="mb0", options=opts, stats=stats)
        sent = []  # messages issued after each layer
        x = stage(x, positions, cache, lengths - 1 if stage.is_last else None,
                  on_layer_done=lambda l, s=streamer: (s.on_layer_done(l), sent.append(len(s.handle.pending))))
        streamer.finish()
        if stage.num_layers > 1:  # layerwise ships layer 0 before layer 1 is computed; the others wait
            assert (sent[0] > 0) == (mode == "layerwise"), sent
        del cache  # the prompt side forgets the microbatch
    first = x.argmax(-1)

    # Token pipeline: receive the cache, replicate the prompt part, then decode with per-step replication.
    caches = [s.new_cache(batch, max_seq) for s in token_stages]
    for j, (s, c) in enumerate(zip(token_stages, caches)):
        stream_in(c.data, plan, j, link, prefix="mb0", options=opts, stats=stats).wait()
        replicate_box(c.data, partition(s, batch), partition(s, batch).box((0, prompt_len)), replicas,
                      key=f"rep/s{j}/mb0/prompt", stats=stats).wait()
    outputs = [[int(t)] for t in first]
    for step in range(NEW - 1):
        if step == 5:  # token stage 1 dies; its replacement restores the replica
            caches[1].data.zero_()
            assert restore(caches[1].data, partition(token_stages[1], batch), replicas, prefix="rep/s1/mb0/") == 1 + step
        pos = (lengths + step).view(batch, 1)
        x = torch.tensor([o[-1] for o in outputs]).view(batch, 1).to(device)
        for j, (s, c) in enumerate(zip(token_stages, caches)):
            x = s(x, pos, c, torch.zeros(batch, dtype=torch.long) if s.is_last else None)
            replicate_step(c.data, partition(s, batch), range(batch), pos[:, 0].tolist(), replicas,
                           key=f"rep/s{j}/mb0/t{step}", stats=stats).wait()
        for o, t in zip(outputs, x.argmax(-1)):
            o.append(int(t))

    assert outputs == reference
    d = stats.as_dict()
    assert set(d) == {"prompt->token", "replication"} and d["replication"]["local"]["count"] == 2 * (NEW - 1) + 2
