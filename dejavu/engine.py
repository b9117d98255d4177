"""Single-process generation over one model split into stages (one stage = the whole model).

This is the reference path of the system: the serving workers run the same stages, cache and sampling
step by step across processes, and their tokens must equal what this loop produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model.config import ModelConfig
from .model.kv_cache import KVCache
from .model.stage import StageModel
from .model.tp import Communicator
from .sampling import SamplingParams, is_finished, sample


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length"


def split_layers(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, as even as possible (earlier stages take the remainder)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {stages} stages (need 1 <= stages <= layers)")
    base, extra = divmod(num_layers, stages)
    ranges, first = [], 0
    for s in range(stages):
        last = first + base + (1 if s < extra else 0)
        ranges.append((first, last))
        first = last
    return ranges


def build_stages(cfg: ModelConfig, src, num_stages: int = 1, comm: Communicator | None = None,
                 dtype="fp32", device="cpu", layer_ranges: list[tuple[int, int]] | None = None
                 ) -> list[StageModel]:
    ranges = layer_ranges or split_layers(cfg.num_layers, num_stages)
    return [StageModel(cfg, a, b, comm=comm, dtype=dtype, device=device).load_weights(src) for a, b in ranges]


class Engine:
    def __init__(self, stages: list[StageModel]) -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise ValueError("the stages must cover the model from its first to its last layer")
        self.stages = stages
        self.cfg = stages[0].cfg
        self.device = stages[0].device

    def _forward(self, x, positions, caches: list[KVCache], logits_index) -> torch.Tensor:
        for stage, cache in zip(self.stages, caches):
            x = stage(x, positions, cache, logits_index if stage.is_last else None)
        return x

    def check_prompts(self, prompts: list[list[int]], params: list[SamplingParams]) -> int:
        if not prompts:
            raise ValueError("no prompts to generate from")
        for i, (ids, p) in enumerate(zip(prompts, params)):
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) + p.max_new_tokens > self.cfg.max_positions:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens + max_new_tokens={p.max_new_tokens}, more than the "
                    f"model's {self.cfg.max_positions} positions")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary of {self.cfg.vocab_size}: {bad[:5]}")
        return max(len(ids) + p.max_new_tokens for ids, p in zip(prompts, params))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Generation]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        max_seq = self.check_prompts(prompts, params)
        batch = len(prompts)
        caches = [s.new_cache(batch, max_seq) for s in self.stages]
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = torch.tensor(ids)
        positions = torch.arange(tokens.shape[1]).expand(batch, -1)
        logits = self._forward(tokens.to(self.device), positions.to(self.device), caches, lengths - 1)

        outputs: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * batch
        live = [True] * batch
        step = 0
        while True:
            chosen = sample(logits, params, step, [len(o) for o in outputs])
            for i, tok in enumerate(chosen):
                if live[i]:
                    outputs[i].append(tok)
                    if is_finished(tok, len(outputs[i]), params[i]):
                        live[i] = False
                        reasons[i] = "length" if len(outputs[i]) >= params[i].max_new_tokens else "stop"
            if not any(live):
                break
            # Finished slots keep stepping on their last token; their results are simply not read.
            positions = (lengths + step).view(batch, 1)
            x = torch.tensor([o[-1] for o in outputs]).view(batch, 1)
            logits = self._forward(x.to(self.device), positions.to(self.device), caches, torch.zeros(batch, dtype=torch.long))
            step += 1
        return [Generation(p, o, r) for p, o, r in zip(prompts, outputs, reasons)]
