"""Control-plane messages between the controller and the workers (ZeroMQ frames of msgpack maps).

Every message is a typed dataclass of plain values; ``to_msg`` packs it as a msgpack map with a ``type``
key and ``from_msg`` checks the type and builds the dataclass back. Nothing is ever pickled, so a
malformed or hostile frame can at worst raise ``ProtocolError``.

Sockets: the controller binds one ROUTER; each worker connects two DEALERs, ``main`` (hello, ready,
tokens, stats, errors; the controller's welcome and submissions come back on it) and ``hb`` (heartbeats
from a side thread, and the controller's acks and aborts), so a worker busy in a long forward pass or a
blocking receive still proves it is alive and can still be told to stop.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import msgpack

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a well-formed message of this protocol."""


_TYPES: dict[str, type] = {}


def message(cls):
    """Register a dataclass as a message type under its class name."""
    cls = dataclass(cls)
    _TYPES[cls.__name__] = cls
    return cls


# ---- worker -> controller ------------------------------------------------------------------------------

@message
class Hello:
    """First message on a worker's main socket; the reply (Welcome) also syncs the clocks."""

    rank: int
    world_size: int
    pid: int
    host: str
    sent_at: float  # worker's monotonic clock when sent
    version: int = PROTOCOL_VERSION
    restart: bool = False  # a replacement for a rank that failed (--restart)
    generation: int = 0  # the failure generation it expects to join (--failures)
    spare: bool = False  # a hot spare: no rank yet, waits for an Assign


@message
class Ready:
    """The worker has loaded its layers and joined the data plane; it can take work."""

    rank: int
    role: str  # "stage" (baseline), "prompt" or "token"
    stage: int  # index within its pipeline
    tp_rank: int
    layers: list[int]  # [first, last)
    device: str
    load_s: float  # seconds to build and load the stage
    peak_memory_bytes: int
    clock_offset_s: float  # worker clock + offset = controller clock
    store: str = ""  # its replica store's address ("" without --with_ft)


@message
class Tokens:
    """New tokens of one microbatch at one generation step (step 0 is the token from the prompt)."""

    rank: int
    ubatch: int
    step: int
    request_ids: list[int]  # only the requests that emitted a token at this step
    tokens: list[int]
    finished: list[bool]  # per entry: was this the request's last token
    time_s: float  # controller clock
    generation: int = 0  # failure generation it was computed in (older ones are ignored after a reset)


@message
class Heartbeat:
    rank: int
    seq: int
    time_s: float  # controller clock
    progress: int = 0  # work items processed so far (for a progress deadline)
    replicated: dict = field(default_factory=dict)  # --with_ft: ubatch -> last step its holder acknowledged


@message
class Stats:
    """Sent once at the end: the worker's timeline and counters."""

    rank: int
    role: str
    stage: int
    tp_rank: int
    events: list[dict]  # StageEvent.to_dict(), times on the controller clock
    peak_memory_bytes: int
    bytes_sent: dict[str, int] = field(default_factory=dict)  # per path, e.g. {"act": n, "kv": n}
    bytes_received: dict[str, int] = field(default_factory=dict)
    time_in: dict[str, float] = field(default_factory=dict)  # seconds per path, e.g. {"kv_send": s}
    items: int = 0
    streams: dict = field(default_factory=dict)  # StreamStats.as_dict(): replication, recovery, ...
    kv_pool: dict = field(default_factory=dict)  # CachePool.report(): peak KV memory, swaps (worker/swap.py)


@message
class Error:
    """A worker failed; it sends what it knows before exiting."""

    rank: int
    message: str
    where: str = ""  # e.g. "startup", "prefill ubatch 3", "decode ubatch 1 step 7"
    traceback: str = ""


@message
class PeerLost:
    """The data plane broke under this worker (a peer died): it stops serving and waits for a Reset."""

    rank: int
    generation: int
    message: str


@message
class FaultPoint:
    """This worker reached the failure scenario's phase and is parked there for the runner to kill it."""

    rank: int
    phase: str
    step: int = 0


@message
class Rejoin:
    """After a Reset (or, from a replacement, after restoring its replicas): what this worker holds.

    ``state``: per microbatch it has a cache for, ``{"ubatch": u, "prompt": bool, "steps": n}`` — the
    prompt's positions are in the cache, and so are the first ``n`` decode steps' positions.
    """

    rank: int
    generation: int
    store: str
    state: list[dict] = field(default_factory=list)
    restored_bytes: int = 0
    restore_s: float = 0.0


@message
class ProcessGone:
    """From the runner: a worker's process exited (it saw the exit); faster than the heartbeat deadline."""

    rank: int
    pid: int
    exit_code: int


# ---- controller -> worker ------------------------------------------------------------------------------

@message
class Welcome:
    """Reply to Hello: the controller's clock, so the worker can express its times on it."""

    rank: int
    controller_time_s: float
    echo_sent_at: float
    heartbeat_interval_s: float
    controller_timeout_s: float  # a worker that hears nothing from the controller this long exits
    generation: int = 0  # the failure generation to join
    stores: dict = field(default_factory=dict)  # rank -> replica store address (a replacement restores from it)


@message
class Assign:
    """To a hot spare: become ``rank`` and join failure generation ``generation``."""

    rank: int
    generation: int


@message
class Arm:
    """Failure scenario: park at ``phase`` (prefill, admit, decode step ``step``) and say so (FaultPoint),
    so that the runner's kill lands exactly there."""

    phase: str
    step: int = 0


@message
class Reset:
    """A worker failed: drop the data plane and in-flight work, keep caches and replicas, rejoin."""

    generation: int
    lost: list[int]
    reason: str = ""


@message
class Resume:
    """Every rank rejoined: the new replica-store addresses and what each leader resumes.

    ``items``: microbatches resumed from a decode step (meta of a "resume" work item: ids, lens,
    max_seq, params, step, outputs, live); ``drop``: microbatches every stage forgets (their prompts
    are submitted again); ``resend``: ranks whose replicas were lost (their holder died): each sends its
    whole cache again to its (new) holder.
    """

    generation: int
    stores: dict
    items: list[dict] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    resend: list[int] = field(default_factory=list)


@message
class Submit:
    """A microbatch for the entry stage: prompts plus each request's sampling parameters."""

    ubatch: int
    request_ids: list[int]
    prompts: list[list[int]]
    params: list[dict]  # SamplingParams fields per request
    time_s: float = 0.0


@message
class HeartbeatAck:
    seq: int
    time_s: float


@message
class Shutdown:
    """No more microbatches: finish the ones in flight, send Stats and exit."""

    reason: str = "done"


@message
class Abort:
    """Stop at once (another worker failed, or the run was cancelled); exit without waiting for peers."""

    reason: str


def to_msg(m: Any) -> bytes:
    name = type(m).__name__
    if _TYPES.get(name) is not type(m):
        raise ProtocolError(f"{name} is not a registered message type")
    body = asdict(m)
    body["type"] = name
    return msgpack.packb(body, use_bin_type=True)


def from_msg(frame: bytes) -> Any:
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"frame is not valid msgpack: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise ProtocolError("frame is not a message map with a 'type' key")
    cls = _TYPES.get(body.pop("type"))
    if cls is None:
        raise ProtocolError(f"unknown message type in frame; known: {sorted(_TYPES)}")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = required - body.keys()
    if missing:
        raise ProtocolError(f"{cls.__name__} message lacks {sorted(missing)}")
    return cls(**{k: v for k, v in body.items() if k in names})

