"""The records that cross module boundaries: requests in, request outcomes and stage events out.

The controller builds ``Request``s from the workload, fills one ``RequestRecord`` per request as tokens
arrive, and gathers ``StageEvent``s from every worker; the results writer turns them into
``requests.jsonl``, ``summary.json`` and the Chrome trace. Plain dataclasses of plain values, so they
travel as msgpack maps (``asdict`` / ``from_dict``) and never need pickle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the controller reads these records without needing torch (2 s of start-up)
    from .sampling import SamplingParams


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0  # when the request arrives, seconds after the run starts
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    text: str | None = None  # the prompt's text when it came from real text

    def sampling(self) -> "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                              temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=self.seed, stop_token_ids=tuple(self.stop_token_ids))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Request":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


STATUSES = ("ok", "failed", "unfinished")


@dataclass
class RequestRecord:
    id: int
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None
    status: str = "unfinished"  # ok | failed | unfinished
    error: str | None = None
    text: str | None = None  # decoded output, when a tokenizer is at hand

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class StageEvent:
    """One interval of a worker's timeline; ``kind`` is prefill, decode, send, recv, stream or idle."""

    worker: int  # global rank
    stage: str  # e.g. "stage0", "prompt1", "token0"
    kind: str
    start_s: float  # seconds after the run starts (controller clock, workers correct their offset)
    end_s: float
    ubatch: int = -1
    tp_rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageEvent":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
