"""Choosing the next token: greedy, temperature, top-k, top-p, with min/max length and stop tokens.

The random draw for a request at a step depends only on (request seed, step): the uniform number comes
from a CPU generator seeded with both, and the token is found by inverting the CDF on the CPU. So a
step replayed after a failure, on any device or stage layout, picks the same token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def step_generator(seed: int, step: int) -> torch.Generator:
    # A 64-bit mix of (seed, step) so neighbouring seeds and steps give unrelated streams.
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 63)
    return torch.Generator(device="cpu").manual_seed(mixed)


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on one row of fp64 logits (HF's warper order and rules)."""
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - p.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, p: SamplingParams, step: int, generated: int) -> int:
    """Pick the token of one request; ``generated`` is how many tokens it has produced so far."""
    logits = logits.detach().to("cpu", torch.float64)
    if generated < p.min_new_tokens and p.stop_token_ids:
        logits[list(p.stop_token_ids)] = float("-inf")
    if p.greedy:
        return int(torch.argmax(logits))
    probs = _filter(logits, p).softmax(-1)
    u = torch.rand((), generator=step_generator(p.seed, step), dtype=torch.float64)
    cdf = probs.cumsum(-1)
    idx = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    return min(idx, probs.numel() - 1)


def sample(logits: torch.Tensor, params: list[SamplingParams], step: int,
           generated: list[int] | None = None) -> list[int]:
    """One token per row of ``logits`` [batch, vocab]."""
    generated = generated or [step] * len(params)
    if all(p.greedy and (g >= p.min_new_tokens or not p.stop_token_ids) for p, g in zip(params, generated)):
        return torch.argmax(logits, dim=-1).tolist()  # the common case stays one batched op
    return [sample_row(logits[i], p, step, g) for i, (p, g) in enumerate(zip(params, generated))]


def is_finished(token: int, generated: int, p: SamplingParams) -> bool:
    """After emitting ``token`` as the ``generated``-th new token (1-based), is the request done?"""
    return generated >= p.max_new_tokens or (generated >= p.min_new_tokens and token in p.stop_token_ids)
