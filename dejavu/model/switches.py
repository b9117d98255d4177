"""Every environment switch the dejavu package reads: name, type, default and meaning, in one place.

Code reads a switch with ``switches.get(NAME)``, never through ``os.environ`` itself (a test greps for
that). A value that does not parse is refused with an error that names the switch, the value and what it
takes. Unset or empty means the default, except for a list, where empty is the empty list.

Most switches are there for A/B measurements: ``bench/generate.py --variants`` sets them to rebuild the
engine one optimisation at a time, and docs/PERFORMANCE.md says what each alternative measured. They are
read at each call ("call"), so one process can A/B them (a captured CUDA graph keeps what it captured),
except the two marked "import", read once when their module is imported.

Process plumbing is not listed here: ``DEJAVU_RUN_ID``, ``DEJAVU_CONTROLLER_IP`` / ``_PORT``,
``DEJAVU_FAULT``, ``DEJAVU_HOST`` and ``DEJAVU_STANDIN_*`` are set by ``runners/`` for the processes they
start and read by the serving command lines (``dejavu/cli_serving.py``, ``dejavu/worker/``);
``DEJAVU_RESULTS`` is read by Hydra (``conf/config.yaml``).

    python -m dejavu.model.switches      # the table (also printed by `dejavu generate --help`)
"""

from __future__ import annotations

import functools
import os
import textwrap
from dataclasses import dataclass
from typing import Callable


class SwitchError(ValueError):
    """A switch set to a value it does not take; the message names the switch."""


@dataclass(frozen=True)
class Switch:
    name: str
    takes: str  # the values it takes, as the help table shows them
    default: object  # what ``get`` returns when the switch is unset or empty
    shown: str  # the default, as the help table shows it
    meaning: str
    parse: Callable[[str], object]
    read: str = "call"  # "call": at each use; "import": once, when its module is imported
    empty_is_value: bool = False  # a list: "" is the empty list, not the default


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("takes 0 or 1")
    return raw == "1"


def _one_of(*values: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in values:
            raise ValueError(f"takes one of {', '.join(values)}")
        return raw
    return parse


def _whole(least: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not raw.isdigit() or int(raw) < least:
            raise ValueError(f"takes a whole number, {least} or more")
        return int(raw)
    return parse


def _kinds(*allowed: str) -> Callable[[str], tuple]:
    def parse(raw: str) -> tuple:
        kinds = tuple(k for k in raw.split(",") if k)
        wrong = [k for k in kinds if k not in allowed]
        if wrong:
            raise ValueError(f"takes a comma list of {', '.join(allowed)} (or nothing); {', '.join(wrong)} is none")
        return kinds
    return parse


def _tile(raw: str) -> tuple[int, int, int]:
    parts = raw.split(",")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError("takes BLOCK_N,BLOCK_K,stages (three whole numbers)")
    block_n, block_k, stages = (int(p) for p in parts)
    if block_n not in (64, 128) or block_k not in (64, 128, 256) or stages < 1:
        raise ValueError("BLOCK_N must be 64 or 128, BLOCK_K 64, 128 or 256, stages >= 1")
    return block_n, block_k, stages


def _text(raw: str) -> str:
    return raw


SWITCHES: dict[str, Switch] = {s.name: s for s in (
    # ---- the decode kernels (dejavu/model/fused.py, skinny_tma.py, kernel_tuning.py) ----
    Switch("DEJAVU_TRITON", "0|1", True, "1", "our Triton kernels on the GPU; 0: plain PyTorch ops throughout",
           _flag),
    Switch("DEJAVU_SKINNY", "0|1", True, "1", "decode projections (<= 64 rows) through our weight-streaming matmuls; "
           "0: cuBLAS", _flag),
    Switch("DEJAVU_SPLITK", "0|1", True, "1", "out and down projections split along K, their fp32 partials summed "
           "by the next add+norm; 0: whole", _flag),
    Switch("DEJAVU_ATTN_WRITE", "0|1", True, "1", "decode attention also rotates and stores the new token's k, v; "
           "0: a separate rope_write kernel", _flag),
    Switch("DEJAVU_PDL", "0|1|late", "late", "late", "programmatic dependent launch (Hopper): late, a matmul lets "
           "its successor launch once its weights are streamed; 1, every kernel right after its wait; 0, off",
           _one_of("0", "1", "late")),
    Switch("DEJAVU_PDL_EARLY", "kinds", ("split",), "split", "with PDL late, the matmul kinds (split, plain, "
           "activation) that let their successor launch right after their wait; empty: none",
           _kinds("split", "plain", "activation"), empty_is_value=True),
    Switch("DEJAVU_SKINNY_ALL", "0|1", None, "1 with PDL, else 0", "our matmuls on every decode shape; 0: cuBLAS "
           "where the tuning tables found it as fast", _flag),
    Switch("DEJAVU_CARVEOUT", "0|1", True, "1", "our kernels load with the whole shared-memory carveout, so that "
           "PDL's early programs can share an SM; 0: Triton's own", _flag, read="import"),
    Switch("DEJAVU_MATMUL", "tma|triton", "tma", "tma", "the decode matmul on Hopper: tma, the Gluon kernel that "
           "stages weights by TMA (skinny_tma.py); triton, the Triton kernel (what other GPUs run)",
           _one_of("tma", "triton")),
    Switch("DEJAVU_TMA_TILE", "N,K,stages", None, "per rows (TILES)", "one tiling of the TMA matmul for every "
           "row count: BLOCK_N 64|128, BLOCK_K 64|128|256, stages >= 1", _tile),
    Switch("DEJAVU_TMA_SPLITS", "whole >= 1", None, "the split table's", "K slices of the split-K TMA projections",
           _whole(1)),
    Switch("DEJAVU_TMA_EARLY", "0|1", True, "1", "the TMA matmul issues its first weight tiles before the PDL "
           "wait; 0: after it", _flag),
    Switch("DEJAVU_TUNING", "auto|builtin|FILE", "auto", "auto", "decode kernel tilings: auto, "
           "dejavu/model/tuning/<device>.json over the built-in H100 tables; builtin, those alone; FILE, a "
           "bench/decode_kernels.py --out sweep", _text),
    # ---- graphs, streaming, files ----
    Switch("DEJAVU_PREFILL_GRAPH_TOKENS", "whole >= 0", 2048, "2048", "prefills of at most this many tokens "
           "(slots x padded length) replay CUDA graphs; 0: none", _whole(0), read="import"),
    Switch("DEJAVU_DRIVER_ISSUE", "0|1", True, "1", "the per-step replicator issues each step as four CUDA "
           "driver calls; 0: PyTorch's calls", _flag),
    Switch("DEJAVU_CACHE_DIR", "DIR", "~/.cache/dejavu", "~/.cache/dejavu", "GGUF files are converted once into "
           "HF folders under DIR/gguf", _text),
    Switch("DEJAVU_CONF_DIR", "DIR", None, "the repository's conf/", "where model names (conf/model/*.yaml) are "
           "looked up; runners/ set it for the processes they start", _text),
    Switch("DEJAVU_PROGRESS", "0|1", False, "0", "the controller draws its progress line even when its output is "
           "not a terminal", _flag),
)}


@functools.lru_cache(maxsize=256)
def _parse(name: str, raw: str) -> object:
    s = SWITCHES[name]
    try:
        return s.parse(raw)
    except ValueError as e:
        raise SwitchError(f"{name}={raw!r}: {e} ({name}: {s.meaning})") from None


def get(name: str) -> object:
    """The value of switch ``name`` (declared above) in this process's environment now."""
    s = SWITCHES[name]
    raw = os.environ.get(name)
    if raw is None or (raw == "" and not s.empty_is_value):
        return s.default
    return _parse(name, raw)


def table() -> str:
    """The switches as a plain-text table (``dejavu generate --help``, ``python -m dejavu.model.switches``)."""
    lines = ["environment switches (read at each call unless marked 'import'):"]
    for s in SWITCHES.values():
        read = ", import" if s.read == "import" else ""
        lines.append(f"  {s.name}={s.takes}  (default {s.shown}{read})")
        lines.append(textwrap.fill(s.meaning, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
