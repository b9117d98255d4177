"""W&B logging, offline for real: the run lands in the run folder and its records hold config, summary,
table, plots and artifact; no API key reaches any file."""

from __future__ import annotations

import json
import os
import struct

import pytest

from dejavu.records import RequestRecord, StageEvent
from dejavu.results import write_results

FAKE_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"  # 40 chars, the shape of a real key


def wandb_records(path):
    """Records of an offline ``run-<id>.wandb`` file: the LevelDB log format wandb writes (a 7-byte
    ':W&B' header, then 32 KiB blocks of chunks with a 7-byte <crc32, length, type> header each;
    type 1 = full record, 2/3/4 = first/middle/last piece), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pieces = chunk
        else:
            pieces += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pieces)
            yield rec


def read_offline_run(run_folder):
    [wandb_file] = list(run_folder.glob("run-*.wandb"))
    out = {"summary": {}, "config": {}, "history": {}, "artifacts": [], "run": None, "exit": None}
    for r in wandb_records(wandb_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "history":
            out["history"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "artifact":
            out["artifacts"].append(r.artifact)
        elif kind == "exit":
            out["exit"] = r.exit
    return out


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # a wandb-core of some outer process: not ours to use
    recs = [RequestRecord(id=i, prompt_ids=[1, 2, 3], output_ids=[4] * (i + 1), arrival_s=0.1 * i,
                          first_token_s=0.1 * i + 0.2, finish_s=0.1 * i + 0.5 + 0.1 * i, status="ok",
                          text=f"answer {i}") for i in range(5)]
    evs = [StageEvent(worker=0, stage="stage0", kind="decode", start_s=0.1 * k, end_s=0.1 * k + 0.05) for k in range(10)]
    d = tmp_path / "run"
    write_results(d, recs, evs, None, {"model": {"name": "tiny"}, "wandb_api_key": FAKE_KEY, "rps": 2.0})
    return d


def test_offline_run_lands_in_the_run_folder_with_everything(run_dir):
    from dejavu.results.wandb_log import log_run

    summary = json.loads((run_dir / "summary.json").read_text())
    info = log_run(run_dir, project="dejavu-test", group="sweep-7", name="point-a", tags=["ci", "tiny"])
    assert info.mode == "offline" and info.url is None
    assert info.dir.parent == run_dir / "wandb" and info.dir.name.startswith("offline-run-")
    # log_run returns only once wandb-core has closed the run: the file is whole right away (finish()
    # alone returned with the records still buffered in wandb-core), and no service token is left in our
    # environment for child processes to attach to.
    token = os.environ.get("WANDB_SERVICE")  # asserted alone: a failure must not print the whole environment
    assert token is None
    got = read_offline_run(info.dir)
    assert got["exit"] is not None and got["exit"].exit_code == 0

    assert got["run"].run_group == "sweep-7" and got["run"].project == "dejavu-test"
    assert got["run"].display_name == "point-a" and list(got["run"].tags) == ["ci", "tiny"]
    assert got["config"]["model"] == {"name": "tiny"} and got["config"]["rps"] == 2.0
    assert got["config"]["wandb_api_key"] == "<redacted>"
    assert got["summary"]["latency_s/p50"] == pytest.approx(summary["latency_s"]["p50"])
    assert got["summary"]["throughput/requests_per_s"] == pytest.approx(summary["throughput"]["requests_per_s"])
    assert got["summary"]["outputs_sha256"] == summary["outputs_sha256"]
    assert got["summary"]["counts/completed"] == 5
    # Media entries arrive as nested summary items (flattened here with '/').
    assert got["summary"]["requests/_type"] == "table-file" and got["summary"]["requests/nrows"] == 5
    for plot in ("latency_cdf", "throughput", "stage_timeline"):
        assert got["summary"][f"plots/{plot}/_type"] == "image-file"
    [table_file] = list((info.dir / "files" / "media" / "table").glob("requests_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:2] == ["id", "status"] and [row[0] for row in table["data"]] == [0, 1, 2, 3, 4]
    assert table["data"][4][table["columns"].index("text")] == "answer 4"
    ours = [a for a in got["artifacts"] if a.type == "dejavu-run"]
    assert len(ours) == 1 and ours[0].name == "run-point-a"
    files = {e.path for e in ours[0].manifest.contents}
    assert {"summary.json", "requests.jsonl", "config.yaml", "trace.json", "plots/latency_cdf.png"} <= files
    assert not any(p.startswith("wandb/") for p in files)

    # No key anywhere, neither in our files nor in wandb's (logs included).
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert FAKE_KEY.encode() not in f.read_bytes(), f


def test_disabled_and_online_without_key(run_dir, monkeypatch, tmp_path):
    from dejavu.results.wandb_log import log_run

    assert log_run(run_dir, mode="disabled") is None
    assert not (run_dir / "wandb").exists()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RuntimeError, match="W&B online logging needs an API key: export WANDB_API_KEY"):
        log_run(run_dir, mode="online")
    with pytest.raises(ValueError, match="logger mode must be one of offline, online, disabled; got 'cloud'"):
        log_run(run_dir, mode="cloud")
