"""The workload: which requests arrive when, with which prompts and how many tokens to generate.

Two independent choices, as in the seed's controller flags:

- **sizes** — ``fixed`` (every prompt ``input_len`` tokens, every request ``output_len`` new tokens) or a
  ``trace`` (``input_sizes_file``: a JSON list of ``[prompt_size, num_generated_tokens]``, the seed's
  format; the first ``num_requests`` entries, or all when ``num_requests`` is None);
- **arrivals** — all at t=0 (closed batch), ``poisson`` (exponential gaps at ``rps`` requests/s drawn
  from ``arrival_seed``; the first request arrives at t=0) or ``timestamps`` (``input_timestamps_file``:
  a JSON list of non-decreasing arrival seconds).

``kind`` names the combination the way the Hydra ``workload`` group does: ``fixed`` and ``trace`` pick the
sizes (and arrive at once unless ``poisson: true`` — the seed's ``--poisson`` flag), ``poisson`` and
``timestamps`` pick the arrivals (sizes come from the trace when ``input_sizes_file`` is set, else fixed).

Prompts are random token ids from a seeded generator (``prompt_seed``), drawn uniformly from the vocab
minus the special ids, or real text (``prompts`` / ``prompts_file``, one prompt per line) tokenized by the
tokenizer passed in, optionally through its chat template; a text prompt's length is its own.

Everything is checked before any process starts; errors are ``WorkloadError`` naming the key or file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .records import Request
from .sampling import SamplingParams

KINDS = ("fixed", "trace", "poisson", "timestamps")


class WorkloadError(ValueError):
    """A workload setting or file is wrong; the message names the key or file and what would be right."""


@dataclass
class WorkloadSpec:
    kind: str = "fixed"  # fixed | trace | poisson | timestamps (see the module docstring)
    num_requests: int | None = 8  # None: every entry of the trace / timestamps / prompt list
    input_len: int = 16  # prompt tokens (fixed sizes, random-id prompts)
    output_len: int = 16  # new tokens per request (fixed sizes and text prompts)
    input_sizes_file: str | None = None  # JSON [[prompt_size, num_generated_tokens], ...]
    poisson: bool = False  # the seed's --poisson: Poisson arrivals on top of fixed/trace sizes
    rps: float = 1.0  # Poisson arrival rate, requests per second
    arrival_seed: int = 0
    input_timestamps_file: str | None = None  # JSON [t0, t1, ...] seconds, non-decreasing
    # Prompt source: random ids (default) or real text.
    prompt_seed: int = 0
    prompts: list[str] | None = None
    prompts_file: str | None = None  # UTF-8 text, one prompt per line (blank lines skipped)
    chat_template: bool = False  # wrap each text prompt as a user turn of the tokenizer's chat template
    # Sampling, the same for every request except the seed (seed + request id).
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)  # e.g. the tokenizer's EOS; empty: never stop early


# ---------------------------------------------------------------------------------------------- files

def _key(name: str) -> str:
    return f"workload.{name}"  # the Hydra group's keys; build_workload(key_prefix=) renames them


def _read_json(path: str | Path, key: str) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkloadError(f"{key}: cannot read '{p}': {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{key}: '{p}' is not valid JSON ({e.msg} at line {e.lineno}, "
                            f"column {e.colno})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_trace(path: str | Path, key: str = "workload.input_sizes_file") -> list[tuple[int, int]]:
    """The seed's trace: a JSON list of ``[prompt_size, num_generated_tokens]`` pairs of positive ints."""
    data = _read_json(path, key)
    want = "a JSON list of [prompt_size, num_generated_tokens] pairs of positive integers, e.g. [[128, 32], [64, 16]]"
    if not isinstance(data, list) or not data:
        raise WorkloadError(f"{key}: '{path}' must hold {want}; got {_kind_of(data)}")
    out = []
    for i, item in enumerate(data):
        if not (isinstance(item, list) and len(item) == 2 and all(_is_int(v) for v in item)):
            raise WorkloadError(f"{key}: '{path}' entry {i} is {json.dumps(item)[:60]}; each entry must be "
                                f"[prompt_size, num_generated_tokens] (two integers)")
        if item[0] <= 0 or item[1] <= 0:
            raise WorkloadError(f"{key}: '{path}' entry {i} is {item}; prompt_size and num_generated_tokens "
                                f"must both be >= 1")
        out.append((item[0], item[1]))
    return out


def load_timestamps(path: str | Path, key: str = "workload.input_timestamps_file") -> list[float]:
    """A JSON list of arrival times in seconds after the run starts, >= 0 and non-decreasing."""
    data = _read_json(path, key)
    if not isinstance(data, list) or not data:
        raise WorkloadError(f"{key}: '{path}' must hold a non-empty JSON list of arrival seconds, e.g. "
                            f"[0.0, 0.5, 1.25]; got {_kind_of(data)}")
    out = []
    for i, t in enumerate(data):
        if not (isinstance(t, (int, float)) and not isinstance(t, bool)) or not math.isfinite(t) or t < 0:
            raise WorkloadError(f"{key}: '{path}' entry {i} is {json.dumps(t)[:40]}; arrival times must be "
                                f"finite numbers >= 0")
        if out and t < out[-1]:
            raise WorkloadError(f"{key}: '{path}' timestamps must be non-decreasing; entry {i} ({t}) comes "
                                f"before entry {i - 1} ({out[-1]})")
        out.append(float(t))
    return out


def load_prompts_file(path: str | Path, key: str = "workload.prompts_file") -> list[str]:
    """One prompt per line (UTF-8); blank lines are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise WorkloadError(f"{key}: cannot read '{p}': {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise WorkloadError(f"{key}: '{p}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise WorkloadError(f"{key}: '{p}' holds no prompts; write one prompt per line")
    return prompts


def _kind_of(x: Any) -> str:
    if isinstance(x, list):
        return "an empty list" if not x else "a list"
    return f"a JSON {type(x).__name__}" if not isinstance(x, dict) else "a JSON object"


# ------------------------------------------------------------------------------------------- building

def build_workload(spec: WorkloadSpec, *, vocab_size: int | None = None, max_positions: int | None = None,
                   tokenizer: Any = None, special_ids: Iterable[int] = (),
                   key_prefix: str = "workload") -> list[Request]:
    """The requests of a run, ids 0..n-1 in arrival order.

    ``vocab_size`` is needed for random-id prompts (ids are drawn from ``[0, vocab_size)`` minus
    ``special_ids``, e.g. BOS/EOS/PAD); ``tokenizer`` for text prompts; ``max_positions`` (the model's
    context length), when given, bounds every prompt + generated tokens. Errors name keys as
    ``workload.<key>``; ``key_prefix`` renames them (e.g. to the controller's flags' namespace).
    """
    try:
        return _build(spec, vocab_size, max_positions, tokenizer, special_ids)
    except WorkloadError as e:
        if key_prefix == "workload":
            raise
        raise WorkloadError(str(e).replace("workload.", f"{key_prefix}." if key_prefix else "")) from None


def longest_request(spec: WorkloadSpec) -> int | None:
    """Positions the longest request writes (prompt + new tokens), or None for text prompts (their
    lengths need the tokenizer). Lets GPU workers size their KV buffers before the first request."""
    check_spec(spec)
    if _text_prompts(spec) is not None:
        return None
    return max((p + g for p, g in _sizes(spec, None)), default=None)


def _build(spec: WorkloadSpec, vocab_size: int | None, max_positions: int | None, tokenizer: Any,
           special_ids: Iterable[int]) -> list[Request]:
    check_spec(spec)
    text = _text_prompts(spec)
    sizes = _sizes(spec, text)
    n = len(sizes)
    arrivals = _arrivals(spec, n)

    if text is not None:
        if tokenizer is None:
            raise WorkloadError(f"{_key('prompts')}: text prompts need a tokenizer (pass tokenizer=)")
        from .model.tokenizer import encode_prompts  # the project's one text -> ids path (chat template too)

        try:
            encoded = encode_prompts(tokenizer, text, chat=spec.chat_template)
        except ValueError as e:
            raise WorkloadError(f"{_key('prompts')}: {e}") from None
        prompt_ids = [encoded[i % len(encoded)] for i in range(n)]
        texts: list[str | None] = [text[i % len(text)] for i in range(n)]
        sizes = [(len(p), out) for p, (_, out) in zip(prompt_ids, sizes)]
    else:
        prompt_ids = _random_prompts(spec, [s for s, _ in sizes], vocab_size, special_ids)
        texts = [None] * n

    if max_positions is not None:
        _check_positions(spec, sizes, max_positions, text is not None)

    return [Request(id=i, prompt_ids=prompt_ids[i], max_new_tokens=sizes[i][1], arrival_s=arrivals[i],
                    temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed + i,
                    min_new_tokens=min(spec.min_new_tokens, sizes[i][1]),
                    stop_token_ids=list(spec.stop_token_ids), text=texts[i])
            for i in range(n)]


def group_into_microbatches(requests: Sequence[Request], ubatch_size: int) -> list[list[Request]]:
    """Consecutive groups of ``ubatch_size`` requests in the given (arrival) order; the last may be short."""
    if not _is_int(ubatch_size) or ubatch_size < 1:
        raise WorkloadError(f"ubatch_size must be an integer >= 1, got {ubatch_size!r}")
    return [list(requests[i:i + ubatch_size]) for i in range(0, len(requests), ubatch_size)]


def check_spec(spec: WorkloadSpec) -> None:
    """The rules that need no file and no model: kinds versus files, ranges, sampling settings."""
    k = _key
    if spec.kind not in KINDS:
        raise WorkloadError(f"{k('kind')} must be one of {', '.join(KINDS)}; got {spec.kind!r}")
    if spec.num_requests is not None and (not _is_int(spec.num_requests) or spec.num_requests < 1):
        raise WorkloadError(f"{k('num_requests')} must be an integer >= 1 (or null for the whole trace); "
                            f"got {spec.num_requests!r}")
    for name in ("input_len", "output_len"):
        v = getattr(spec, name)
        if not _is_int(v) or v < 1:
            raise WorkloadError(f"{k(name)} must be an integer >= 1; got {v!r}")
    if spec.kind == "trace" and not spec.input_sizes_file:
        raise WorkloadError(f"{k('kind')}=trace needs {k('input_sizes_file')} (a JSON list of "
                            f"[prompt_size, num_generated_tokens])")
    if spec.kind == "fixed" and spec.input_sizes_file:
        raise WorkloadError(f"{k('kind')}=fixed conflicts with {k('input_sizes_file')}={spec.input_sizes_file!r}; "
                            f"use kind=trace to read sizes from the file, or unset it")
    if spec.kind == "timestamps" and not spec.input_timestamps_file:
        raise WorkloadError(f"{k('kind')}=timestamps needs {k('input_timestamps_file')} (a JSON list of "
                            f"arrival seconds)")
    if spec.input_timestamps_file and spec.kind != "timestamps":
        raise WorkloadError(f"{k('input_timestamps_file')} is set but {k('kind')}={spec.kind}; "
                            f"use kind=timestamps")
    poisson = spec.poisson or spec.kind == "poisson"
    if poisson and spec.kind == "timestamps":
        raise WorkloadError(f"{k('poisson')}=true conflicts with {k('kind')}=timestamps: arrivals come "
                            f"either from a Poisson process or from the timestamps file")
    if poisson and (isinstance(spec.rps, bool) or not isinstance(spec.rps, (int, float))
                    or not math.isfinite(spec.rps) or spec.rps <= 0):
        raise WorkloadError(f"{k('rps')} must be a number > 0 for Poisson arrivals; got {spec.rps!r}")
    if spec.prompts is not None and spec.prompts_file:
        raise WorkloadError(f"set either {k('prompts')} or {k('prompts_file')}, not both")
    if (spec.prompts is not None or spec.prompts_file) and spec.input_sizes_file:
        raise WorkloadError(f"text prompts ({k('prompts')}/{k('prompts_file')}) set their own lengths; "
                            f"they cannot be combined with {k('input_sizes_file')}")
    try:
        SamplingParams(max_new_tokens=max(spec.output_len, 1), min_new_tokens=0, temperature=spec.temperature,
                       top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise WorkloadError(f"{k(name)}: {e}") from None
    if not _is_int(spec.min_new_tokens) or spec.min_new_tokens < 0:
        raise WorkloadError(f"{k('min_new_tokens')} must be an integer >= 0; got {spec.min_new_tokens!r}")
    if not all(_is_int(t) and t >= 0 for t in spec.stop_token_ids):
        raise WorkloadError(f"{k('stop_token_ids')} must be a list of token ids >= 0; got {spec.stop_token_ids!r}")


_check_spec = check_spec  # the name runners/validate.py first reached for


def _text_prompts(spec: WorkloadSpec) -> list[str] | None:
    if spec.prompts_file:
        return load_prompts_file(spec.prompts_file, _key("prompts_file"))
    if spec.prompts is None:
        return None
    prompts = list(spec.prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise WorkloadError(f"{_key('prompts')} must be a non-empty list of non-empty strings")
    return prompts


def _sizes(spec: WorkloadSpec, text: list[str] | None) -> list[tuple[int, int]]:
    """(prompt_size, new_tokens) per request; a text prompt's size is replaced once it is tokenized."""
    if spec.input_sizes_file:
        trace = load_trace(spec.input_sizes_file, _key("input_sizes_file"))
        if spec.num_requests is None:
            return trace
        if spec.num_requests > len(trace):
            raise WorkloadError(f"{_key('num_requests')}={spec.num_requests} but "
                                f"{_key('input_sizes_file')} '{spec.input_sizes_file}' has only "
                                f"{len(trace)} entries; lower num_requests or set it to null for all")
        return trace[:spec.num_requests]
    n = spec.num_requests
    if n is None:
        if text is not None:
            n = len(text)  # a text prompt list is a pool: null takes each once, more cycles through it
        elif spec.input_timestamps_file:
            n = len(load_timestamps(spec.input_timestamps_file, _key("input_timestamps_file")))
        else:
            raise WorkloadError(f"{_key('num_requests')} must be set for kind={spec.kind} "
                                f"(null means 'the whole trace' and needs a trace, timestamps or prompt file)")
    return [(spec.input_len, spec.output_len)] * n


def _arrivals(spec: WorkloadSpec, n: int) -> list[float]:
    if spec.input_timestamps_file:
        key = _key("input_timestamps_file")
        ts = load_timestamps(spec.input_timestamps_file, key)
        if len(ts) < n:
            raise WorkloadError(f"{key} '{spec.input_timestamps_file}' has {len(ts)} timestamps but the "
                                f"workload has {n} requests; give at least one timestamp per request")
        return ts[:n]
    if spec.poisson or spec.kind == "poisson":
        gaps = np.random.default_rng(spec.arrival_seed).exponential(1.0 / spec.rps, size=n)
        gaps[0] = 0.0  # the run starts with a request instead of idling for the first gap
        return [float(t) for t in np.cumsum(gaps)]
    return [0.0] * n


def _random_prompts(spec: WorkloadSpec, lengths: list[int], vocab_size: int | None,
                    special_ids: Iterable[int]) -> list[list[int]]:
    if vocab_size is None or not _is_int(vocab_size) or vocab_size < 1:
        raise WorkloadError(f"random-id prompts need the model's vocab_size (got {vocab_size!r}); "
                            f"or give text via {_key('prompts')} / {_key('prompts_file')}")
    special = np.array(sorted({int(s) for s in special_ids if s is not None}), dtype=np.int64)
    allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special)
    if allowed.size == 0:
        raise WorkloadError(f"no token ids left to draw prompts from: vocab_size={vocab_size}, "
                            f"all of them special")
    rng = np.random.default_rng(spec.prompt_seed)
    return [allowed[rng.integers(0, allowed.size, size=n)].tolist() for n in lengths]


def _check_positions(spec: WorkloadSpec, sizes: list[tuple[int, int]], max_positions: int, text: bool) -> None:
    for i, (p, g) in enumerate(sizes):
        if p + g > max_positions:
            if spec.input_sizes_file:
                where = f"{_key('input_sizes_file')} '{spec.input_sizes_file}' entry {i} [{p}, {g}]"
            elif text:
                where = f"text prompt {i} ({p} tokens) + {_key('output_len')}={g}"
            else:
                where = f"{_key('input_len')}={p} + {_key('output_len')}={g}"
            raise WorkloadError(f"{where}: {p + g} positions exceed the model's max positions "
                                f"({max_positions}); prompt + generated tokens must be <= {max_positions}")


def sizes_and_arrivals(spec: WorkloadSpec) -> tuple[list[tuple[int, int]], list[float]]:
    """(prompt_size, new_tokens) and arrival seconds of every request, without building any prompt: what
    the simulator needs (``dejavu simulate``). Text prompts have no size before tokenizing: refused."""
    check_spec(spec)
    if _text_prompts(spec) is not None:
        raise WorkloadError(f"{_key('prompts')}: text prompts have no size until tokenized; give sizes with "
                            f"{_key('input_len')} or {_key('input_sizes_file')}")
    sizes = _sizes(spec, None)
    return sizes, _arrivals(spec, len(sizes))
