"""The workload builder: sizes, arrivals, prompt sources, sampling fields, and errors that name the key/file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dejavu.workload import WorkloadError, WorkloadSpec, build_workload, group_into_microbatches, load_trace


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_fixed_sizes_random_ids_avoid_special_ids_and_are_seeded():
    spec = WorkloadSpec(num_requests=6, input_len=40, output_len=7, prompt_seed=3)
    reqs = build_workload(spec, vocab_size=12, special_ids=[0, 1, 2])
    assert [r.id for r in reqs] == list(range(6))
    assert all(len(r.prompt_ids) == 40 and r.max_new_tokens == 7 and r.arrival_s == 0.0 for r in reqs)
    ids = np.array([r.prompt_ids for r in reqs])
    assert ids.min() >= 3 and ids.max() <= 11
    assert set(np.unique(ids)) == set(range(3, 12))  # 240 draws cover all 9 allowed ids
    assert len({tuple(r.prompt_ids) for r in reqs}) == 6  # different prompts per request
    again = build_workload(spec, vocab_size=12, special_ids=[0, 1, 2])
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in reqs]
    other = build_workload(WorkloadSpec(num_requests=6, input_len=40, output_len=7, prompt_seed=4),
                           vocab_size=12, special_ids=[0, 1, 2])
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in reqs]


def test_sampling_fields_and_per_request_seed():
    spec = WorkloadSpec(num_requests=3, input_len=2, output_len=5, temperature=0.7, top_k=20, top_p=0.9,
                        seed=100, min_new_tokens=9, stop_token_ids=[2])
    reqs = build_workload(spec, vocab_size=50)
    assert [r.seed for r in reqs] == [100, 101, 102]
    p = reqs[1].sampling()
    assert (p.temperature, p.top_k, p.top_p, p.stop_token_ids, p.max_new_tokens) == (0.7, 20, 0.9, (2,), 5)
    assert p.min_new_tokens == 5  # capped at the request's own length


def test_trace_sizes_first_n_or_all(tmp_path):
    trace = [[5, 3], [9, 1], [2, 8], [7, 7]]
    f = _write(tmp_path / "sizes.json", trace)
    reqs = build_workload(WorkloadSpec(kind="trace", num_requests=3, input_sizes_file=f), vocab_size=32)
    assert [(len(r.prompt_ids), r.max_new_tokens) for r in reqs] == [tuple(t) for t in trace[:3]]
    reqs = build_workload(WorkloadSpec(kind="trace", num_requests=None, input_sizes_file=f), vocab_size=32)
    assert [(len(r.prompt_ids), r.max_new_tokens) for r in reqs] == [tuple(t) for t in trace]
    assert all(r.arrival_s == 0 for r in reqs)


def test_poisson_arrivals_rate_and_seed(tmp_path):
    spec = WorkloadSpec(kind="poisson", num_requests=4000, input_len=1, output_len=1, rps=8.0, arrival_seed=5)
    t = np.array([r.arrival_s for r in build_workload(spec, vocab_size=4)])
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 1 / 8) < 0.01  # mean gap 1/rps (4000 samples: sd of the mean ~0.002)
    assert abs(gaps.std() - 1 / 8) < 0.015  # exponential: sd equals the mean
    same = [r.arrival_s for r in build_workload(spec, vocab_size=4)]
    assert same == t.tolist()
    spec.arrival_seed = 6
    assert [r.arrival_s for r in build_workload(spec, vocab_size=4)] != t.tolist()


def test_poisson_flag_on_trace_sizes(tmp_path):
    f = _write(tmp_path / "sizes.json", [[3, 2], [4, 5], [6, 1]])
    reqs = build_workload(WorkloadSpec(kind="trace", num_requests=None, input_sizes_file=f, poisson=True, rps=2),
                          vocab_size=10)
    assert [(len(r.prompt_ids), r.max_new_tokens) for r in reqs] == [(3, 2), (4, 5), (6, 1)]
    assert reqs[0].arrival_s == 0 and reqs[1].arrival_s > 0 and reqs[2].arrival_s >= reqs[1].arrival_s


def test_timestamps_file(tmp_path):
    f = _write(tmp_path / "ts.json", [0, 0.5, 0.5, 2.25, 9])
    reqs = build_workload(WorkloadSpec(kind="timestamps", num_requests=4, input_timestamps_file=f), vocab_size=10)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 0.5, 2.25]
    reqs = build_workload(WorkloadSpec(kind="timestamps", num_requests=None, input_timestamps_file=f), vocab_size=10)
    assert len(reqs) == 5


def test_text_prompts_with_a_real_tokenizer(tmp_path, smollm2_dir):
    from dejavu.model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    prompts = ["What is the capital of France?", "Name three colours."]
    f = _write(tmp_path / "prompts.txt", "\n".join([prompts[0], "", prompts[1], ""]))
    reqs = build_workload(WorkloadSpec(prompts_file=f, num_requests=5, output_len=4), tokenizer=tok,
                          max_positions=8192)
    assert [r.prompt_ids for r in reqs[:2]] == [tok(p)["input_ids"] for p in prompts]
    assert [r.text for r in reqs] == [prompts[i % 2] for i in range(5)]  # the list is a pool, cycled
    chat = build_workload(WorkloadSpec(prompts=prompts, num_requests=None, chat_template=True), tokenizer=tok)
    ref = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                  tokenize=False)
    assert chat[0].prompt_ids == tok(ref, add_special_tokens=False)["input_ids"]
    assert len(chat) == 2 and len(chat[0].prompt_ids) > len(reqs[0].prompt_ids)
    with pytest.raises(WorkloadError, match=r"text prompt 0 \(\d+ tokens\) \+ workload.output_len=16: .*max positions \(10\)"):
        build_workload(WorkloadSpec(prompts=prompts), tokenizer=tok, max_positions=10)


def test_microbatches():
    reqs = build_workload(WorkloadSpec(num_requests=7, input_len=2, output_len=2), vocab_size=10)
    groups = group_into_microbatches(reqs, 3)
    assert [[r.id for r in g] for g in groups] == [[0, 1, 2], [3, 4, 5], [6]]
    assert group_into_microbatches(reqs, 10)[0] == reqs
    with pytest.raises(WorkloadError, match="ubatch_size must be an integer >= 1, got 0"):
        group_into_microbatches(reqs, 0)


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("content, match", [
    ("[[1, 2], [3", r"workload.input_sizes_file: '.*sizes.json' is not valid JSON"),
    ('{"a": 1}', r"workload.input_sizes_file: '.*sizes.json' must hold a JSON list of \[prompt_size, num_generated_tokens\]"),
    ("[]", r"must hold a JSON list .* got an empty list"),
    ("[[1, 2], [3]]", r"'.*sizes.json' entry 1 is \[3\]; each entry must be \[prompt_size, num_generated_tokens\]"),
    ("[[1, 2], [3, 2.5]]", r"entry 1 is \[3, 2.5\]; each entry must be"),
    ('[[1, 2], ["a", 2]]', r"entry 1 .* each entry must be"),
    ("[[1, 2], [0, 4]]", r"entry 1 is \[0, 4\]; prompt_size and num_generated_tokens must both be >= 1"),
    ("[[1, -2]]", r"entry 0 is \[1, -2\]; .* must both be >= 1"),
])
def test_bad_trace_files(tmp_path, content, match):
    f = _write(tmp_path / "sizes.json", content)
    with pytest.raises(WorkloadError, match=match):
        build_workload(WorkloadSpec(kind="trace", num_requests=1, input_sizes_file=f), vocab_size=10)


def test_trace_file_errors_name_the_file_and_limits(tmp_path):
    with pytest.raises(WorkloadError, match=r"workload.input_sizes_file: cannot read '.*missing.json'"):
        build_workload(WorkloadSpec(kind="trace", input_sizes_file=str(tmp_path / "missing.json")), vocab_size=10)
    f = _write(tmp_path / "sizes.json", [[4, 4], [100, 29]])
    with pytest.raises(WorkloadError, match=r"workload.num_requests=3 but workload.input_sizes_file '.*' has only 2 entries"):
        build_workload(WorkloadSpec(kind="trace", num_requests=3, input_sizes_file=f), vocab_size=10)
    with pytest.raises(WorkloadError, match=r"entry 1 \[100, 29\]: 129 positions exceed the model's max positions \(128\)"):
        build_workload(WorkloadSpec(kind="trace", num_requests=None, input_sizes_file=f), vocab_size=10,
                       max_positions=128)
    with pytest.raises(WorkloadError, match=r"workload.input_len=120 \+ workload.output_len=16: 136 positions exceed"):
        build_workload(WorkloadSpec(input_len=120), vocab_size=10, max_positions=128)
    assert load_trace(f) == [(4, 4), (100, 29)]


@pytest.mark.parametrize("content, match", [
    ("[0, 1, 0.5]", r"workload.input_timestamps_file: '.*ts.json' timestamps must be non-decreasing; entry 2 \(0.5\)"),
    ("[0, -1]", r"entry 1 is -1; arrival times must be finite numbers >= 0"),
    ('[0, "1"]', r"entry 1 is \"1\"; arrival times"),
    ("{}", r"must hold a non-empty JSON list of arrival seconds"),
    ("[0, 1]", r"workload.input_timestamps_file '.*ts.json' has 2 timestamps but the workload has 3 requests"),
])
def test_bad_timestamp_files(tmp_path, content, match):
    f = _write(tmp_path / "ts.json", content)
    with pytest.raises(WorkloadError, match=match):
        build_workload(WorkloadSpec(kind="timestamps", num_requests=3, input_timestamps_file=f), vocab_size=10)


@pytest.mark.parametrize("kw, match", [
    (dict(kind="poisson", rps=0), r"workload.rps must be a number > 0 for Poisson arrivals; got 0"),
    (dict(kind="fixed", poisson=True, rps=-2.0), r"workload.rps must be a number > 0"),
    (dict(kind="burst"), r"workload.kind must be one of fixed, trace, poisson, timestamps; got 'burst'"),
    (dict(num_requests=0), r"workload.num_requests must be an integer >= 1"),
    (dict(input_len=0), r"workload.input_len must be an integer >= 1; got 0"),
    (dict(output_len=-1), r"workload.output_len must be an integer >= 1"),
    (dict(kind="trace"), r"workload.kind=trace needs workload.input_sizes_file"),
    (dict(kind="timestamps"), r"workload.kind=timestamps needs workload.input_timestamps_file"),
    (dict(kind="fixed", input_sizes_file="x.json"), r"workload.kind=fixed conflicts with workload.input_sizes_file"),
    (dict(kind="timestamps", input_timestamps_file="t.json", poisson=True), r"workload.poisson=true conflicts"),
    (dict(temperature=-1.0), r"workload.temperature: temperature must be >= 0"),
    (dict(top_p=0.0), r"workload.top_p: top_p must be in \(0, 1\]"),
    (dict(top_k=-3), r"workload.top_k"),
    (dict(prompts=["a"], prompts_file="p.txt"), r"set either workload.prompts or workload.prompts_file"),
    (dict(prompts=[]), r"workload.prompts must be a non-empty list"),
])
def test_bad_settings_name_the_key(kw, match):
    with pytest.raises(WorkloadError, match=match):
        build_workload(WorkloadSpec(**kw), vocab_size=10, tokenizer=object())


def test_missing_context_errors(tmp_path):
    with pytest.raises(WorkloadError, match="random-id prompts need the model's vocab_size"):
        build_workload(WorkloadSpec())
    with pytest.raises(WorkloadError, match="text prompts need a tokenizer"):
        build_workload(WorkloadSpec(prompts=["hello"]))
    with pytest.raises(WorkloadError, match=r"workload.prompts_file: cannot read '.*nope.txt'"):
        build_workload(WorkloadSpec(prompts_file=str(tmp_path / "nope.txt")))
    with pytest.raises(WorkloadError, match=r"workload.prompts_file: '.*blank.txt' holds no prompts"):
        build_workload(WorkloadSpec(prompts_file=_write(tmp_path / "blank.txt", "\n  \n")))
    with pytest.raises(WorkloadError, match="no token ids left"):
        build_workload(WorkloadSpec(), vocab_size=2, special_ids=[0, 1])
    with pytest.raises(WorkloadError, match=r"^controller.input_len=120 \+ controller.output_len=16: "):
        build_workload(WorkloadSpec(input_len=120), vocab_size=10, max_positions=64, key_prefix="controller")


def test_spec_is_a_hydra_structured_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(WorkloadSpec)
    cfg.merge_with_dotlist(["kind=poisson", "rps=4", "num_requests=3", "stop_token_ids=[2]"])
    spec = OmegaConf.to_object(cfg)
    reqs = build_workload(spec, vocab_size=10)
    assert len(reqs) == 3 and reqs[2].arrival_s > 0 and reqs[0].stop_token_ids == [2]
