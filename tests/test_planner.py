"""The planner (dejavu plan) against hand-worked cases of the paper's formula and memory floors; the profile
file (load, checks, interpolation) and the profiler on a tiny shape; the synthetic trace generator."""

from __future__ import annotations

import json
import math

import pytest

from dejavu.planner.cli import plan_main, profile_main
from dejavu.planner.plan import PlanError, PlanInputs, largest_ubatch, plan_split, stage_needs
from dejavu.planner.profile import Profile, ProfileError, StageTiming, load_profile, profile_from_dict
from dejavu.planner.sizes import ModelSizes, model_sizes
from dejavu.planner import tracegen

GB = 1e9
# 8 layers of 10 GB, 1 MB of KV cache per token per layer: floors are easy to work out by hand.
SIZES = ModelSizes(num_layers=8, layer_bytes=int(10 * GB), embed_bytes=0, head_bytes=0,
                   kv_bytes_per_token_layer=int(1e6), dtype="float16")


def inputs(**kw) -> PlanInputs:
    base = dict(machines=8, sizes=SIZES, input_len=100, new_tokens=100, ubatch_size=1, prompt_time_s=0.5,
                token_time_s=0.01)
    return PlanInputs(**{**base, **kw})


def test_balance_decides_when_memory_is_not_given():
    # D_t = ceil(8 * 100 * 0.01 / (0.5 + 100 * 0.01)) = ceil(5.333) = 6
    p = plan_split(inputs())
    assert (p.prompt_machines, p.token_machines, p.decided_by) == (2, 6, "balance")
    assert p.balance_exact == pytest.approx(8 / 1.5)
    # predicted: prompt side 2 / 0.5 = 4 microbatches/s, token side 6 / (100 * 0.01) = 6: prompt bound
    assert p.requests_per_s == pytest.approx(4.0) and p.bottleneck == "prompt side"
    assert p.baseline_requests_per_s == pytest.approx(8 / 1.5)
    assert any("ceil(5.333)" in line for line in p.reasoning)


def test_stream_overhead_moves_machines_to_the_prompt_side():
    # m = 2: D_t = ceil(8 * 1 / (2 * 0.5 + 1)) = 4
    p = plan_split(inputs(stream_overhead=2.0))
    assert (p.prompt_machines, p.token_machines) == (4, 4)


def test_each_side_keeps_one_machine():
    # Y tiny: the formula asks for all 8 token machines; one stays on prompts
    p = plan_split(inputs(prompt_time_s=1e-6))
    assert (p.prompt_machines, p.token_machines) == (1, 7)


def test_token_memory_floor_decides():
    # Balance: D=6, ceil(6 * 100 * 0.001 / (10 + 0.1)) = ceil(0.059) = 1 token machine.
    # Token floor at 50 GB: with n stages, ceil(8/n) layers of 10 GB + n microbatches x 200 positions x 1 MB;
    # n=1: 8 x 10.2 GB > 50; n=2: 4 x (10 + 0.4) = 41.6 GB fits -> 2.
    p = plan_split(inputs(machines=6, prompt_time_s=10.0, token_time_s=0.001, memory_per_machine=50 * GB))
    assert p.balance_token_machines == 1
    assert p.token_floor.machines == 2 and p.prompt_floor.machines == 2
    assert (p.prompt_machines, p.token_machines, p.decided_by) == (4, 2, "token memory floor")
    assert max(p.token_floor.need_bytes) == pytest.approx(4 * (10 * GB + 2 * 200 * 1e6))


def test_prompt_memory_floor_decides():
    # Balance: ceil(6 * 1 / (0.01 + 1)) = 6 -> at most 5 token machines, 1 prompt machine; the prompt floor
    # at 50 GB is 2 (one machine: 8 x (10 GB + 100 x 1 MB) = 80.8 GB > 50).
    p = plan_split(inputs(machines=6, prompt_time_s=0.01, token_time_s=0.01, memory_per_machine=50 * GB))
    assert p.prompt_floor.machines == 2
    assert (p.prompt_machines, p.token_machines, p.decided_by) == (2, 4, "prompt memory floor")


def test_swapping_lowers_the_token_floor():
    # 21 GB machines. Prompt floor: 2 layers x (10 GB + 100 x 1 MB) = 20.2 GB -> 4 machines. Token side
    # without swapping, n stages hold n microbatches of 200 positions: n=4: 2 x (10 + 0.8) = 21.6 > 21, ...,
    # n=8: 1 x (10 + 1.6) = 11.6 -> 8; with swapping (2 resident) n=4: 2 x (10 + 0.4) = 20.8 -> 4.
    kw = dict(machines=12, prompt_time_s=10.0, token_time_s=0.001, memory_per_machine=21 * GB)
    assert plan_split(inputs(**kw)).token_floor.machines == 8
    p = plan_split(inputs(swapping=True, **kw))
    assert p.token_floor.machines == 4 and p.token_floor.resident_ubatches == 2
    with pytest.raises(PlanError):  # 4 + 8 > 10 machines without swapping; 4 + 4 fit with it
        plan_split(inputs(**{**kw, "machines": 10}))
    assert plan_split(inputs(swapping=True, **{**kw, "machines": 10})).token_machines >= 4


def test_infeasible_split_names_the_limit_and_by_how_much():
    with pytest.raises(PlanError) as e:
        plan_split(inputs(machines=3, memory_per_machine=50 * GB))  # floors 2 + 2 = 4 > 3
    assert e.value.key == "--machines"
    msg = str(e.value)
    assert "--machines=3: no feasible split" in msg and "at least 2" in msg and "1 more than --machines" in msg


def test_memory_too_small_for_one_layer():
    with pytest.raises(PlanError) as e:
        plan_split(inputs(memory_per_machine=5 * GB))
    assert e.value.key == "--memory-gb"
    assert "cannot hold its smallest stage" in str(e.value) and "more than a machine has" in str(e.value)


def test_one_machine_is_the_baseline():
    p = plan_split(inputs(machines=1))
    assert (p.prompt_machines, p.token_machines, p.decided_by) == (0, 1, "one machine")
    assert p.requests_per_s == pytest.approx(1 / (0.5 + 100 * 0.01))


@pytest.mark.parametrize("field,value,key", [("machines", 0, "--machines"), ("ubatch_size", 0, "--ubatch-size"),
                                             ("prompt_time_s", 0.0, "--prompt-time"), ("token_time_s", -1.0, "--token-time"),
                                             ("stream_overhead", 0.5, "--stream-overhead"),
                                             ("memory_per_machine", 0.0, "--memory-gb")])
def test_bad_inputs_are_refused_by_key(field, value, key):
    with pytest.raises(PlanError) as e:
        plan_split(inputs(**{field: value}))
    assert e.value.key == key and key in str(e.value)


def test_stage_needs_follow_the_workers_layer_split():
    s = ModelSizes(num_layers=5, layer_bytes=10, embed_bytes=3, head_bytes=7, kv_bytes_per_token_layer=1, dtype="x")
    # 5 layers in 2 stages: 3 + 2 (earlier stages take the remainder); embeddings first, head last
    assert stage_needs(s, 2, 4) == [3 * 14 + 3, 2 * 14 + 7]
    # 4 token stages of 2 layers at 30 GB: 2 x (10 + 4 b x 0.2) <= 30 -> b = 6; swapping 2 x (10 + 2 b x 0.2) -> 12
    assert largest_ubatch(SIZES, 4, 30 * GB, input_len=100, new_tokens=100, swapping=False) == 6
    assert largest_ubatch(SIZES, 4, 30 * GB, input_len=100, new_tokens=100, swapping=True) == 12


def test_model_sizes_from_shapes():
    from dejavu.model.registry import resolve_model

    s = model_sizes(resolve_model("opt-1.3b", weights=False).config, "fp16")
    # an OPT-1.3B decoder layer: 4 h^2 + 2 h f weights + biases and 2 layer norms, 2 bytes each
    h, f = 2048, 8192
    assert s.layer_bytes == 2 * (4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h)
    assert s.kv_bytes_per_token_layer == 2 * 2048 * 2 and s.num_layers == 24


# ---- the command line ---------------------------------------------------------------------------------

def test_plan_cli_prints_the_reasoning(capsys):
    code = plan_main(["--machines", "4", "--model", "opt-1.3b", "--input-len", "512", "--new-tokens", "64",
                      "--ubatch-size", "8", "--prompt-time", "0.2", "--token-time", "0.01", "--memory-gb", "80"])
    out = capsys.readouterr().out
    # ceil(4 * 64 * 0.01 / (0.2 + 0.64)) = ceil(3.05) = 4 -> 3 (one prompt machine)
    assert code == 0 and "decided by: balance -> 1 prompt + 3 token machine(s)" in out
    assert "memory floor, prompt side: >= 1" in out and "num_prompt_peers=1 num_token_peers=3" in out


@pytest.mark.parametrize("args,key", [
    (["--model", "no-such-model"], "--model"),
    (["--machines", "0"], "--machines"),
    (["--memory-gb", "0.001"], "--memory-gb"),
])
def test_plan_cli_refuses_bad_inputs(capsys, args, key):
    base = {"--machines": "4", "--model": "opt-1.3b", "--input-len": "128", "--new-tokens": "32",
            "--ubatch-size": "4", "--prompt-time": "0.1", "--token-time": "0.01"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    code = plan_main([x for kv in base.items() for x in kv])
    err = capsys.readouterr().err
    assert code == 2 and key in err


def test_plan_cli_refuses_a_malformed_profile(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "dejavu-profile/1", "model": "opt-1.3b"')
    code = plan_main(["--machines", "4", "--model", "opt-1.3b", "--input-len", "128", "--new-tokens", "32",
                      "--ubatch-size", "4", "--profile", str(bad)])
    assert code == 2 and "--profile" in capsys.readouterr().err


# ---- profiles -----------------------------------------------------------------------------------------

def profile_dict(**over) -> dict:
    d = {"format": "dejavu-profile/1", "model": "m", "family": "llama", "num_layers": 4, "hidden_size": 64,
         "device": "cpu", "device_name": "cpu", "dtype": "fp32",
         "sizes": {"num_layers": 4, "layer_bytes": 100, "embed_bytes": 10, "head_bytes": 10,
                   "kv_bytes_per_token_layer": 8, "dtype": "float32"},
         "prompt": [{"ubatch_size": 1, "length": 100, "per_layer_s": 1.0, "fixed_s": 0.5, "embed_s": 0.1, "head_s": 0.2},
                    {"ubatch_size": 1, "length": 200, "per_layer_s": 2.0, "fixed_s": 0.5, "embed_s": 0.1, "head_s": 0.2},
                    {"ubatch_size": 3, "length": 100, "per_layer_s": 3.0, "fixed_s": 0.5},
                    {"ubatch_size": 3, "length": 200, "per_layer_s": 6.0, "fixed_s": 0.5}],
         "token": [{"ubatch_size": 1, "length": 100, "per_layer_s": 0.01}]}
    d.update(over)
    return d


def test_profile_interpolates_and_prices_stages(tmp_path):
    prof = profile_from_dict(profile_dict())
    assert prof.prompt_at(1, 150).per_layer_s == pytest.approx(1.5)
    assert prof.prompt_at(2, 100).per_layer_s == pytest.approx(2.0)  # halfway between b=1 and b=3
    assert prof.prompt_at(1, 300).per_layer_s == pytest.approx(3.0)  # extrapolated linearly
    # whole model: fixed + 4 layers + embed + head
    assert prof.prompt_time(1, 100) == pytest.approx(0.5 + 4 * 1.0 + 0.1 + 0.2)
    assert prof.prompt_at(1, 100).stage_s(2, first=False, last=True) == pytest.approx(0.5 + 2.0 + 0.2)
    assert prof.outside_grid(1, 300, 100) and not prof.outside_grid(1, 150, 100)
    path = prof.save(tmp_path / "p.json")
    assert load_profile(path).to_dict()["prompt"] == prof.to_dict()["prompt"]


@pytest.mark.parametrize("over,needle", [
    ({"format": "x"}, "format"),
    ({"prompt": []}, "prompt must be a non-empty list"),
    ({"token": [{"ubatch_size": 0, "length": 1, "per_layer_s": 0.1}]}, "token[0].ubatch_size"),
    ({"token": [{"ubatch_size": 1, "length": 1, "per_layer_s": "fast"}]}, "token[0].per_layer_s"),
    ({"sizes": {"num_layers": 4}}, "sizes.layer_bytes"),
    ({"num_layers": 5}, "num_layers"),
])
def test_malformed_profiles_are_refused_naming_the_key(tmp_path, over, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_dict(**over)))
    with pytest.raises(ProfileError) as e:
        load_profile(path, "planner.profile")
    assert needle in str(e.value) and "planner.profile" in str(e.value)


def test_profiler_on_a_tiny_shape(tmp_path, capsys):
    from dejavu.model.registry import model_entry  # noqa: F401  (the registry resolves folders too)
    from tiny_models import llama

    ckpt = llama(tmp_path / "tiny", layers=6)
    out = tmp_path / "prof.json"
    code = profile_main(["--model", str(ckpt), "--device", "cpu", "--threads", "1", "--ubatch-size", "1,2",
                         "--input-len", "8", "--context-len", "8,16", "--reps", "1", "--out", str(out)])
    assert code == 0
    prof = load_profile(out)
    assert prof.num_layers == 6 and not prof.extrapolated and prof.measured_layers == [1, 4, 6]
    assert len(prof.prompt) == 2 and len(prof.token) == 4
    assert all(p.full_model_s is not None and p.per_layer_s >= 0 for p in prof.prompt + prof.token)
    assert (tmp_path / "prof.png").is_file()
    assert "prompt Y" in capsys.readouterr().out


def test_shipped_gpu_profiles_load_and_plan():
    from dejavu.planner.profile import shipped_profiles

    names = {p.name[:-len(".json")] for p in shipped_profiles()}
    assert {"opt-1.3b-h100", "llama-1b-h100", "opt-66b-h100"} <= names
    for name in sorted(names):
        prof: Profile = load_profile(name)  # by the shipped name, as `dejavu plan --profile NAME` takes it
        assert prof.device == "cuda" and prof.prompt_time(1, 128) > prof.token_time(1, 128)
        model = name.rsplit("-", 1)[0]
        assert plan_main(["--machines", "4", "--memory-gb", "80", "--model", model, "--input-len", "512",
                          "--new-tokens", "64", "--ubatch-size", "4", "--profile", name]) in (0, None)


# ---- synthetic traces ---------------------------------------------------------------------------------

def test_synthetic_trace_is_the_seeds_format_and_labelled(tmp_path, capsys):
    from dejavu.workload import load_trace

    out = tmp_path / "t.json"
    assert tracegen.main(["--num-requests", "50", "--max-positions", "256", "--seed", "3", "--out", str(out)]) == 0
    sizes = load_trace(out)
    assert len(sizes) == 50 and all(p + n <= 256 and p >= 1 and n >= 1 for p, n in sizes)
    meta = json.loads((tmp_path / "t.meta.json").read_text())
    assert meta["synthetic"] is True and meta["prompt"]["name"] == "lognormal" and meta["seed"] == 3
    assert "SYNTHETIC" in capsys.readouterr().out
    again = tmp_path / "u.json"
    tracegen.main(["--num-requests", "50", "--max-positions", "256", "--seed", "3", "--out", str(again)])
    assert again.read_text() == out.read_text()


def test_synthetic_trace_distributions():
    d = tracegen.Dist.parse("uniform:low=4,high=6")
    sizes = tracegen.generate(200, d, tracegen.Dist.parse("fixed:n=7"), seed=0)
    assert {p for p, _ in sizes} == {4, 5, 6} and {n for _, n in sizes} == {7}
    med = sorted(p for p, _ in tracegen.generate(2001, tracegen.Dist.parse("lognormal:median=64,sigma=0.5"),
                                                 d, seed=1, max_prompt=10**6))[1000]
    assert math.isclose(med, 64, rel_tol=0.1)
    for bad in ("normal:mean=3", "uniform:low=5", "lognormal:median=-1,sigma=1", "fixed:n=x"):
        with pytest.raises(ValueError):
            tracegen.Dist.parse(bad)
