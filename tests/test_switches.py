"""The environment switches: one registry (dejavu/model/switches.py) that the code reads them through,
malformed values refused by name, and the README listing every one of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dejavu.model import switches

ROOT = Path(__file__).resolve().parents[1]
# Process plumbing (runners/ set these for the processes they start; see the registry's docstring) is read
# by the serving command lines, not through the registry.
PLUMBING = ("dejavu/worker/", "dejavu/controller/", "dejavu/cli_serving.py")
NAME = re.compile(r"DEJAVU_[A-Z0-9_]*[A-Z0-9]")


def _engine_sources() -> list[Path]:
    files = sorted((ROOT / "dejavu").rglob("*.py"))
    return [f for f in files if not str(f.relative_to(ROOT)).startswith(PLUMBING)]


def test_every_switch_is_read_through_the_registry():
    """No file of the engine (dejavu/ but the serving plumbing) reads a DEJAVU_ variable itself, and every
    DEJAVU_ name it mentions, in code or prose, is a declared switch."""
    direct = re.compile(r"(environ|getenv)\b.*DEJAVU_")
    found, unknown = [], set()
    for path in _engine_sources():
        rel = path.relative_to(ROOT)
        if path.name == "switches.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if direct.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
            unknown |= {f"{name} ({rel}:{n})" for name in NAME.findall(line) if name not in switches.SWITCHES}
    assert not found, "read DEJAVU_ switches with switches.get():\n" + "\n".join(found)
    assert not unknown, "not declared in dejavu/model/switches.py: " + ", ".join(sorted(unknown))


def test_every_get_names_a_declared_switch():
    names = set()
    for path in [*_engine_sources(), *sorted((ROOT / "bench").glob("*.py"))]:
        names |= set(re.findall(r'switches\.get\("([A-Z0-9_]+)"\)', path.read_text()))
    assert names and names <= set(switches.SWITCHES), names - set(switches.SWITCHES)


def test_defaults_and_values(monkeypatch):
    for name in switches.SWITCHES:
        monkeypatch.delenv(name, raising=False)
        assert switches.get(name) == switches.SWITCHES[name].default, name
    monkeypatch.setenv("DEJAVU_TRITON", "0")
    assert switches.get("DEJAVU_TRITON") is False
    monkeypatch.setenv("DEJAVU_TRITON", "")  # empty: the default
    assert switches.get("DEJAVU_TRITON") is True
    monkeypatch.setenv("DEJAVU_PDL_EARLY", "")  # a list: empty is the empty list
    assert switches.get("DEJAVU_PDL_EARLY") == ()
    monkeypatch.setenv("DEJAVU_PDL_EARLY", "split,plain")
    assert switches.get("DEJAVU_PDL_EARLY") == ("split", "plain")
    monkeypatch.setenv("DEJAVU_TMA_TILE", "128,64,8")
    assert switches.get("DEJAVU_TMA_TILE") == (128, 64, 8)
    monkeypatch.setenv("DEJAVU_PREFILL_GRAPH_TOKENS", "0")
    assert switches.get("DEJAVU_PREFILL_GRAPH_TOKENS") == 0


# A malformed value for every switch that has one (the three path switches take any text; a sweep file
# that is not there is refused by kernel_tuning, below).
BAD = {"DEJAVU_TRITON": "off", "DEJAVU_SKINNY": "yes", "DEJAVU_SPLITK": "2", "DEJAVU_ATTN_WRITE": "true",
       "DEJAVU_PDL": "early", "DEJAVU_PDL_EARLY": "split,qkv", "DEJAVU_SKINNY_ALL": "all",
       "DEJAVU_CARVEOUT": "no", "DEJAVU_MATMUL": "cublas", "DEJAVU_TMA_TILE": "64,128",
       "DEJAVU_TMA_SPLITS": "two", "DEJAVU_TMA_EARLY": "-1", "DEJAVU_PREFILL_GRAPH_TOKENS": "2k",
       "DEJAVU_DRIVER_ISSUE": "on", "DEJAVU_PROGRESS": "yes"}
TEXT = {"DEJAVU_TUNING", "DEJAVU_CACHE_DIR", "DEJAVU_CONF_DIR"}


def test_every_switch_is_covered_here():
    assert set(BAD) | TEXT == set(switches.SWITCHES)


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_values_are_refused_by_name(name, monkeypatch):
    monkeypatch.setenv(name, BAD[name])
    with pytest.raises(switches.SwitchError, match=rf"^{name}='{re.escape(BAD[name])}': "):
        switches.get(name)


@pytest.mark.parametrize("name,bad", [("DEJAVU_TMA_TILE", "32,128,4"), ("DEJAVU_TMA_TILE", "64,512,4"),
                                      ("DEJAVU_TMA_TILE", "64,128,0"), ("DEJAVU_TMA_SPLITS", "0"),
                                      ("DEJAVU_PDL", "LATE"), ("DEJAVU_PREFILL_GRAPH_TOKENS", "-1")])
def test_out_of_range_values_are_refused_by_name(name, bad, monkeypatch):
    monkeypatch.setenv(name, bad)
    with pytest.raises(switches.SwitchError, match=name):
        switches.get(name)


def test_a_missing_sweep_file_is_refused_by_name(monkeypatch, tmp_path):
    from dejavu.model import kernel_tuning

    monkeypatch.setenv("DEJAVU_TUNING", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="DEJAVU_TUNING"):
        kernel_tuning.tuning()


def test_readme_and_help_list_every_switch():
    readme = (ROOT / "README.md").read_text()
    assert [n for n in switches.SWITCHES if not re.search(rf"`{n}[=`]", readme)] == []
    table = switches.table()
    assert all(n in table for n in switches.SWITCHES)
