"""The results folder: metrics against numpy, the outputs digest, busy/bubble fractions, trace, plots,
config dump without secrets, progress line."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import numpy as np
import pytest
import yaml
from PIL import Image

from dejavu.records import RequestRecord, StageEvent
from dejavu.results import Progress, load_records, outputs_sha256, summarize, write_results
from dejavu.results.metrics import WorkerStats, flatten, unflatten


def synthetic_records(n=50, seed=0) -> list[RequestRecord]:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        arrival = float(rng.uniform(0, 5))
        ttft = float(rng.uniform(0.05, 0.5))
        k = int(rng.integers(1, 20))
        tpot = float(rng.uniform(0.01, 0.05))
        recs.append(RequestRecord(id=i, prompt_ids=rng.integers(0, 100, int(rng.integers(1, 9))).tolist(),
                                  output_ids=rng.integers(0, 100, k).tolist(), arrival_s=arrival,
                                  first_token_s=arrival + ttft, finish_s=arrival + ttft + (k - 1) * tpot, status="ok"))
    recs[3].status, recs[3].finish_s, recs[3].error = "failed", None, "worker 1 died"
    recs[7].status, recs[7].finish_s = "unfinished", None
    recs[8].status, recs[8].first_token_s, recs[8].finish_s, recs[8].output_ids = "unfinished", None, None, []
    return recs


def test_latency_percentiles_match_numpy():
    recs = synthetic_records()
    s = summarize(reversed(recs))  # any order in, id order inside
    ok = [r for r in recs if r.status == "ok"]
    e2e = np.array([r.finish_s - r.arrival_s for r in ok])
    ttft = np.array([r.first_token_s - r.arrival_s for r in recs if r.first_token_s is not None])
    tpot = np.array([(r.finish_s - r.first_token_s) / (len(r.output_ids) - 1) for r in ok if len(r.output_ids) > 1])
    norm = np.array([(r.finish_s - r.arrival_s) / len(r.output_ids) for r in ok])
    for key, ref in [("latency_s", e2e), ("ttft_s", ttft), ("tpot_s", tpot), ("normalized_latency_s", norm)]:
        assert s[key]["count"] == len(ref)
        assert s[key]["mean"] == pytest.approx(ref.mean())
        for q in (50, 95, 99):
            assert s[key][f"p{q}"] == pytest.approx(np.percentile(ref, q)), (key, q)
    assert s["counts"] == {"total": 50, "completed": 47, "failed": 1, "unfinished": 2}
    makespan = max(r.finish_s for r in ok) - min(r.arrival_s for r in recs)
    assert s["makespan_s"] == pytest.approx(makespan)
    assert s["throughput"]["requests_per_s"] == pytest.approx(47 / makespan)
    tokens = sum(len(r.output_ids) for r in recs)
    assert s["throughput"]["output_tokens"] == tokens
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(tokens / makespan)


def test_empty_run_has_no_numbers_but_does_not_crash(tmp_path):
    s = write_results(tmp_path / "run", [], [], None, {})
    assert s["counts"]["total"] == 0 and s["latency_s"]["p50"] is None and s["throughput"]["requests_per_s"] is None
    assert (tmp_path / "run" / "plots" / "latency_cdf.png").exists()


def test_digest_is_canonical_stable_and_sensitive():
    recs = synthetic_records()
    d = outputs_sha256(recs)
    # The documented encoding, computed independently: per id, <q id, <q n, n x <q token.
    h = hashlib.sha256()
    for r in sorted(recs, key=lambda r: r.id):
        h.update(struct.pack("<q", r.id) + struct.pack("<q", len(r.output_ids)))
        for t in r.output_ids:
            h.update(struct.pack("<q", t))
    assert d == h.hexdigest()
    assert outputs_sha256(list(reversed(recs))) == d
    assert outputs_sha256({r.id: r.output_ids for r in recs}) == d
    assert outputs_sha256([r.to_dict() for r in recs]) == d
    # Timings and status do not count; every token does, and so do token boundaries between requests.
    recs2 = synthetic_records()
    recs2[0].finish_s += 1
    recs2[5].status = "failed"
    assert outputs_sha256(recs2) == d
    for i, j in [(0, 0), (10, -1), (49, 0)]:
        recs2 = synthetic_records()
        recs2[i].output_ids[j] += 1
        assert outputs_sha256(recs2) != d
    a = [RequestRecord(id=0, prompt_ids=[], output_ids=[1, 2]), RequestRecord(id=1, prompt_ids=[], output_ids=[3])]
    b = [RequestRecord(id=0, prompt_ids=[], output_ids=[1]), RequestRecord(id=1, prompt_ids=[], output_ids=[2, 3])]
    assert outputs_sha256(a) != outputs_sha256(b)


def _ev(worker, kind, a, b, stage="stage0", ub=0, tp=0):
    return StageEvent(worker=worker, stage=stage, kind=kind, start_s=a, end_s=b, ubatch=ub, tp_rank=tp)


def constructed_events():
    # Span [0, 10]. Worker 0: decode [0,2] -> busy 2 s; its send [1,3] and recv [5,6] are waits on
    # neighbours, bubbles. Worker 1: prefill [2,4], stream [4,5] (touching) and decode [9,10] -> busy 4 s, plus
    # a reported idle [5,9] that must not count as busy. Worker 2 (TP rank 1 of prompt0): 1 s.
    return [_ev(0, "decode", 0, 2), _ev(0, "send", 1, 3), _ev(0, "recv", 5, 6, ub=1),
            _ev(1, "prefill", 2, 4, "prompt0"), _ev(1, "stream", 4, 5, "prompt0"),
            _ev(1, "idle", 5, 9, "prompt0"), _ev(1, "decode", 9, 10, "prompt0", ub=2),
            _ev(2, "decode", 0, 1, "prompt0", tp=1)]


def test_busy_and_bubble_fractions_on_constructed_events():
    recs = [RequestRecord(id=0, prompt_ids=[1], output_ids=[1, 2], arrival_s=0.0, first_token_s=1.0,
                          finish_s=10.0, status="ok")]
    s = summarize(recs, constructed_events(), [WorkerStats(worker=3, stage="token0")])
    w = s["workers"]
    assert s["span_s"] == {"start": 0.0, "end": 10.0}
    assert w["0"]["busy_s"] == pytest.approx(2.0) and w["0"]["busy_fraction"] == pytest.approx(0.2)
    assert w["0"]["bubble_fraction"] == pytest.approx(0.8)
    assert w["0"]["seconds_by_kind"] == {"decode": 2.0, "recv": 1.0, "send": 2.0}
    assert w["1"]["busy_fraction"] == pytest.approx(0.4) and w["1"]["seconds_by_kind"]["idle"] == 4.0
    assert w["2"]["busy_fraction"] == pytest.approx(0.1) and w["2"]["tp_rank"] == 1
    assert w["3"]["busy_fraction"] == 0.0 and w["3"]["bubble_fraction"] == 1.0  # reported, never busy
    # The prompt stage's two TP ranks (workers 1 and 2) averaged.
    assert s["stages"]["prompt0"] == {"workers": [1, 2], "busy_fraction": pytest.approx(0.25),
                                      "bubble_fraction": pytest.approx(0.75)}
    assert s["bubble_fraction_mean"] == pytest.approx((0.8 + 0.6 + 0.9 + 1.0) / 4)
    # An explicit span clips the intervals: worker 0 is busy [0, 2] of [0, 5].
    clipped = summarize(recs, constructed_events(), span=(0.0, 5.0))["workers"]
    assert clipped["0"]["busy_fraction"] == pytest.approx(0.4) and clipped["1"]["busy_fraction"] == pytest.approx(0.6)


def test_results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wk-secret-1234567890abcdef")
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue99")
    recs = synthetic_records()
    stats = {0: {"stage": "stage0", "peak_memory_bytes": 1 << 30, "kv_bytes": {"replica": 4000},
                 "kv_seconds": {"replica": 0.002}},
             1: {"stage": "prompt0", "peak_memory_bytes": 2 << 30, "kv_bytes": {"replica": 1000, "prompt->token": 8000},
                 "kv_seconds": {"replica": 0.002, "prompt->token": 0.004}}}
    config = {"model": {"name": "tiny"}, "workload": {"num_requests": 50, "output_len": "${model.len}"},
              "logger": {"api_key": "literal-key-in-config", "project": "dejavu"},
              "cmd": "run --token wk-secret-1234567890abcdef", "stop_token_ids": [2], "num_token_peers": 2}
    config["model"]["len"] = 16
    run = tmp_path / "run"
    s = write_results(run, recs, constructed_events(), stats, config,
                      extra={"failures": {"detection_s": 0.5, "recovery_s": 1.5, "tokens_recomputed": 12}})

    assert json.loads((run / "summary.json").read_text()) == s
    assert s["failures"]["tokens_recomputed"] == 12
    assert s["peak_memory_bytes"] == {"0": 1 << 30, "1": 2 << 30}
    assert s["kv_streams"]["replica"]["bytes"] == 5000 and s["kv_streams"]["replica"]["seconds"] == pytest.approx(0.004)
    assert s["kv_streams"]["prompt->token"]["gb_per_s"] == pytest.approx(8000 / 0.004 / 1e9)
    assert s["workers"]["1"]["kv"]["prompt->token"] == {"bytes": 8000, "seconds": 0.004}

    lines = (run / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 50
    first = json.loads(lines[3])
    assert {"id", "prompt_ids", "output_ids", "arrival_s", "first_token_s", "finish_s", "status", "error",
            "text"} <= set(first)
    assert first["status"] == "failed" and first["error"] == "worker 1 died"
    assert load_records(run) == sorted(recs, key=lambda r: r.id)
    assert outputs_sha256(load_records(run)) == s["outputs_sha256"]

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["workload"]["output_len"] == 16  # resolved
    assert cfg["logger"]["api_key"] == "<redacted>"
    assert cfg["stop_token_ids"] == [2] and cfg["num_token_peers"] == 2  # token-ish keys are not secrets
    everything = "".join(p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file())
    for secret in ("wk-secret-1234567890abcdef", "hf_supersecretvalue99", "literal-key-in-config"):
        assert secret not in everything

    for name in ("latency_cdf", "throughput", "stage_timeline"):
        with Image.open(run / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 100

    with pytest.raises(ValueError, match="extra summary key 'counts' collides"):
        write_results(tmp_path / "run2", recs, [], None, {}, extra={"counts": 1})


def test_chrome_trace_shows_bubbles(tmp_path):
    recs = [RequestRecord(id=0, prompt_ids=[1], output_ids=[1], arrival_s=0.0, first_token_s=1.0, finish_s=10.0,
                          status="ok")]
    write_results(tmp_path, recs, constructed_events(), None, {}, plots=False)
    trace = json.loads((tmp_path / "trace.json").read_text())
    evs = trace["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {(0, "worker 0: stage0 tp0"), (1, "worker 1: prompt0 tp0"), (2, "worker 2: prompt0 tp1")}
    x = [e for e in evs if e["ph"] == "X"]
    idle0 = sorted((e["ts"], e["dur"]) for e in x if e["pid"] == 0 and e["cat"] == "bubble")
    assert idle0 == [(2e6, 8e6)]  # [2,10]: the send and recv waits on the transfer row are bubbles
    idle1 = sorted((e["ts"], e["dur"]) for e in x if e["pid"] == 1 and e["cat"] == "bubble")
    assert idle1 == [(0.0, 2e6), (5e6, 4e6)]
    send = next(e for e in x if e["pid"] == 0 and e["name"] == "send")
    decode = next(e for e in x if e["pid"] == 0 and e["name"] == "decode")
    assert send["tid"] != decode["tid"]  # overlapping intervals on separate rows
    recv = next(e for e in x if e["pid"] == 0 and e["name"] == "recv")
    assert recv["args"]["ubatch"] == 1 and recv["ts"] == 5e6 and recv["dur"] == 1e6
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads[(0, decode["tid"])] == "compute" and threads[(0, send["tid"])] == "transfer"
    # Per thread, complete events never partially overlap (Chrome's nesting rule).
    for key in {(e["pid"], e["tid"]) for e in x}:
        row = sorted((e["ts"], e["ts"] + e["dur"]) for e in x if (e["pid"], e["tid"]) == key)
        assert all(b[0] >= a[1] - 1e-6 for a, b in zip(row, row[1:])), key


def test_flatten_round_trip():
    s = summarize(synthetic_records(), constructed_events())
    flat = flatten(s)
    assert flat["latency_s/p99"] == s["latency_s"]["p99"] and flat["workers/1/seconds_by_kind/idle"] == 4.0
    back = unflatten(flat)
    assert back["latency_s"] == s["latency_s"] and back["outputs_sha256"] == s["outputs_sha256"]


def test_progress_line_is_rate_limited_and_tty_only():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731

    out = io.StringIO()
    p = Progress(10, stream=out, force=True, max_hz=4, clock=clock)
    for i in range(100):  # 100 tokens within 0.99 s -> at most 4 redraws (one per 0.25 s)
        now[0] = i * 0.01
        p.token()
    assert 1 <= out.getvalue().count("\r") <= 4
    now[0] = 2.0
    p.request_done(3)
    p.request_done(failed=True)
    p.close()
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("[dejavu] 4/10 requests (1 failed) | 100 tokens | 50.0 tok/s | 00:02 elapsed")
    assert out.getvalue().endswith("\n")

    quiet = io.StringIO()  # not a TTY and not forced: nothing at all
    with Progress(5, stream=quiet, clock=clock) as q:
        q.token(5)
        q.request_done(5)
    assert quiet.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    Progress(5, stream=tty, clock=clock).token()
    assert "0/5 requests" in tty.getvalue()
