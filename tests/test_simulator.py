"""The simulator (dejavu simulate): closed-form cases exactly, prompt-induced bubbles (none with enough prompt
machines; growing with prompt length in the baseline), failures, swapping, the Chrome trace in the runs'
format, the sweep and the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dejavu.simulator.cli import main as simulate_main
from dejavu.simulator.cli import write_chrome_trace
from dejavu.simulator.costs import ConstantCosts, ProfileCosts
from dejavu.simulator.engine import FailureModel, SimRequest, SimSetup, SwapModel, simulate
from dejavu.simulator.sweep import Split, all_splits, plot_sweep, run_sweep


def spaced(n: int, gap: float, prompt: int = 16, new: int = 10) -> list[SimRequest]:
    return [SimRequest(i, i * gap, prompt, new) for i in range(n)]


def saturated(n: int = 64, prompt: int = 16, new: int = 10) -> list[SimRequest]:
    return [SimRequest(i, 0.0, prompt, new) for i in range(n)]


# ---- closed forms -------------------------------------------------------------------------------------

@pytest.mark.parametrize("hop,fb", [(0.0, 0.0), (0.003, 0.002)])
def test_baseline_closed_form(hop, fb):
    """One request at a time (arrivals slower than service): nothing queues, every number is a sum."""
    D, p, t, N, A, n = 3, 0.5, 0.1, 10, 100.0, 5
    r = simulate(spaced(n, A, new=N), SimSetup(0, D, 1, ConstantCosts(p, t, hop_s=hop, feedback_s=fb)))
    ttft = D * p + (D - 1) * hop
    latency = ttft + (N - 1) * (fb + D * t + (D - 1) * hop)
    s = r.summary
    assert s["ttft_s"]["p50"] == pytest.approx(ttft, abs=1e-12)
    assert s["latency_s"]["p50"] == pytest.approx(latency, abs=1e-12)
    assert s["latency_s"]["p99"] == pytest.approx(latency, abs=1e-12)
    assert s["tpot_s"]["p50"] == pytest.approx((latency - ttft) / (N - 1), abs=1e-12)
    assert s["throughput"]["requests_per_s"] == pytest.approx(n / ((n - 1) * A + latency), rel=1e-12)
    assert s["normalized_latency_s"]["p50"] == pytest.approx(latency / N, abs=1e-12)


@pytest.mark.parametrize("hop,fb", [(0.0, 0.0), (0.003, 0.002)])
def test_disaggregated_closed_form(hop, fb):
    M, K, p, t, c, N, A, n = 2, 3, 0.5, 0.1, 0.05, 10, 100.0, 4
    r = simulate(spaced(n, A, new=N), SimSetup(M, K, 1, ConstantCosts(p, t, c, hop_s=hop, feedback_s=fb)))
    ttft = M * p + (M - 1) * hop
    # hand-over notice, then each token stage receives its layers and runs the first step, then N-2 steps
    latency = ttft + fb + K * (c + t) + (K - 1) * hop + (N - 2) * (fb + K * t + (K - 1) * hop)
    s = r.summary
    assert s["ttft_s"]["p50"] == pytest.approx(ttft, abs=1e-12)
    assert s["latency_s"]["p50"] == pytest.approx(latency, abs=1e-12)
    assert s["throughput"]["requests_per_s"] == pytest.approx(n / ((n - 1) * A + latency), rel=1e-12)


def test_saturated_token_pipeline_runs_at_its_formula_rate():
    """A closed batch through a disaggregated pipeline with a fast prompt side: once full, the token
    pipeline finishes a microbatch every N-1 steps of t per stage... exactly K microbatches per (N-1)·K·t."""
    K, t, N = 4, 0.01, 21
    r = simulate(saturated(400, new=N), SimSetup(1, K, 1, ConstantCosts(1e-4, t)))
    # each microbatch: admit + N-2 steps = N-1 passes of K·t through the pipeline, K microbatches at once
    rate = K / ((N - 1) * K * t)
    assert r.summary["throughput"]["requests_per_s"] == pytest.approx(rate, rel=0.02)


# ---- bubbles ------------------------------------------------------------------------------------------

def test_enough_prompt_machines_leave_no_prompt_induced_bubbles():
    # Token side: 4 stages x 0.1 s, 9 steps a microbatch -> needs a microbatch every 0.9 s; the prompt side
    # delivers one every 0.5 s (one machine) or 0.25 s (two, each running up to kv_window hand-overs ahead:
    # the four microbatches of a closed batch of equal requests finish together and come back at once).
    for m, window in ((1, 2), (2, 4)):
        r = simulate(saturated(), SimSetup(m, 4, 2, ConstantCosts(0.5 / m, 0.1, 0.01), kv_window=window))
        pb = r.summary["prompt_bubbles"]
        assert pb["seconds"] == 0.0 and pb["window_s"][1] > pb["window_s"][0] + 20
    # a prompt side too slow for the token side starves it: bubbles appear
    r = simulate(saturated(), SimSetup(1, 4, 2, ConstantCosts(2.0, 0.1, 0.01)))
    assert r.summary["prompt_bubbles"]["fraction"] > 0.2


def test_baseline_bubbles_grow_with_prompt_length():
    class PerTokenPrefill(ConstantCosts):
        def prefill(self, pipeline, stage, b, prompt_len):
            return 0.002 * prompt_len

    fractions = []
    for plen in (16, 64, 256, 1024):
        r = simulate(saturated(prompt=plen), SimSetup(0, 4, 2, PerTokenPrefill(0.0, 0.05)))
        fractions.append(r.summary["prompt_bubbles"]["fraction"])
    assert all(a < b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[0] < 0.05 and fractions[-1] > 0.3


# ---- failures and swapping ----------------------------------------------------------------------------

def test_failures_recompute_without_replication_and_resume_with_it():
    f = FailureModel(times=(5.0, 20.0), detect_s=1.0, restart_s=2.0)
    plain = simulate(saturated(), SimSetup(0, 4, 2, ConstantCosts(0.5, 0.1), failures=f))
    ft = simulate(saturated(), SimSetup(0, 4, 2, ConstantCosts(0.5, 0.1), failures=dataclasses.replace(f, replication=True)))
    for r in (plain, ft):
        assert r.summary["failures"]["count"] == 2 and r.summary["failures"]["lost_s"] == pytest.approx(6.0)
        assert r.summary["counts"]["completed"] == 64
        assert any(i.kind == "failure" for i in r.intervals)
    assert plain.summary["failures"]["tokens_recomputed"] > 0
    assert ft.summary["failures"]["tokens_recomputed"] == 0


def test_poisson_failures_cost_time():
    f = FailureModel(per_machine_hour=3600.0 / 40, detect_s=0.5, restart_s=1.0, seed=1)  # ~ every 10 s for 4
    r = simulate(saturated(), SimSetup(0, 4, 2, ConstantCosts(0.5, 0.1), failures=f))
    clean = simulate(saturated(), SimSetup(0, 4, 2, ConstantCosts(0.5, 0.1)))
    assert r.summary["failures"]["count"] >= 1 and r.summary["makespan_s"] > clean.summary["makespan_s"]


def test_swapping_stalls_only_when_the_transfer_outlasts_the_step():
    costs = ConstantCosts(0.1, 0.01, kv_bytes_per_stage=1e6)
    slow = simulate(saturated(), SimSetup(0, 4, 2, costs, swap=SwapModel(1e7)))  # 0.1 s a swap > 0.01 s step
    fast = simulate(saturated(), SimSetup(0, 4, 2, costs, swap=SwapModel(1e12)))
    none = simulate(saturated(), SimSetup(0, 4, 2, costs))
    assert slow.summary["swapping"]["stall_s"] > 0 and fast.summary["swapping"]["stall_s"] == 0
    assert fast.summary["makespan_s"] == pytest.approx(none.summary["makespan_s"])
    assert slow.summary["makespan_s"] > none.summary["makespan_s"]


# ---- outputs ------------------------------------------------------------------------------------------

def test_chrome_trace_has_the_runs_format(tmp_path):
    r = simulate(spaced(4, 0.3), SimSetup(1, 2, 2, ConstantCosts(0.2, 0.05, 0.01, hop_s=0.001)))
    path = write_chrome_trace(r, tmp_path / "trace.json", {"simulated": True})
    t = json.loads(path.read_text())
    names = {e["args"]["name"] for e in t["traceEvents"] if e.get("name") == "process_name"}
    assert names == {"worker 0: prompt0 tp0", "worker 1: token0 tp0", "worker 2: token1 tp0"}
    kinds = {e["name"] for e in t["traceEvents"] if e["ph"] == "X"}
    assert {"prefill", "decode", "stream", "idle"} <= kinds
    assert t["otherData"]["simulated"] is True


def test_profile_costs_price_each_stage_for_its_layers():
    from test_planner import profile_dict

    from dejavu.planner.profile import profile_from_dict

    prof = profile_from_dict(profile_dict(num_layers=5, sizes={**profile_dict()["sizes"], "num_layers": 5}))
    c = ProfileCosts(prof, 0, 2)  # 3 + 2 layers
    assert c.prefill("token", 0, 1, 100) == pytest.approx(0.5 + 3 * 1.0 + 0.1)
    assert c.prefill("token", 1, 1, 100) == pytest.approx(0.5 + 2 * 1.0 + 0.2)
    assert c.kv_bytes(1, 2, 10) == 2 * 2 * 10 * 8


def test_sweep_covers_every_split_and_plots(tmp_path):
    splits = all_splits(4, 32)
    assert splits == [Split(0, 4), Split(1, 3), Split(2, 2), Split(3, 1)]
    pts = run_sweep(splits, [1.0, 4.0], lambda rate: [SimRequest(i, i / rate, 16, 8) for i in range(24)],
                    lambda sp: ConstantCosts(0.2, 0.02, 0.005), 2)
    assert len(pts) == 8 and all(p.requests_per_s for p in pts)
    png = plot_sweep(pts, tmp_path / "sweep.png", pick=Split(1, 3), title="t", price_per_hour=None)
    assert png.stat().st_size > 10_000


def test_simulate_cli(tmp_path, capsys):
    trace = tmp_path / "sim.json"
    code = simulate_main(["--times", "0.4,0.02", "--model", "opt-1.3b", "--machines", "4", "--ubatch-size", "4",
                          "--input-len", "256", "--output-len", "32", "--num-requests", "40", "--rps", "4",
                          "--split", "baseline,auto,2+2", "--chrome-trace", str(trace), "--json", str(tmp_path / "o.json")])
    out = capsys.readouterr().out
    assert code == 0 and "baseline 4" in out and "disagg 2+2" in out and "planner's pick" in out
    assert (tmp_path / "sim-baseline-4.json").is_file()
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["plan"]["prompt_machines"] >= 1 and "baseline 4" in res["results"]
    code = simulate_main(["--times", "0.4,0.02", "--model", "opt-1.3b", "--machines", "3", "--sweep",
                          "--num-requests", "20", "--rates", "1,2", "--plot", str(tmp_path / "s.png")])
    assert code == 0 and (tmp_path / "s.png").is_file()
    code = simulate_main(["--times", "0.4,0.02", "--model", "opt-1.3b", "--machines", "4", "--failure-rate", "30",
                          "--num-requests", "20"])
    assert code == 0 and "tokens recomputed" in capsys.readouterr().out


@pytest.mark.parametrize("args,needle", [
    (["--machines", "4"], "exactly one of --profile"),
    (["--times", "0.1,0.01", "--machines", "4"], "--model"),
    (["--times", "0.1,0.01", "--model", "opt-1.3b", "--machines", "4", "--split", "3+3"], "--split"),
    (["--times", "0.1,0.01", "--model", "opt-1.3b", "--machines", "4", "--workload", "trace"], "--trace"),
    (["--profile", "/nonexistent.json", "--machines", "4"], "--profile"),
])
def test_simulate_cli_refuses_bad_inputs(capsys, args, needle):
    assert simulate_main(args) == 2
    assert needle in capsys.readouterr().err
