"""The fast paths give the plain path's tokens: the fused pre-norm pass, the static (CUDA-graph) decode
step, the step plan's slice writes and causal prefill, and the Triton kernels (in Triton's CPU
interpreter when Triton is installed; on the GPU when there is one). The reference is transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from dejavu.engine import Engine, build_stages
from dejavu.model.config import ModelConfig
from dejavu.model.kv_cache import CacheShape, KVCache
from dejavu.model.weights import HFCheckpoint
from dejavu.sampling import SamplingParams

PROMPTS = [[5, 7, 9, 11, 3], [4, 8], [10, 20, 30, 40, 50, 60, 70]]
NEW = 20
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("perf")
    folders = {
        "llama": tm.llama(d / "llama"),  # GQA 4/2, q/k/v bias
        "opt": tm.opt(d / "opt"),
        "gpt2": tm.gpt2(d / "gpt2"),
    }
    return {name: (f, tm.hf_greedy(f, PROMPTS, NEW)) for name, f in folders.items()}


def _stages(folder, n=1, dtype="fp64", device="cpu"):
    return build_stages(ModelConfig.from_folder(folder), HFCheckpoint(folder), n, dtype=dtype, device=device)


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("num_stages", [1, 2])
def test_fused_pass_and_plain_blocks_match_transformers(models, name, num_stages):
    folder, ref = models[name]
    for fused in (True, False):
        stages = _stages(folder, num_stages)
        assert stages[0].fused, "these families should take the fused pass"
        for s in stages:
            s.fused = fused
        out = Engine(stages).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
        assert [g.output_ids for g in out] == ref, f"fused={fused}"


def _static_greedy(stages, prompts, new_tokens):
    """Greedy decoding through the static (graph-shaped) step, eagerly, by hand."""
    eng = Engine(stages, cuda_graphs=False)
    batch = len(prompts)
    slab = eng._slab_for(batch, max(map(len, prompts)) + new_tokens + 9)  # spare room must stay unread
    for c in slab.caches:
        c.data.normal_()  # garbage beyond each slot's length must not leak into attention
    logits = eng.prefill(prompts, slab)
    lengths = torch.tensor([len(p) for p in prompts])
    outs = [[] for _ in prompts]
    for step in range(new_tokens):
        tok = logits.argmax(-1)
        for i in range(batch):
            outs[i].append(int(tok[i]))
        x = tok.view(batch, 1).to(stages[0].device)
        pos = (lengths + step).view(batch, 1).to(stages[0].device)
        for stage, cache in zip(stages, slab.caches):
            x = stage(x, pos, cache, torch.zeros(batch, dtype=torch.long) if stage.is_last else None, static=True)
        logits = x
    return outs


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_static_decode_step_matches_transformers(models, name):
    folder, ref = models[name]
    assert _static_greedy(_stages(folder, 2), PROMPTS, NEW) == ref


def test_step_plan():
    cache = KVCache(CacheShape(layers=1, batch=2, kv_heads=1, max_seq=8, head_dim=2), torch.float32)
    plan = cache.begin(torch.arange(3).expand(2, -1))
    assert plan.from_start and plan.span == 3
    assert cache.plan_for(plan.positions) is plan  # shared by the stage's layers
    plan = cache.begin(torch.tensor([[4], [2]]))
    assert not plan.from_start and plan.span == 5
    assert plan.visible()[1, 0, 0].tolist() == [True, True, True, False, False]
    assert cache.begin(torch.tensor([[0], [0]]), static=True).span == 8
    with pytest.raises(ValueError, match="outside the cache's 8 positions"):
        cache.begin(torch.tensor([[8], [1]]))
    # Slice writes (prefill from 0) and scatter writes store the same thing.
    k = torch.randn(2, 1, 3, 2)
    a = KVCache(cache.shape, torch.float32)
    b = KVCache(cache.shape, torch.float32)
    a.write(0, k, -k, torch.arange(3).expand(2, -1), a.begin(torch.arange(3).expand(2, -1)))
    b.write(0, k, -k, torch.arange(3).expand(2, -1))
    assert torch.equal(a.data, b.data)


def test_engine_reuses_caches_between_calls(models):
    folder, ref = models["llama"]
    eng = Engine(_stages(folder), cache_len=64)
    first = eng.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    slab = eng._slab
    again = eng.generate(PROMPTS[::-1], SamplingParams(max_new_tokens=NEW))
    assert eng._slab is slab and slab.max_seq == 64
    assert [g.output_ids for g in first] == ref
    assert [g.output_ids for g in again] == ref[::-1]


# Run first in every interpreter script: the interpreter on, and its numpy glue patched.
_INTERPRETER_PREAMBLE = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as I
    _orig = I._patch_lang_tensor
    def _patched(tensor, scope):  # triton 3.6 + numpy >= 2.4: int() of a 1-element array
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    I._patch_lang_tensor = _patched
""")


def _run_in_interpreter(script: str, *args: str) -> None:
    """Run ``script`` (after the preamble) in a fresh interpreter with Triton's CPU interpreter on; it must
    print "ok"."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_PREAMBLE + script, *args], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


_INTERPRETER_SCRIPT = textwrap.dedent("""
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import tiny_models as tm
    from dejavu.engine import Engine, build_stages
    from dejavu.model import fused
    from dejavu.model.config import ModelConfig
    from dejavu.model.weights import HFCheckpoint
    from dejavu.sampling import SamplingParams
    prompts = [[5, 7, 9, 11, 3], [4, 8]]
    for name in ("llama", "opt"):
        folder = getattr(tm, name)(sys.argv[1] + "/" + name, layers=2)
        cfg, src = ModelConfig.from_folder(folder), HFCheckpoint(folder)
        outs = []
        for on in ("1", "0"):
            os.environ["DEJAVU_TRITON"] = on
            stages = build_stages(cfg, src, 1, dtype="fp32")
            assert fused.enabled(torch.zeros(1)) == (on == "1")
            outs.append([g.output_ids for g in Engine(stages).generate(prompts, SamplingParams(max_new_tokens=6))])
        assert outs[0] == outs[1], (name, outs)
    print("ok")
""")


def test_triton_kernels_in_interpreter_give_the_same_tokens(tmp_path):
    _run_in_interpreter(_INTERPRETER_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")), str(tmp_path))


_ATTN_NAN_SCRIPT = textwrap.dedent("""
    sys.path[:0] = [{root!r}]
    import torch
    from dejavu.model import fused

    torch.manual_seed(0)
    b, H, KV, hd, S = 3, 4, 2, 16, 70  # S not a multiple of the tile: the last split's tile runs past it
    qkv = torch.randn(b, 1, (H + 2 * KV) * hd)
    cache = torch.randn(2, b, KV, S, hd)
    pos = torch.tensor([37, 5, 69])
    for i, p in enumerate(pos.tolist()):
        cache[:, i, :, p:] = float("nan")  # nothing at or past pos may be read
    q, k, v = qkv.view(b, H + 2 * KV, hd).split([H, KV, KV], 1)
    want = []
    for i, p in enumerate(pos.tolist()):
        keys = torch.cat([cache[0, i, :, :p], k[i, :, None]], 1).repeat_interleave(H // KV, 0)
        vals = torch.cat([cache[1, i, :, :p], v[i, :, None]], 1).repeat_interleave(H // KV, 0)
        att = torch.softmax((q[i, :, None] @ keys.transpose(1, 2)) / hd**0.5, -1)
        want.append((att @ vals)[:, 0])
    want = torch.stack(want)
    for config in ((16, 2, 4, 1000), (16, 2, 4, 6)):  # 5 splits of one tile; 1 split of 5 tiles
        c = cache.clone()
        got = fused.decode_attention_new(qkv, pos, None, None, c, H, hd, config=config)
        assert (got - want).abs().max() < 1e-5, (config, (got - want).abs().max())
        for i, p in enumerate(pos.tolist()):  # the new k, v stored at pos, nothing else touched
            assert torch.equal(c[0, i, :, p], k[i]) and torch.equal(c[1, i, :, p], v[i])
            assert torch.equal(c[:, i, :, :p], cache[:, i, :, :p])
    print("ok")
""")


def test_decode_attention_never_reads_past_the_position_in_interpreter():
    """Decode attention with the new token folded in, against a PyTorch reference, with NaN at and past
    each slot's position in the cache (whatever a cache holds there must not reach the output), with
    several splits and with several tiles per split; the new k, v land at pos and nothing else changes."""
    _run_in_interpreter(_ATTN_NAN_SCRIPT.format(root=str(ROOT)))


_ADD_NORM_PARTS_SCRIPT = textwrap.dedent("""
    sys.path[:0] = [{root!r}]
    import torch
    from dejavu.model import fused
    from dejavu.model.layers import RMSNorm

    torch.manual_seed(0)
    n, m = 96, 3
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        rms, ln = RMSNorm(n, 1e-5).to(dtype), torch.nn.LayerNorm(n).to(dtype)
        with torch.no_grad():
            rms.weight.normal_(1, 0.1), ln.weight.normal_(1, 0.1), ln.bias.normal_(0, 0.1)
        x = torch.randn(m, n, dtype=dtype)
        bias = torch.randn(n, dtype=dtype)
        for parts in (2, 3, 4):  # 3: the one-tile form pads the parts to 4 and masks the fourth
            p = torch.randn(parts, m, n)
            want_h = x + (p.sum(0).to(dtype) + bias)
            for norm in (rms, ln):
                got = [fused.add_norm(x, fused.SplitSum(p, x.shape, dtype), bias, norm, one_load)
                       for one_load in (False, True)]
                for h, y in got:
                    assert (h.float() - want_h.float()).abs().max() < tol * 10, (dtype, parts)
                    assert (y.float() - norm(want_h).float()).abs().max() < tol * 10, (dtype, parts)
                assert (got[0][1].float() - got[1][1].float()).abs().max() <= tol * 10
    print("ok")
""")


def test_add_norm_sums_split_k_partials_in_both_forms_in_interpreter():
    """The add+norm that sums split-K partials, read part by part (fp16's form on the GPU) and as one
    [parts, n] tile (bf16's), against ``norm(x + (sum of parts + bias))`` in PyTorch: RMSNorm and
    LayerNorm, 2-4 parts (3 exercises the padded, masked tile)."""
    _run_in_interpreter(_ADD_NORM_PARTS_SCRIPT.format(root=str(ROOT)))


# ---- on a GPU (skipped in CI) -----------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("name", ["llama", "opt", "gpt2"])
def test_cuda_graph_engine_matches_transformers(models, name):
    folder, ref = models[name]
    stages = _stages(folder, 2, dtype="fp32", device="cuda")
    eng = Engine(stages)
    assert eng.cuda_graphs
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    assert [g.output_ids for g in out] == ref
    assert all(g.replays == 1 for g in eng._slab.prefill), "the prompts should have gone through prefill graphs"
    # Sampling (host-side) through the graphs is the eager path's too.
    params = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_k=20, seed=3)
    eager = Engine(_stages(folder, 2, dtype="fp32", device="cuda"), cuda_graphs=False)
    assert [g.output_ids for g in eng.generate(PROMPTS, params)] == \
        [g.output_ids for g in eager.generate(PROMPTS, params)]


def test_prefill_graph_lengths(models):
    """Which prefills replay a graph: padded to a power of two (at least 64, at most the cache), at most
    2048 tokens over all the buffer's slots, never on the CPU or with tensor parallelism."""
    from dejavu.model.cuda_graphs import PrefillGraphs

    folder, _ = models["opt"]
    graphs = PrefillGraphs(_stages(folder, dtype="fp32")[0])
    assert [graphs.padded(n, 576) for n in (1, 64, 65, 300, 512, 513, 600)] == [64, 64, 128, 512, 512, 576, 576]
    cache = KVCache(CacheShape(2, 8, 2, 2048, 16), torch.float32)
    assert graphs.lengths(cache) == [64, 128, 256]
    assert not graphs.fits(cache, 10)  # a CPU cache: eager


@cuda
def test_capture_keeps_cache_contents(models):
    folder, _ = models["opt"]
    stage = _stages(folder, dtype="fp16", device="cuda")[0]
    cache = stage.new_cache(3, 32)
    cache.data.normal_()
    before = cache.data.clone()
    stage.capture_decode(cache)
    assert torch.equal(cache.data, before)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernels_against_torch(dtype):
    import torch.nn.functional as F

    from dejavu.model import fused
    from dejavu.model.layers import RMSNorm, Rotary, _rotate_half

    if not fused.HAVE_TRITON:
        pytest.skip("no triton")
    torch.manual_seed(0)
    dev = "cuda"
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    x, d, bias = (torch.randn(7, 2048, dtype=dtype, device=dev) for _ in range(2)), None, None
    x, d = x
    bias = torch.randn(2048, dtype=dtype, device=dev)
    n = RMSNorm(2048, 1e-5).to(dev, dtype)
    n.weight.data.uniform_(0.5, 1.5)
    h, y = fused.add_norm(x, d, bias, n)
    href = x + (d + bias)
    xf = href.float()
    yref = n.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(h, href) and _rel(y, yref) < tol
    ln = torch.nn.LayerNorm(2048).to(dev, dtype)
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.normal_()
    assert _rel(fused.add_norm(x, d, None, ln)[1], ln(x + d)) < tol
    g = torch.randn(5, 2, 4096, dtype=dtype, device=dev)
    a, u = g.split(2048, -1)
    assert _rel(fused.silu_mul(g), F.silu(a) * u) < tol
    b, t, H, KV, hd, S = 3, 5, 32, 8, 64, 40
    rot = Rotary(hd, 64, 10000.0, None).to(dev)
    qkv = torch.randn(b, t, (H + 2 * KV) * hd, dtype=dtype, device=dev)
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13], [30, 31, 32, 33, 34]], device=dev)
    cache = torch.zeros(2, b, KV, S, hd, dtype=dtype, device=dev)
    q = fused.rope_write(qkv, pos, rot.cos, rot.sin, cache, H, KV, hd)
    qq, kk, vv = qkv.view(b, t, H + 2 * KV, hd).split([H, KV, KV], 2)
    cos, sin = rot.cos[pos].unsqueeze(2).to(dtype), rot.sin[pos].unsqueeze(2).to(dtype)
    assert _rel(q, qq * cos + _rotate_half(qq) * sin) < tol
    ref = torch.zeros_like(cache)
    for i in range(b):
        ref[0, i, :, pos[i]] = (kk[i] * cos[i] + _rotate_half(kk[i]) * sin[i]).transpose(0, 1)
        ref[1, i, :, pos[i]] = vv[i].transpose(0, 1)
    assert _rel(cache, ref) < tol
    for (b, H, KV, hd, S) in [(1, 32, 8, 64, 576), (3, 8, 2, 64, 200), (32, 32, 32, 64, 576), (4, 6, 2, 48, 100)]:
        q = torch.randn(b, H, hd, dtype=dtype, device=dev)
        kc, vc = (torch.randn(b, KV, S, hd, dtype=dtype, device=dev) for _ in range(2))
        pos = torch.randint(0, S, (b, 1), device=dev)
        pos[0] = S - 1
        o = fused.decode_attention(q, kc, vc, pos)
        refs = []
        for i in range(b):
            L = int(pos[i]) + 1
            k = kc[i, :, :L].double().repeat_interleave(H // KV, 0)
            v = vc[i, :, :L].double().repeat_interleave(H // KV, 0)
            refs.append(F.scaled_dot_product_attention(q[i].double().unsqueeze(1), k, v).squeeze(1))
        assert _rel(o, torch.stack(refs)) < tol, (b, H, KV, hd, S)
    # The decode kernel that also rotates and stores the new token (rope_write folded in) against the
    # two kernels it replaces: the same cache, bit for bit, and the same attention output.
    for (b, H, KV, hd, S), rope in [((1, 32, 8, 64, 576), True), ((3, 8, 2, 64, 200), False),
                                    ((32, 32, 32, 64, 576), False), ((4, 6, 2, 48, 100), True)]:
        rot = Rotary(hd, S, 10000.0, None).to(dev)
        cs = (rot.cos, rot.sin) if rope else (None, None)
        qkv = torch.randn(b, 1, (H + 2 * KV) * hd, dtype=dtype, device=dev)
        pos = torch.randint(0, S, (b, 1), device=dev)
        pos[0], pos[-1] = S - 1, 0
        cache = torch.randn(2, b, KV, S, hd, dtype=dtype, device=dev)
        cache2 = cache.clone()
        q = fused.rope_write(qkv, pos, *cs, cache, H, KV, hd)
        o = fused.decode_attention(q.view(b, H, hd), cache[0], cache[1], pos)
        o2 = fused.decode_attention_new(qkv, pos, *cs, cache2, H, hd)
        assert torch.equal(cache, cache2), (b, H, KV, hd, S)
        assert _rel(o2, o) < tol, (b, H, KV, hd, S)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_split_k_into_add_norm_against_torch(dtype):
    """A split-K projection's partial sums, added up by the next add+norm kernel, against
    ``norm(h + (x @ w.T + bias))`` in PyTorch: RMSNorm and LayerNorm, both split shapes, 1-32 rows, the
    partials read part by part and as one tile."""
    import torch.nn.functional as F

    from dejavu.model import fused
    from dejavu.model.layers import RMSNorm

    if not fused.HAVE_TRITON:
        pytest.skip("no triton")
    tol = {torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    rms = RMSNorm(2048, 1e-5).to("cuda", dtype)
    ln = torch.nn.LayerNorm(2048).to("cuda", dtype)
    for k in (2048, 8192):
        w = torch.randn(2048, k, dtype=dtype, device="cuda") / k**0.5
        bias = torch.randn(2048, dtype=dtype, device="cuda")
        for m in (1, 8, 32):
            x = torch.randn(m, 1, k, dtype=dtype, device="cuda")
            h = torch.randn(m, 1, 2048, dtype=dtype, device="cuda")
            config = fused.split_config(x, w)
            assert config is not None, (m, k)
            parts = fused.skinny_mm_split(x, w, config)
            assert parts.parts.shape == (config[0], m, 2048)
            assert _rel(parts.resolve(), F.linear(x, w)) < tol
            for norm in (rms, ln):
                want_h = h + (F.linear(x, w) + bias)
                for one_load in (None, False, True):  # the dtype's own form, then both forced
                    got_h, got_y = fused.add_norm(h, parts, bias, norm, one_load)
                    assert _rel(got_h, want_h) < tol and _rel(got_y, norm(want_h)) < tol, (k, m, norm, one_load)
    # Outside the table (and in fp32) nothing is split.
    assert fused.split_config(torch.randn(1, 3072, dtype=dtype, device="cuda"), w[:, :3072]) is None
    assert fused.split_config(torch.randn(1, 2048, device="cuda"), torch.randn(2048, 2048, device="cuda")) is None


def _wide_stage_after_prefill(family: str, b: int = 4):
    """A 2048-wide two-layer fp16 stage (the decode shapes the kernel tables name) with 8 tokens of each of
    ``b`` slots prefilled; returns (stage, cache, next tokens, their positions, slot index)."""
    from transformers import LlamaConfig, OPTConfig

    from dejavu.model.stage import StageModel

    if family == "llama":
        hf = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=512)
    else:
        hf = OPTConfig(hidden_size=2048, ffn_dim=8192, num_hidden_layers=2, num_attention_heads=32,
                       vocab_size=512, word_embed_proj_dim=2048)
    cfg = ModelConfig.from_hf(hf.to_dict())
    stage = StageModel(cfg, dtype="fp16", device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in stage.named_parameters():  # built empty: norms at identity, the rest small
            if "norm.weight" in name:
                param.fill_(1.0)
            elif "norm.bias" in name:
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=g, device="cuda") * 0.02)
    tokens = torch.randint(3, 512, (b, 8), device="cuda")
    cache = stage.new_cache(b, 64)
    stage(tokens, torch.arange(8).expand(b, 8), cache, torch.full((b,), 7))
    x = torch.randint(3, 512, (b, 1), device="cuda")
    return stage, cache, x, torch.full((b, 1), 8), torch.zeros(b, dtype=torch.long)


@cuda
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_cuda_split_k_decode_step_matches_unsplit(family, monkeypatch):
    """A 2048-wide two-layer stage (the shapes the split table names): the decode step, eager and through
    a graph, with split-K projections gives the logits of the unsplit step (fp16 rounding aside)."""
    stage, cache, x, pos, index = _wide_stage_after_prefill(family)
    logits = {}
    for split in ("0", "1"):
        monkeypatch.setenv("DEJAVU_SPLITK", split)
        logits[split] = stage(x, pos, cache, index).float()
        graph = stage.capture_decode(cache)
        logits[split + "g"] = graph(x, pos.cuda()).float().clone()
    for key in ("1", "1g", "0g"):
        assert _rel(logits[key], logits["0"]) < 1e-2, key
    assert torch.equal(logits["1"].argmax(-1), logits["0"].argmax(-1))


@cuda
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_cuda_pdl_decode_step_is_bitwise_equal(family, monkeypatch):
    """Programmatic dependent launch only changes when kernels start, never what they compute: every
    mode's graph replay gives exactly the logits of the plain launch (a missing wait would read stale
    activations and differ)."""
    from dejavu.model import fused

    if not fused._PDL_OK:
        pytest.skip("PDL needs Hopper and a Triton with launch_pdl")
    stage, cache, x, pos, _ = _wide_stage_after_prefill(family)
    monkeypatch.setenv("DEJAVU_SKINNY_ALL", "1")  # the same matmul kernels in every mode (PDL picks them too)
    logits = {}
    for mode in ("0", "1", "late"):
        monkeypatch.setenv("DEJAVU_PDL", mode)
        graph = stage.capture_decode(cache)
        logits[mode] = [graph(x, pos.cuda()).float().clone() for _ in range(3)]
    for mode, runs in logits.items():
        for run in runs:
            assert torch.equal(run, logits["0"][0]), mode


@cuda
def test_cuda_kernels_take_the_whole_shared_memory_carveout(monkeypatch):
    """With PDL on, each of our kernels is loaded with the full shared-memory carveout (so that the next
    kernel's early-launched programs can share an SM with it), the small ones included."""
    import ctypes

    from dejavu.model import fused, skinny_tma

    if not fused._CARVEOUT:
        pytest.skip("PDL off (nothing launches early), DEJAVU_CARVEOUT=0, or a Triton without load hooks")
    x = torch.randn(3, 2048, dtype=torch.float16, device="cuda")
    fused.add_norm(x, x, None, torch.nn.LayerNorm(2048).to("cuda", torch.float16))
    jits = [fused._add_norm_kernel, fused._skinny_mm_kernel]
    if skinny_tma.HAVE_GLUON:
        jits.append(skinny_tma._skinny_tma_kernel)
    for matmul in ("triton", "tma"):
        monkeypatch.setenv("DEJAVU_MATMUL", matmul)
        fused.skinny_mm(x, torch.randn(4096, 2048, dtype=torch.float16, device="cuda"))
    torch.cuda.synchronize()
    lib = ctypes.CDLL("libcuda.so.1")
    seen = {}
    for jit in jits:
        for kernel in jit.device_caches[torch.cuda.current_device()][0].values():
            value = ctypes.c_int()
            assert lib.cuFuncGetAttribute(ctypes.byref(value), 9, ctypes.c_void_p(kernel.function)) == 0
            seen[kernel.name, kernel.metadata.shared] = value.value
    assert {name for name, _ in seen} == {jit.__name__ for jit in jits}
    assert set(seen.values()) == {100}, seen


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_skinny_matmul_against_torch(dtype, monkeypatch):
    """The Triton matmul (DEJAVU_MATMUL=triton; the TMA one has its own test below)."""
    import torch.nn.functional as F

    from dejavu.model import fused

    if not fused.HAVE_TRITON:
        pytest.skip("no triton")
    monkeypatch.setenv("DEJAVU_MATMUL", "triton")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    for m in (1, 8, 32, 64):
        x = torch.randn(m, 2048, dtype=dtype, device="cuda")
        w = torch.randn(16384, 2048, dtype=dtype, device="cuda") / 45
        b = torch.randn(16384, dtype=dtype, device="cuda")
        assert _rel(fused.skinny_mm(x, w, b), F.linear(x, w, b)) < tol
        assert _rel(fused.skinny_mm(x, w, b, 1), F.relu(F.linear(x, w, b))) < tol
        gate, up = F.linear(x, w).split(8192, -1)
        # The fp16-tuned tilings must also fit shared memory in fp32 (two weight tiles for SwiGLU).
        assert _rel(fused.skinny_mm(x, w, None, 2), F.silu(gate) * up) < tol


def _need_tma():
    """Skip without Hopper and Gluon; else forget the TMA kernels compiled so far (see ``_tma_ran``)."""
    from dejavu.model import skinny_tma

    if not skinny_tma.HAVE_GLUON or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA matmul needs Hopper and a Triton with Gluon")
    skinny_tma._skinny_tma_kernel.device_caches.clear()


def _tma_ran() -> bool:
    from dejavu.model import skinny_tma

    caches = skinny_tma._skinny_tma_kernel.device_caches
    return bool(caches) and any(len(c[0]) for c in caches.values())


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tma_matmul_against_torch(dtype, monkeypatch):
    """DEJAVU_MATMUL=tma: every form the decode step uses (bias, relu, SwiGLU, split-K partials, 1-32 rows,
    a row count that is no power of two, and a weight whose row count is no multiple of the tile) equals
    PyTorch's matmul to the dtype's rounding, with the weight read before the PDL wait or after it."""
    import torch.nn.functional as F

    from dejavu.model import fused

    _need_tma()
    monkeypatch.setenv("DEJAVU_MATMUL", "tma")
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for tile in ("", "64,128,8", "128,64,4"):  # "": the tilings per row count (skinny_tma.TILES)
        monkeypatch.setenv("DEJAVU_TMA_TILE", tile)
        for m in (1, 5, 8, 32):
            x = torch.randn(m, 2048, dtype=dtype, device="cuda")
            w = torch.randn(16384, 2048, dtype=dtype, device="cuda") / 45
            b = torch.randn(16384, dtype=dtype, device="cuda")
            for static in (False, True):
                assert _rel(fused.skinny_mm(x, w, b, static_weight=static), F.linear(x, w, b)) < tol
                assert _rel(fused.skinny_mm(x, w, b, 1, static_weight=static), F.relu(F.linear(x, w, b))) < tol
                gate, up = F.linear(x, w).split(8192, -1)
                assert _rel(fused.skinny_mm(x, w, None, 2, static_weight=static), F.silu(gate) * up) < tol
            odd = w[:5000]  # the last tile runs past the weight: TMA fills it with zeros, the store is masked
            assert _rel(fused.skinny_mm(x, odd, b[:5000]), F.linear(x, odd, b[:5000])) < tol
            wide = torch.randn(2048, 8192, dtype=dtype, device="cuda") / 90
            xw = torch.randn(m, 8192, dtype=dtype, device="cuda")
            parts = fused.skinny_mm_split(xw, wide, (4, 32, 128, 4, 4), static_weight=True)
            assert parts.parts.shape == (4, m, 2048)
            assert _rel(parts.resolve(), F.linear(xw, wide)) < tol
    assert _tma_ran(), "the TMA kernel never ran"


@cuda
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_cuda_tma_decode_step_matches_triton_matmuls(family, monkeypatch):
    """The decode step with DEJAVU_MATMUL=tma, eager and as a graph replayed three times with PDL (the
    weights' first tiles read before each kernel's wait), gives the logits of the Triton matmuls (tensor-
    core sums in another order: rounding aside) and the same greedy tokens; replays are bitwise equal."""
    _need_tma()
    stage, cache, x, pos, index = _wide_stage_after_prefill(family)
    monkeypatch.setenv("DEJAVU_SKINNY_ALL", "1")
    logits = {}
    for matmul in ("triton", "tma"):
        monkeypatch.setenv("DEJAVU_MATMUL", matmul)
        logits[matmul] = stage(x, pos, cache, index).float()
        graph = stage.capture_decode(cache)
        logits[matmul + "g"] = [graph(x, pos.cuda()).float().clone() for _ in range(3)]
    assert _tma_ran(), "the TMA kernel never ran"
    for run in logits["tmag"]:
        assert torch.equal(run, logits["tmag"][0])
    for got in (logits["tma"], logits["tmag"][0]):
        assert _rel(got, logits["triton"]) < 1e-2
        assert torch.equal(got.argmax(-1), logits["triton"].argmax(-1))
