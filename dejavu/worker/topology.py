"""Who is who in a run: pipelines, stages, tensor-parallel ranks and their layer ranges.

Ranks are laid out pipeline-major, stage-major, TP-rank minor: the prompt pipeline's stages first (none
in the baseline), then the token pipeline's. So rank 0 is always the entry (the stage that takes new
prompts), and the tensor-parallel peers of a stage are consecutive ranks, as on one multi-GPU host.

In the baseline the "token" pipeline does both prefill and decode; its stages are named ``stage{s}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import split_layers
from ..model.config import ModelConfig


class TopologyError(ValueError):
    """A topology that cannot run; the message names the flag to change."""


@dataclass(frozen=True)
class Role:
    rank: int
    pipeline: str  # "prompt" or "token"
    stage: int  # index within its pipeline
    tp_rank: int
    layers: tuple[int, int]  # [first, last)
    num_stages: int  # stages in its pipeline
    disaggregated: bool

    @property
    def kind(self) -> str:
        """What the records call it: "stage" in the baseline, else "prompt" / "token"."""
        return self.pipeline if self.disaggregated else "stage"

    @property
    def name(self) -> str:
        return f"{self.kind}{self.stage}"

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def is_leader(self) -> bool:
        """The entry rank of its pipeline: decides what runs next and tells its TP peers."""
        return self.stage == 0 and self.tp_rank == 0


@dataclass(frozen=True)
class Topology:
    tp: int
    prompt_stages: int  # 0 = baseline (no disaggregation)
    token_stages: int
    num_layers: int

    @property
    def disaggregated(self) -> bool:
        return self.prompt_stages > 0

    @property
    def world_size(self) -> int:
        return (self.prompt_stages + self.token_stages) * self.tp

    def layer_ranges(self, pipeline: str) -> list[tuple[int, int]]:
        n = self.prompt_stages if pipeline == "prompt" else self.token_stages
        return split_layers(self.num_layers, n)

    def rank_of(self, pipeline: str, stage: int, tp_rank: int = 0) -> int:
        base = 0 if pipeline == "prompt" else self.prompt_stages * self.tp
        return base + stage * self.tp + tp_rank

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside the world of {self.world_size} workers")
        split = self.prompt_stages * self.tp
        pipeline = "prompt" if rank < split else "token"
        local = rank if pipeline == "prompt" else rank - split
        stage, tp_rank = divmod(local, self.tp)
        n = self.prompt_stages if pipeline == "prompt" else self.token_stages
        return Role(rank, pipeline, stage, tp_rank, self.layer_ranges(pipeline)[stage], n, self.disaggregated)

    def roles(self) -> list[Role]:
        return [self.role(r) for r in range(self.world_size)]

    def stage_ranks(self, pipeline: str, stage: int) -> list[int]:
        return [self.rank_of(pipeline, stage, t) for t in range(self.tp)]

    @property
    def entry_rank(self) -> int:
        return 0

    @property
    def token_leader(self) -> int:
        return self.rank_of("token", 0, 0)

    @property
    def sampler_rank(self) -> int:
        """The rank that samples decode tokens: TP rank 0 of the token pipeline's last stage."""
        return self.rank_of("token", self.token_stages - 1, 0)

    @property
    def prompt_sampler_rank(self) -> int:
        return self.rank_of("prompt", self.prompt_stages - 1, 0)

    def decoding_ranks(self) -> list[int]:
        """Ranks that keep microbatches' caches between steps: the token pipeline (all of the baseline)."""
        return [self.rank_of("token", s, t) for s in range(self.token_stages) for t in range(self.tp)]

    def replica_holder(self, rank: int) -> int | None:
        """Whose host memory holds ``rank``'s cache replica (fault tolerance): the same TP shard of the
        next decoding stage, the last stage's going to the first (a ring). With a single token stage,
        the first prompt stage holds it; prompt stages keep no cache between microbatches (None)."""
        r = self.role(rank)
        if r.pipeline == "prompt":
            return None
        if self.token_stages > 1:
            return self.rank_of("token", (r.stage + 1) % self.token_stages, r.tp_rank)
        return self.rank_of("prompt", 0, r.tp_rank) if self.disaggregated else None

    def replica_sources(self, rank: int) -> list[int]:
        """The ranks whose replicas ``rank`` holds."""
        return [r for r in self.decoding_ranks() if self.replica_holder(r) == rank]


def make_topology(*, tp: int, prompt_stages: int, token_stages: int, world_size: int | None,
                  cfg: ModelConfig | None, backend: str | None = None) -> Topology:
    """Check a topology given in worker terms (stages per pipeline), naming the flag at fault."""
    if tp < 1:
        raise TopologyError(f"--tensor_para_size must be >= 1, got {tp}")
    if prompt_stages < 0:
        raise TopologyError(f"--prompt_pipeline_para_size must be >= 0, got {prompt_stages}")
    if token_stages < 1:
        raise TopologyError(f"--token_pipeline_para_size must be >= 1 (the token pipeline does the decoding), "
                            f"got {token_stages}")
    if backend is not None and backend not in BACKENDS:
        raise TopologyError(f"--backend {backend!r} is unknown; expected one of {', '.join(BACKENDS)}")
    expected = (prompt_stages + token_stages) * tp
    if world_size is not None and world_size != expected:
        raise TopologyError(
            f"--world_size={world_size} does not match (--prompt_pipeline_para_size={prompt_stages} + "
            f"--token_pipeline_para_size={token_stages}) x --tensor_para_size={tp} = {expected} workers")
    if cfg is not None:
        check_model_fits(cfg, tp=tp, stages={"--prompt_pipeline_para_size": prompt_stages,
                                             "--token_pipeline_para_size": token_stages},
                         tp_flag="--tensor_para_size")
        return Topology(tp, prompt_stages, token_stages, cfg.num_layers)
    return Topology(tp, prompt_stages, token_stages, max(prompt_stages, token_stages))


def check_model_fits(cfg: ModelConfig, *, tp: int, stages: dict[str, int], tp_flag: str) -> None:
    for key, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads),
                   ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise TopologyError(f"{tp_flag}={tp} does not divide the model's {key}={n}; "
                                f"use a tensor parallelism that divides it")
    for flag, n in stages.items():
        if n > cfg.num_layers:
            raise TopologyError(f"{flag} gives {n} stages but the model has only {cfg.num_layers} layers; "
                                f"use at most {cfg.num_layers} stages per pipeline")


BACKENDS = ("gloo", "nccl", "mpi")
