"""Single-process generation over one model split into stages (one stage = the whole model).

This is the reference path of the system: the serving workers run the same stages, cache and sampling
step by step across processes, and their tokens must equal what this loop produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model.config import ModelConfig
from .model.cuda_graphs import PrefillGraphs
from .model.kv_cache import KVCache
from .model.stage import StageModel
from .model.tp import Communicator
from .sampling import SamplingParams, is_finished, sample


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length"


def last_position(lengths: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The last position each request can write: its prompt plus max_new_tokens - 1 fed-back tokens."""
    return lengths + torch.tensor([p.max_new_tokens for p in params]) - 1


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


@dataclass
class _Slab:
    """Caches (and decode graphs) for one (batch, max_seq), kept for the next call of the same shape."""

    batch: int
    max_seq: int
    caches: list[KVCache]
    graphs: list | None
    prefill: list[PrefillGraphs] | None = None  # per stage: short prefills as graphs, captured on first use


class Engine:
    """Generation over a chain of stages in one process.

    On a CUDA device the decode steps (and prefills of a few tokens, see ``PrefillGraphs``) replay CUDA
    graphs (``cuda_graphs=False`` runs them eagerly), and greedy batches keep the next tokens on the
    device: step s+1 is queued before the host reads the tokens of step s, so the GPU never waits on Python. ``cache_len`` fixes the cache length (at least
    what each call needs) so that calls with different prompt lengths reuse one set of graphs.
    """

    def __init__(self, stages: list[StageModel], cuda_graphs: bool | None = None,
                 cache_len: int | None = None) -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise ValueError("the stages must cover the model from its first to its last layer")
        self.stages = stages
        self.cfg = stages[0].cfg
        self.device = stages[0].device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs stages on a CUDA device, not {self.device}")
        self.cache_len = cache_len
        self._slab: _Slab | None = None

    def _forward(self, x, positions, caches: list[KVCache], logits_index) -> torch.Tensor:
        for stage, cache in zip(self.stages, caches):
            x = stage(x, positions, cache, logits_index if stage.is_last else None)
        return x

    def _slab_for(self, batch: int, max_seq: int) -> _Slab:
        if self.cache_len is not None:
            max_seq = max(max_seq, min(self.cache_len, self.cfg.max_positions))
        elif self.cuda_graphs:
            # Round up so that nearby lengths share graphs; decode attention reads only up to each
            # slot's position, so the extra room costs memory, not time.
            max_seq = min(-(-max_seq // 64) * 64, self.cfg.max_positions)
        slab = self._slab
        if slab is not None and slab.batch == batch and slab.max_seq >= max_seq:
            return slab
        self._slab = None  # drop the old buffers before taking new ones
        caches = [s.new_cache(batch, max_seq) for s in self.stages]
        # Captured before the prefill; the capture keeps the caches' contents.
        graphs = [s.capture_decode(c) for s, c in zip(self.stages, caches)] if self.cuda_graphs else None
        prefill = [PrefillGraphs(s) for s in self.stages] if self.cuda_graphs else None
        self._slab = _Slab(batch, max_seq, caches, graphs, prefill)
        return self._slab

    def _decode(self, slab: _Slab, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token step: x [b, 1] ids on the device, positions [b, 1] (device for graphs, else CPU)."""
        if slab.graphs is None:
            return self._forward(x, positions, slab.caches, torch.zeros(x.shape[0], dtype=torch.long))
        for graph in slab.graphs:
            x = graph(x, positions)
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
    def prefill(self, prompts: list[list[int]], slab: _Slab) -> torch.Tensor:
        """Run the prompts (right-padded) into the slab's caches; returns the last prompt token's logits."""
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = torch.tensor(ids)
        if slab.prefill is not None and all(g.fits(c, tokens.shape[1]) for g, c in zip(slab.prefill, slab.caches)):
            x = tokens.to(self.device)
            for stage, graphs, cache in zip(self.stages, slab.prefill, slab.caches):
                x = graphs(x, cache, lengths - 1 if stage.is_last else None)
            return x
        # Positions stay on the CPU: each stage plans its step from them without a device sync.
        positions = torch.arange(tokens.shape[1]).expand(batch, -1)
        return self._forward(tokens.to(self.device), positions, slab.caches, lengths - 1)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Generation]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        max_seq = self.check_prompts(prompts, params)
        slab = self._slab_for(len(prompts), max_seq)
        logits = self.prefill(prompts, slab)
        lengths = torch.tensor([len(p) for p in prompts])
        on_device = all(p.greedy and not (p.min_new_tokens and p.stop_token_ids) for p in params)
        if on_device and self.device.type == "cuda":
            outputs, reasons = self._greedy_pipelined(slab, logits, lengths, params)
        else:
            outputs, reasons = self._stepwise(slab, logits, lengths, params)
        return [Generation(p, o, r) for p, o, r in zip(prompts, outputs, reasons)]

    def _stepwise(self, slab: _Slab, logits, lengths, params):
        """Sample on the host every step (any sampling rule; the CPU path)."""
        batch = len(params)
        outputs: list[list[int]] = [[] for _ in params]
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
            # Finished slots keep stepping on their last token; their results are simply not read, and
            # their position stops at their own last one so a short request never runs past the cache.
            positions = torch.minimum(lengths + step, last_position(lengths, params)).view(batch, 1)
            x = torch.tensor([o[-1] for o in outputs]).view(batch, 1).to(self.device)
            if slab.graphs is not None:
                positions = positions.to(self.device)
            logits = self._decode(slab, x, positions)
            step += 1
        return outputs, reasons

    def _greedy_pipelined(self, slab: _Slab, logits, lengths, params):
        """Greedy on the device: argmax feeds the next step directly, and the host reads each step's
        tokens (through pinned memory) while the next step runs."""
        batch = len(params)
        outputs: list[list[int]] = [[] for _ in params]
        reasons = ["length"] * batch
        live = [True] * batch
        last_step = max(p.max_new_tokens for p in params) - 1  # no step past the longest request
        host = [torch.empty(batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
        events = [torch.cuda.Event(), torch.cuda.Event()]
        positions = (lengths.view(batch, 1) - 1).to(self.device)
        cap = last_position(lengths, params).view(batch, 1).to(self.device)
        x = logits.argmax(-1).view(batch, 1)
        host[0].copy_(x.view(batch), non_blocking=True)
        events[0].record()
        step = 0
        while True:
            if step < last_step:
                # Queue step+1 before reading step's tokens.
                positions = torch.minimum(positions + 1, cap)
                logits = self._decode(slab, x, positions if slab.graphs is not None else positions.cpu())
                x = logits.argmax(-1).view(batch, 1)
                nxt = (step + 1) % 2
                host[nxt].copy_(x.view(batch), non_blocking=True)
                events[nxt].record()
            events[step % 2].synchronize()
            for i, tok in enumerate(host[step % 2].tolist()):
                if live[i]:
                    outputs[i].append(tok)
                    if is_finished(tok, len(outputs[i]), params[i]):
                        live[i] = False
                        reasons[i] = "length" if len(outputs[i]) >= params[i].max_new_tokens else "stop"
            if not any(live) or step >= last_step:
                break
            step += 1
        return outputs, reasons
