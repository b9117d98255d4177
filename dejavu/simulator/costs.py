"""What each step of a simulated pipeline costs: from constants, or from a profile and a layer split.

A stage runs three kinds of work: a prefill of a microbatch (b requests, padded to P tokens), a decode
step (every slot at context length ctx), and, on a token stage of a disaggregated run, receiving a
microbatch's KV cache for its layers (the ``stream`` of the real runs). Between stages an activation
send occupies the sender (``hop``); the last stage's sampler tells the leader the next tokens
(``feedback``, a latency). Times in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..planner.profile import CommTiming, Profile
from ..planner.plan import split_layers


class Costs(Protocol):
    feedback_s: float  # sampler -> leader, one way
    submit_s: float  # controller -> entry stage

    def prefill(self, pipeline: str, stage: int, b: int, prompt_len: int) -> float: ...
    def decode(self, pipeline: str, stage: int, b: int, ctx: int) -> float: ...
    def hop(self, pipeline: str, stage: int, b: int, tokens: int) -> float: ...
    def kv(self, stage: int, b: int, prompt_len: int) -> float: ...
    def kv_bytes(self, stage: int, b: int, tokens: int) -> float: ...


@dataclass
class ConstantCosts:
    """The design's closed form: prompt time p and token time t per stage, cache transfer time c per token
    stage and microbatch, whatever the sizes (hop and feedback latencies default to 0)."""

    p: float
    t: float
    c: float = 0.0
    hop_s: float = 0.0
    feedback_s: float = 0.0
    submit_s: float = 0.0
    kv_bytes_per_stage: float = 0.0  # what swapping would move per microbatch and stage

    def prefill(self, pipeline, stage, b, prompt_len):
        return self.p

    def decode(self, pipeline, stage, b, ctx):
        return self.t

    def hop(self, pipeline, stage, b, tokens):
        return self.hop_s

    def kv(self, stage, b, prompt_len):
        return self.c

    def kv_bytes(self, stage, b, tokens):
        return self.kv_bytes_per_stage


class ProfileCosts:
    """Stage times priced from a profile for a given layer split (the workers' split: earlier stages take
    the remainder). ``comm`` overrides the profile's data-plane timings (None: the profile's, or free)."""

    def __init__(self, profile: Profile, prompt_stages: int, token_stages: int, *, comm: CommTiming | None = None,
                 gpus_per_stage: int = 1, submit_s: float = 0.0) -> None:
        self.profile = profile
        self.layers = {"prompt": split_layers(profile.num_layers, prompt_stages) if prompt_stages else [],
                       "token": split_layers(profile.num_layers, token_stages)}
        self.comm = comm if comm is not None else profile.comm
        self.scale = 1.0 / gpus_per_stage  # ideal tensor parallelism across a machine's GPUs
        self.feedback_s = self.comm.feedback_s if self.comm else 0.0
        self.submit_s = submit_s
        self._elem = profile.sizes.kv_bytes_per_token_layer  # bytes of K+V per token and layer
        self._act = profile.hidden_size * _dtype_bytes(profile.dtype)
        self._cache: dict = {}

    def _stage(self, pipeline: str, stage: int) -> tuple[int, bool, bool]:
        layers = self.layers[pipeline]
        return layers[stage], stage == 0, stage == len(layers) - 1

    def prefill(self, pipeline, stage, b, prompt_len):
        key = ("p", pipeline, stage, b, prompt_len)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = self.profile.prompt_at(b, prompt_len).stage_s(*self._stage(pipeline, stage)) * self.scale
        return v

    def decode(self, pipeline, stage, b, ctx):
        key = ("t", pipeline, stage, b, ctx)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = self.profile.token_at(b, ctx).stage_s(*self._stage(pipeline, stage)) * self.scale
        return v

    def hop(self, pipeline, stage, b, tokens):
        return self.comm.hop(b * tokens * self._act) if self.comm else 0.0

    def kv_bytes(self, stage, b, tokens):
        return self.layers["token"][stage] * b * tokens * self._elem

    def kv(self, stage, b, prompt_len):
        return self.comm.kv(self.kv_bytes(stage, b, prompt_len)) if self.comm else 0.0


def _dtype_bytes(name: str) -> int:
    return 4 if name in ("fp32", "float32") else 8 if name in ("fp64", "float64") else 2


@dataclass
class WholeModelCosts:
    """Whole-model times split evenly over a pipeline's stages: prefill ``Y`` and token step ``t`` of one
    microbatch, KV hand-over ``c`` of one microbatch (over all token stages): what a user who knows only
    Y and t (``dejavu simulate --times``) can give."""

    Y: float
    t: float
    c: float = 0.0
    prompt_stages: int = 0
    token_stages: int = 1
    hop_s: float = 0.0
    feedback_s: float = 0.0
    submit_s: float = 0.0
    kv_bytes_per_microbatch: float = 0.0

    def _n(self, pipeline: str) -> int:
        return self.prompt_stages if pipeline == "prompt" else self.token_stages

    def prefill(self, pipeline, stage, b, prompt_len):
        return self.Y / self._n(pipeline)

    def decode(self, pipeline, stage, b, ctx):
        return self.t / self._n(pipeline)

    def hop(self, pipeline, stage, b, tokens):
        return self.hop_s

    def kv(self, stage, b, prompt_len):
        return self.c / self.token_stages

    def kv_bytes(self, stage, b, tokens):
        return self.kv_bytes_per_microbatch / self.token_stages


class RunCosts:
    """Step costs read off a real run's own timeline (``events.jsonl``): the median prefill, decode and
    KV-receive (``stream``) interval of each stage. With them the simulator is checked against the run
    under the very conditions the run met (a shared machine's load included): what is left to compare is
    the model of scheduling, queueing and hand-offs. Data-plane latencies come from ``comm`` (a profile's)."""

    def __init__(self, run_dir, prompt_stages: int, token_stages: int, comm: CommTiming | None = None,
                 hidden_size: int = 0, act_bytes: int = 4) -> None:
        import statistics

        from ..results.writer import load_events

        by: dict[tuple[str, str], list[float]] = {}
        for e in load_events(run_dir):
            if e.kind in ("prefill", "decode", "stream"):
                by.setdefault((e.stage, e.kind), []).append(e.end_s - e.start_s)
        self.median = {k: statistics.fmean(v) for k, v in by.items()}  # the mean: totals are what add up
        self.disagg = prompt_stages > 0
        self.comm = comm
        self.feedback_s = comm.feedback_s if comm else 0.0
        self.submit_s = 0.0
        self._act = hidden_size * act_bytes

    def _name(self, pipeline: str, stage: int) -> str:
        return f"{pipeline}{stage}" if self.disagg else f"stage{stage}"

    def _get(self, pipeline: str, stage: int, kind: str) -> float:
        key = (self._name(pipeline, stage), kind)
        if key not in self.median:
            raise ValueError(f"the run has no {kind} interval on {key[0]}")
        return self.median[key]

    def prefill(self, pipeline, stage, b, prompt_len):
        return self._get(pipeline, stage, "prefill")

    def decode(self, pipeline, stage, b, ctx):
        return self._get(pipeline, stage, "decode")

    def hop(self, pipeline, stage, b, tokens):
        return self.comm.hop(b * tokens * self._act) if self.comm else 0.0

    def kv(self, stage, b, prompt_len):
        return self._get("token", stage, "stream")

    def kv_bytes(self, stage, b, tokens):
        return 0.0
