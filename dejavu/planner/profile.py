"""A profile: prompt and token times of one model shape on one device, as measured by ``dejavu profile``.

The profile holds, for a grid of microbatch sizes and lengths, how long one *stage* of the pipeline
takes, decomposed so that any layer split can be priced without measuring it:

    stage time = fixed_s + layers * per_layer_s + (first stage) embed_s + (last stage) head_s

``fixed_s`` is the per-call cost that does not grow with layers (launches, Python, the stage's bookkeeping),
``per_layer_s`` the cost of one decoder layer, ``embed_s`` / ``head_s`` what the first / last stage adds.
Prompt points are keyed by (ubatch_size, input_len): one prefill of the microbatch. Token points by
(ubatch_size, context_len): one decode step with every slot at that position. Between grid points times
are interpolated linearly (in length, then in microbatch size); outside the grid they are extrapolated
linearly from the two nearest points and the lookup says so.

``comm`` (optional) prices the data plane between workers on the machine it was measured on: a fixed
latency and a rate per activation send, the sampler -> leader feedback, and the KV hand-over rate.

The file is JSON (``format: dejavu-profile/1``); loading checks every key and names the one that is wrong.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .sizes import ModelSizes

PROFILE_FORMAT = "dejavu-profile/1"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class StageTiming:
    """One grid point: the stage-time decomposition at (ubatch_size, length)."""

    ubatch_size: int
    length: int  # prompt points: input_len; token points: context length (the position written)
    per_layer_s: float
    fixed_s: float = 0.0
    embed_s: float = 0.0
    head_s: float = 0.0
    full_model_s: float | None = None  # the whole model in one stage, measured (when it fit)

    def stage_s(self, layers: int, first: bool, last: bool) -> float:
        return self.fixed_s + layers * self.per_layer_s + (self.embed_s if first else 0.0) + (self.head_s if last else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class CommTiming:
    """The data plane between two workers, as measured (``dejavu profile --comm``)."""

    backend: str
    hop_s: float  # fixed latency of one activation send (header + tensor), one way
    hop_bytes_per_s: float | None = None  # activation rate past the fixed latency (None: free)
    feedback_s: float = 0.0  # sampler -> leader next-token notice, one way
    kv_fixed_s: float = 0.0  # fixed cost of one microbatch's KV hand-over at one token stage
    kv_bytes_per_s: float | None = None  # KV hand-over rate (None: free)

    def hop(self, nbytes: float) -> float:
        return self.hop_s + (nbytes / self.hop_bytes_per_s if self.hop_bytes_per_s else 0.0)

    def kv(self, nbytes: float) -> float:
        return self.kv_fixed_s + (nbytes / self.kv_bytes_per_s if self.kv_bytes_per_s else 0.0)


@dataclass
class Profile:
    model: str
    family: str
    num_layers: int
    hidden_size: int
    device: str  # cpu | cuda
    device_name: str
    dtype: str
    sizes: ModelSizes
    prompt: list[StageTiming]
    token: list[StageTiming]
    comm: CommTiming | None = None
    threads: int | None = None  # CPU threads per worker when measured
    cuda_graphs: bool = False
    measured_layers: list[int] = field(default_factory=list)  # stage sizes actually built
    extrapolated: bool = False  # True: the whole model was never run; times come from a few layers
    note: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    source: str = ""  # the file it was read from

    # ---- lookups ------------------------------------------------------------------------------------
    def prompt_at(self, ubatch_size: int, input_len: int) -> StageTiming:
        return _lookup(self.prompt, ubatch_size, input_len)

    def token_at(self, ubatch_size: int, context_len: float) -> StageTiming:
        return _lookup(self.token, ubatch_size, context_len)

    def prompt_time(self, ubatch_size: int, input_len: int) -> float:
        """Y: one microbatch's prefill through the whole model (one stage holding every layer)."""
        return self.prompt_at(ubatch_size, input_len).stage_s(self.num_layers, True, True)

    def token_time(self, ubatch_size: int, context_len: float) -> float:
        """t: one token step of one microbatch through the whole model."""
        return self.token_at(ubatch_size, context_len).stage_s(self.num_layers, True, True)

    def outside_grid(self, ubatch_size: int, input_len: int, context_len: float) -> list[str]:
        """What a lookup extrapolates (empty when every value lies inside the measured grid)."""
        out = []
        for what, pts, length, name in (("prompt", self.prompt, input_len, "input_len"),
                                        ("token", self.token, context_len, "context length")):
            bs = sorted({p.ubatch_size for p in pts})
            ls = sorted({p.length for p in pts})
            if not bs[0] <= ubatch_size <= bs[-1]:
                out.append(f"{what} times: ubatch_size {ubatch_size} outside the measured {bs[0]}..{bs[-1]}")
            if not ls[0] <= length <= ls[-1]:
                out.append(f"{what} times: {name} {length:g} outside the measured {ls[0]}..{ls[-1]}")
        return out

    # ---- files --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"format": PROFILE_FORMAT, "model": self.model, "family": self.family, "num_layers": self.num_layers,
             "hidden_size": self.hidden_size, "device": self.device, "device_name": self.device_name,
             "dtype": self.dtype, "threads": self.threads, "cuda_graphs": self.cuda_graphs,
             "measured_layers": self.measured_layers, "extrapolated": self.extrapolated, "note": self.note,
             "versions": self.versions, "created": self.created, "sizes": self.sizes.to_dict(),
             "prompt": [p.to_dict() for p in self.prompt], "token": [p.to_dict() for p in self.token]}
        if self.comm is not None:
            d["comm"] = {k: v for k, v in asdict(self.comm).items() if v is not None}
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


# ---- loading ------------------------------------------------------------------------------------------

def load_profile(path: str | Path, key: str = "profile") -> Profile:
    """Read and check a profile; errors name ``key`` (the flag or config key that gave the path)."""
    p = Path(path).expanduser()
    if not p.is_file():
        shipped = find_shipped(str(path))
        if shipped is not None:
            p = shipped
        else:
            names = ", ".join(sorted(x.stem for x in PROFILES_DIR.glob("*.json"))) or "none"
            raise ProfileError(f"{key}: profile file '{path}' does not exist (shipped profiles: {names})")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{key}: cannot read profile '{p}': {e}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{key}: profile '{p}' is not valid JSON ({e.msg} at line {e.lineno})") from None
    prof = profile_from_dict(data, f"{key} '{p}'")
    prof.source = str(p)
    return prof


def find_shipped(name: str) -> Path | None:
    """A profile kept in the repository (dejavu/planner/profiles/NAME.json), by file stem."""
    if "/" in name:
        return None
    # "opt-1.3b-h100" has no suffix to strip (Path.stem would cut at ".3b"); "x.json" has one.
    p = PROFILES_DIR / (name if name.endswith(".json") else f"{name}.json")
    return p if p.is_file() else None


def shipped_profiles() -> list[Path]:
    return sorted(PROFILES_DIR.glob("*.json"))


def profile_from_dict(d: Any, where: str = "profile") -> Profile:
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: must hold a JSON object (format {PROFILE_FORMAT}), got {type(d).__name__}")
    if d.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where}: format is {d.get('format')!r}, expected {PROFILE_FORMAT!r} "
                           f"(write one with `dejavu profile`)")

    def need(obj: dict, k: str, kind, ctx: str = "", lo: float | None = None):
        if k not in obj:
            raise ProfileError(f"{where}: missing key {ctx}{k}")
        v = obj[k]
        ok = (isinstance(v, kind) and not isinstance(v, bool)) if kind is not bool else isinstance(v, bool)
        if kind is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            raise ProfileError(f"{where}: {ctx}{k} must be {_kind_name(kind)}, got {json.dumps(v)[:40]}")
        if lo is not None and v < lo:
            raise ProfileError(f"{where}: {ctx}{k} must be >= {lo:g}, got {v}")
        return v

    sizes_d = d.get("sizes")
    if not isinstance(sizes_d, dict):
        raise ProfileError(f"{where}: missing key sizes (an object of byte counts)")
    sizes = ModelSizes(num_layers=need(sizes_d, "num_layers", int, "sizes.", 1),
                       layer_bytes=need(sizes_d, "layer_bytes", int, "sizes.", 1),
                       embed_bytes=need(sizes_d, "embed_bytes", int, "sizes.", 0),
                       head_bytes=need(sizes_d, "head_bytes", int, "sizes.", 0),
                       kv_bytes_per_token_layer=need(sizes_d, "kv_bytes_per_token_layer", int, "sizes.", 1),
                       dtype=need(sizes_d, "dtype", str, "sizes."))

    def points(name: str) -> list[StageTiming]:
        raw = d.get(name)
        if not isinstance(raw, list) or not raw:
            raise ProfileError(f"{where}: {name} must be a non-empty list of timing points")
        out = []
        for i, pt in enumerate(raw):
            ctx = f"{name}[{i}]."
            if not isinstance(pt, dict):
                raise ProfileError(f"{where}: {name}[{i}] must be an object")
            full = pt.get("full_model_s")
            if full is not None:
                need(pt, "full_model_s", float, ctx, 0)
            out.append(StageTiming(ubatch_size=need(pt, "ubatch_size", int, ctx, 1), length=need(pt, "length", int, ctx, 1),
                                   per_layer_s=float(need(pt, "per_layer_s", float, ctx, 0)),
                                   fixed_s=float(need(pt, "fixed_s", float, ctx)) if "fixed_s" in pt else 0.0,
                                   embed_s=float(need(pt, "embed_s", float, ctx)) if "embed_s" in pt else 0.0,
                                   head_s=float(need(pt, "head_s", float, ctx)) if "head_s" in pt else 0.0,
                                   full_model_s=full))
        return out

    comm = None
    if d.get("comm") is not None:
        c = d["comm"]
        if not isinstance(c, dict):
            raise ProfileError(f"{where}: comm must be an object")
        opt = lambda k: float(need(c, k, float, "comm.", 0)) if c.get(k) is not None else None  # noqa: E731
        comm = CommTiming(backend=need(c, "backend", str, "comm."), hop_s=float(need(c, "hop_s", float, "comm.", 0)),
                          hop_bytes_per_s=opt("hop_bytes_per_s"), feedback_s=opt("feedback_s") or 0.0,
                          kv_fixed_s=opt("kv_fixed_s") or 0.0, kv_bytes_per_s=opt("kv_bytes_per_s"))
    num_layers = need(d, "num_layers", int, "", 1)
    if sizes.num_layers != num_layers:
        raise ProfileError(f"{where}: sizes.num_layers={sizes.num_layers} but num_layers={num_layers}")
    return Profile(model=need(d, "model", str), family=need(d, "family", str), num_layers=num_layers,
                   hidden_size=need(d, "hidden_size", int, "", 1), device=need(d, "device", str),
                   device_name=need(d, "device_name", str), dtype=need(d, "dtype", str), sizes=sizes,
                   prompt=points("prompt"), token=points("token"), comm=comm, threads=d.get("threads"),
                   cuda_graphs=bool(d.get("cuda_graphs", False)), measured_layers=list(d.get("measured_layers") or []),
                   extrapolated=bool(d.get("extrapolated", False)), note=str(d.get("note") or ""),
                   versions=dict(d.get("versions") or {}), created=str(d.get("created") or ""))


def _kind_name(kind) -> str:
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}.get(kind, str(kind))


# ---- interpolation --------------------------------------------------------------------------------------

_FIELDS = ("per_layer_s", "fixed_s", "embed_s", "head_s")


def _mix(a: StageTiming, b: StageTiming, w: float, ubatch: int, length: float) -> StageTiming:
    """a + w (b - a), field by field (w outside [0, 1] extrapolates; times are kept >= 0 in total)."""
    vals = {f: getattr(a, f) + w * (getattr(b, f) - getattr(a, f)) for f in _FIELDS}
    vals["per_layer_s"] = max(vals["per_layer_s"], 0.0)
    return StageTiming(ubatch_size=ubatch, length=int(round(length)), **vals)


def _interp(xs: list[float], x: float) -> tuple[int, int, float]:
    """Indices i, j of xs and weight w with x = xs[i] + w (xs[j] - xs[i]); linear extrapolation outside."""
    if len(xs) == 1:
        return 0, 0, 0.0
    k = bisect_left(xs, x)
    i = min(max(k - 1, 0), len(xs) - 2)
    return i, i + 1, (x - xs[i]) / (xs[i + 1] - xs[i])


def _along_length(series: list[StageTiming], length: float, ubatch: int) -> StageTiming:
    series = sorted(series, key=lambda p: p.length)
    i, j, w = _interp([p.length for p in series], length)
    return _mix(series[i], series[j], w, ubatch, length)


def _lookup(points: Iterable[StageTiming], ubatch: int, length: float) -> StageTiming:
    by_b: dict[int, list[StageTiming]] = {}
    for p in points:
        by_b.setdefault(p.ubatch_size, []).append(p)
    bs = sorted(by_b)
    if ubatch in by_b:
        return _along_length(by_b[ubatch], length, ubatch)
    i, j, w = _interp([float(b) for b in bs], float(ubatch))
    a, b = _along_length(by_b[bs[i]], length, bs[i]), _along_length(by_b[bs[j]], length, bs[j])
    return _mix(a, b, w, ubatch, length)
