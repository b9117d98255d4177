"""The planner: how many of D machines should process prompts and how many generate tokens (paper §4.2.1).

Balance. A microbatch of b requests takes Y seconds of prompt processing on the whole model and N token
steps of t seconds each. A prompt pipeline of D_p machines finishes D_p / (m·Y) microbatches a second
(m >= 1 inflates Y by the cost of streaming the KV cache), a token pipeline of D_t machines
D_t / (N·t). Neither side starves the other when the two are equal, which gives the paper's split

    D_t = ceil(D·N·t / (m·Y + N·t)),   D_p = D - D_t            (each side at least one machine)

Memory floors. Each side must also have enough machines for its layers and the KV cache they keep:
a prompt stage holds its layers and one microbatch's cache at length P for them; a token stage holds
its layers and the cache of every microbatch in flight (one per token stage, or two with microbatch
swapping) at length P+N. Layers are split as the workers split them (earlier stages take the
remainder); the first stage also holds the embeddings, the last the LM head. A side below its floor
takes machines from the other; when the two floors need more than D machines, or one machine cannot
hold a single layer, there is no feasible split and ``PlanError`` says which limit failed and by how much.

Everything here is arithmetic on numbers given or read from a profile: no torch, no model weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .sizes import ModelSizes

GB = 1e9


class PlanError(ValueError):
    """No plan: a bad input (the message names its key) or no feasible split (names the failing limit)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# The user-facing name of every input, so that messages name the flag or config key the user typed.
CLI_KEYS = {"machines": "--machines", "memory": "--memory-gb", "gpus": "--gpus-per-machine",
            "input_len": "--input-len", "new_tokens": "--new-tokens", "ubatch_size": "--ubatch-size",
            "prompt_time": "--prompt-time", "token_time": "--token-time", "stream_overhead": "--stream-overhead",
            "model": "--model", "profile": "--profile"}


@dataclass(frozen=True)
class PlanInputs:
    machines: int  # D
    sizes: ModelSizes
    input_len: int  # P
    new_tokens: int  # N
    ubatch_size: int  # b
    prompt_time_s: float  # Y: one microbatch's prefill through the whole model, on one machine
    token_time_s: float  # t: one token step of one microbatch through the whole model, on one machine
    memory_per_machine: float | None = None  # bytes a machine can use (all its GPUs); None: no floor
    gpus_per_machine: int = 1
    stream_overhead: float = 1.0  # m
    swapping: bool = False  # token stages keep two microbatches' caches resident, the rest in host memory
    model: str = "model"
    times_from: str = "given"  # where Y and t came from (a profile's path, or "given")
    keys: dict[str, str] = field(default_factory=lambda: dict(CLI_KEYS))


@dataclass(frozen=True)
class SideFloor:
    side: str  # prompt | token
    machines: int | None  # the fewest machines whose memory holds this side (None: no count does)
    need_bytes: list[int]  # per stage, at that count (or at the most stages possible when infeasible)
    resident_ubatches: int  # microbatches whose KV cache a stage keeps in device memory
    kv_tokens: int  # positions per microbatch the cache holds (P, or P+N)


@dataclass
class Plan:
    machines: int
    prompt_machines: int
    token_machines: int
    decided_by: str  # balance | prompt memory floor | token memory floor | one machine | layers
    balance_exact: float  # D·N·t / (m·Y + N·t) before rounding
    balance_token_machines: int  # its ceiling, clamped to [1, D-1]
    prompt_floor: SideFloor | None
    token_floor: SideFloor | None
    prompt_ubatches_per_s: float  # D_p / (m Y)
    token_ubatches_per_s: float  # D_t / (N t)
    requests_per_s: float
    tokens_per_s: float
    bottleneck: str
    baseline_requests_per_s: float  # D / (Y + N t): the shared pipeline without bubbles (an upper bound)
    inputs: PlanInputs
    notes: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)

    @property
    def disaggregated(self) -> bool:
        return self.prompt_machines > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = {k: v for k, v in asdict(self.inputs).items() if k != "keys"}
        return d

    def text(self) -> str:
        return "\n".join(self.reasoning)


# ---- memory floors ------------------------------------------------------------------------------------

def split_layers(num_layers: int, stages: int) -> list[int]:
    """Layers per stage as the workers split them (dejavu.engine.split_layers: earlier stages take the rest)."""
    base, extra = divmod(num_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def stage_needs(sizes: ModelSizes, stages: int, kv_tokens_per_layer: int) -> list[int]:
    """Bytes each of ``stages`` stages holds: its layers and their KV cache (+ embeddings / head)."""
    out = []
    for s, layers in enumerate(split_layers(sizes.num_layers, stages)):
        need = layers * (sizes.layer_bytes + kv_tokens_per_layer * sizes.kv_bytes_per_token_layer)
        need += (sizes.embed_bytes if s == 0 else 0) + (sizes.head_bytes if s == stages - 1 else 0)
        out.append(need)
    return out


def side_floor(side: str, sizes: ModelSizes, memory: float, *, input_len: int, new_tokens: int, ubatch: int,
               swapping: bool = False, max_stages: int | None = None) -> SideFloor:
    """The fewest stages (machines) of ``side`` whose memory holds it, trying 1 .. num_layers."""
    max_stages = min(max_stages or sizes.num_layers, sizes.num_layers)
    kv_tokens = input_len if side == "prompt" else input_len + new_tokens
    needs, resident = [], 1
    for n in range(1, max_stages + 1):
        resident = 1 if side == "prompt" else (min(2, n) if swapping else n)
        needs = stage_needs(sizes, n, resident * ubatch * kv_tokens)
        if max(needs) <= memory:
            return SideFloor(side, n, needs, resident, kv_tokens)
    return SideFloor(side, None, needs, resident, kv_tokens)


# ---- the plan -------------------------------------------------------------------------------------------

def _check(inp: PlanInputs) -> None:
    k = inp.keys
    for name, v, lo in (("machines", inp.machines, 1), ("input_len", inp.input_len, 1),
                        ("new_tokens", inp.new_tokens, 1), ("ubatch_size", inp.ubatch_size, 1),
                        ("gpus", inp.gpus_per_machine, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise PlanError(f"{k[name]}={v!r} must be an integer >= {lo}", k[name])
    for name, v in (("prompt_time", inp.prompt_time_s), ("token_time", inp.token_time_s)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise PlanError(f"{k[name]}={v!r} must be a time in seconds > 0", k[name])
    if not (math.isfinite(inp.stream_overhead) and inp.stream_overhead >= 1.0):
        raise PlanError(f"{k['stream_overhead']}={inp.stream_overhead!r} must be >= 1 (1 = streaming is free)",
                        k["stream_overhead"])
    if inp.memory_per_machine is not None and not (math.isfinite(inp.memory_per_machine) and inp.memory_per_machine > 0):
        raise PlanError(f"{k['memory']}={_gb_value(inp.memory_per_machine)} must be > 0", k["memory"])


def _gb_value(v) -> str:
    return f"{v / GB:g}" if isinstance(v, (int, float)) else repr(v)


def _gb(v: float) -> str:
    return f"{v / GB:.3g} GB"


def _too_small(inp: PlanInputs, side: str, floor: SideFloor) -> PlanError:
    """One machine cannot hold the smallest stage this side can have."""
    k, s = inp.keys, inp.sizes
    need = min(floor.need_bytes) if floor.need_bytes else s.layer_bytes
    short = need - inp.memory_per_machine
    one_layer = s.layer_bytes + floor.resident_ubatches * inp.ubatch_size * floor.kv_tokens * s.kv_bytes_per_token_layer
    what = (f"{floor.resident_ubatches} microbatch(es) x {inp.ubatch_size} requests x {floor.kv_tokens} positions"
            if side == "token" else f"one microbatch of {inp.ubatch_size} x {floor.kv_tokens} positions")
    return PlanError(
        f"{k['memory']}: no feasible split: a {side} machine with {_gb(inp.memory_per_machine)} cannot hold its "
        f"smallest stage even with one layer per machine ({len(floor.need_bytes)} stages): that stage needs "
        f"{_gb(need)} ({_gb(one_layer)} per layer: weights {_gb(s.layer_bytes)} + KV cache of {what}), "
        f"{_gb(short)} more than a machine has; give machines more memory, or lower "
        f"{k['ubatch_size']} / {k['input_len']} / {k['new_tokens']}"
        + ("" if inp.swapping or side == "prompt" else ", or turn on microbatch swapping"), k["memory"])


def plan_split(inp: PlanInputs) -> Plan:
    """The prompt/token split of ``inp.machines`` machines with its reasoning, or PlanError."""
    _check(inp)
    k, s = inp.keys, inp.sizes
    D, P, N, b = inp.machines, inp.input_len, inp.new_tokens, inp.ubatch_size
    Y, t, m = inp.prompt_time_s, inp.token_time_s, inp.stream_overhead
    L = s.num_layers
    notes: list[str] = []

    exact = D * N * t / (m * Y + N * t)
    balance_t = min(max(math.ceil(exact - 1e-9), 1), max(D - 1, 1))
    memory = inp.memory_per_machine
    pf = tf = None
    if D == 1:
        dp, dt, decided = 0, 1, "one machine"
        notes.append(f"{k['machines']}=1: one machine cannot be split; it runs prompts and tokens (the baseline)")
        if memory is not None:
            need = stage_needs(s, 1, b * (P + N))[0]
            if need > memory:
                raise PlanError(f"{k['memory']}: no feasible plan: one machine with {_gb(memory)} cannot hold the "
                                f"whole model and one microbatch's KV cache ({_gb(need)}, {_gb(need - memory)} more); "
                                f"use more {k['machines']}", k["memory"])
    else:
        dt, dp, decided = balance_t, D - balance_t, "balance"
        if memory is not None:
            pf = side_floor("prompt", s, memory, input_len=P, new_tokens=N, ubatch=b)
            tf = side_floor("token", s, memory, input_len=P, new_tokens=N, ubatch=b, swapping=inp.swapping)
            for f in (pf, tf):
                if f.machines is None:
                    raise _too_small(inp, f.side, f)
            if pf.machines + tf.machines > D:
                raise PlanError(
                    f"{k['machines']}={D}: no feasible split: the prompt side needs at least {pf.machines} machine(s) "
                    f"and the token side at least {tf.machines} to hold their layers and KV cache in "
                    f"{_gb(memory)} per machine ({k['memory']}), {pf.machines + tf.machines} in all: "
                    f"{pf.machines + tf.machines - D} more than {k['machines']}; add machines or memory, or lower "
                    f"{k['ubatch_size']}", k["machines"])
            if dt < tf.machines:
                dt, dp, decided = tf.machines, D - tf.machines, "token memory floor"
            elif dp < pf.machines:
                dp, dt, decided = pf.machines, D - pf.machines, "prompt memory floor"
        if dp > L or dt > L:
            notes.append(f"a pipeline has at most {L} stages (one layer each): "
                         f"{max(dp - L, 0) + max(dt - L, 0)} machine(s) stay idle")
            dp, dt = min(dp, L), min(dt, L)
            decided = decided if decided != "balance" else "layers"

    # gpus_per_machine > 1: times are per machine (the user gave them so, or a one-GPU profile was scaled)
    rate_p = dp / (m * Y) if dp else 0.0
    rate_t = dt / (N * t)
    if dp:
        ub_s = min(rate_p, rate_t)
        bottleneck = "prompt side" if rate_p < rate_t * (1 - 1e-9) else ("token side" if rate_t < rate_p * (1 - 1e-9) else "balanced")
    else:
        ub_s = D / (Y + N * t)
        bottleneck = "shared pipeline"
    baseline = b * D / (Y + N * t)
    plan = Plan(machines=D, prompt_machines=dp, token_machines=dt, decided_by=decided, balance_exact=exact,
                balance_token_machines=balance_t, prompt_floor=pf, token_floor=tf, prompt_ubatches_per_s=rate_p,
                token_ubatches_per_s=rate_t, requests_per_s=b * ub_s, tokens_per_s=b * N * ub_s,
                bottleneck=bottleneck, baseline_requests_per_s=baseline, inputs=inp, notes=notes)
    plan.reasoning = _reasoning(plan)
    return plan


def _ms(x: float) -> str:
    return f"{x * 1e3:.4g} ms" if x < 1 else f"{x:.4g} s"


def _reasoning(p: Plan) -> list[str]:
    inp, s, k = p.inputs, p.inputs.sizes, p.inputs.keys
    D, P, N, b = inp.machines, inp.input_len, inp.new_tokens, inp.ubatch_size
    Y, t, m = inp.prompt_time_s, inp.token_time_s, inp.stream_overhead
    lines = [
        f"model {inp.model}: {s.num_layers} layers, {s.dtype}: {_gb(s.layer_bytes)} per layer, embeddings "
        f"{_gb(s.embed_bytes)}, head {_gb(s.head_bytes)}, KV cache {s.kv_bytes_per_token_layer} B per token per layer",
        f"workload: prompt P={P} tokens, N={N} new tokens, microbatch b={b}; {D} machine(s)"
        + (f" of {inp.gpus_per_machine} GPUs" if inp.gpus_per_machine > 1 else "")
        + (f", {_gb(inp.memory_per_machine)} each" if inp.memory_per_machine is not None else ", memory not given"),
        f"times ({inp.times_from}): Y = {_ms(Y)} prompt per microbatch, t = {_ms(t)} per token step "
        f"(N·t = {_ms(N * t)}, Y / t = {Y / t:.3g}), stream overhead m = {m:g}",
    ]
    if D >= 2:
        lines.append(f"balance: D_t = ceil(D·N·t / (m·Y + N·t)) = ceil({D}·{N}·{_ms(t)} / ({m:g}·{_ms(Y)} + "
                     f"{N}·{_ms(t)})) = ceil({p.balance_exact:.3f}) -> {p.balance_token_machines} token machine(s)"
                     + (" (each side keeps at least one)" if math.ceil(p.balance_exact - 1e-9) != p.balance_token_machines else ""))
    for f in (p.prompt_floor, p.token_floor):
        if f is None:
            continue
        held = (f"one microbatch at {f.kv_tokens} positions" if f.side == "prompt" else
                f"{'2 resident (swapping)' if inp.swapping else 'every in-flight'} microbatch(es) at {f.kv_tokens} positions")
        lines.append(f"memory floor, {f.side} side: >= {f.machines} machine(s) (largest stage "
                     f"{_gb(max(f.need_bytes))} of {_gb(inp.memory_per_machine)}: layers + KV of {held})")
    if D >= 2 and inp.memory_per_machine is None:
        lines.append(f"memory floors: not applied ({k['memory']} not given)")
    lines += [f"note: {n}" for n in p.notes]
    if p.disaggregated:
        lines.append(f"decided by: {p.decided_by} -> {p.prompt_machines} prompt + {p.token_machines} token machine(s)")
        lines.append(f"predicted: prompt side {p.prompt_ubatches_per_s * b:.4g} req/s, token side "
                     f"{p.token_ubatches_per_s * b:.4g} req/s -> {p.requests_per_s:.4g} req/s, "
                     f"{p.tokens_per_s:.4g} tokens/s ({p.bottleneck} bound); the baseline on {D} machines at "
                     f"most {p.baseline_requests_per_s:.4g} req/s before its bubbles (`dejavu simulate` prices them)")
    else:
        lines.append(f"decided by: {p.decided_by} -> baseline on {D} machine(s), predicted at most "
                     f"{p.requests_per_s:.4g} req/s, {p.tokens_per_s:.4g} tokens/s")
    return lines


def largest_ubatch(sizes: ModelSizes, stages: int, memory: float, *, input_len: int, new_tokens: int,
                   swapping: bool, limit: int = 1 << 16) -> int:
    """The largest microbatch whose token side of ``stages`` machines fits ``memory`` each (0: none fits)."""
    resident = min(2, stages) if swapping else stages

    def fits(b: int) -> bool:
        return max(stage_needs(sizes, stages, resident * b * (input_len + new_tokens))) <= memory

    lo, hi = 0, limit  # fits(lo) or lo == 0; the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
