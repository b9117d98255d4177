"""Turn a GGUF file into a cached Hugging Face-style checkpoint folder, once.

Dequantizing a GGUF takes seconds to minutes, and every worker of a run only wants its own layers, so we
dequantize once into a folder that looks exactly like a `save_pretrained` checkpoint (config.json,
safetensors with HF tensor names, generation_config.json, tokenizer files). From then on the GGUF is just
another HF folder: our lazy per-tensor loader reads a stage's layers, and transformers can load the same
folder as the reference.

Cache: `$DEJAVU_CACHE_DIR/gguf/<stem>-<key>/` (default root `~/.cache/dejavu`), where the key hashes the
file's real path, size and mtime and the converter version. The folder is written into a temporary
sibling and renamed into place, under a file lock, so concurrent workers or tests either convert it once
or find it complete; a folder that exists is complete.

Precision: the gguf package dequantizes every block type to float32, and Q4_1/Q8_0 values (scale × int +
min, scale in fp16) generally need more than fp16/bf16's mantissa, so quantized tensors (and BF16 ones) are
stored as fp32; tensors the GGUF holds as plain F32/F16 keep their own type. Nothing is rounded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import switches

# Bump when the output of the conversion changes, so stale cache folders are not reused.
CONVERTER_VERSION = 2

# Shards of at most this many bytes, so converting a large GGUF never holds all of it in memory.
SHARD_BYTES = 2 * 1024**3

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class GGUFError(ValueError):
    """The GGUF file is unreadable, or holds a model we cannot convert."""


# ---- reading ------------------------------------------------------------------------------------------

def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors (ValueError, IndexError, ...) on damage
        raise GGUFError(f"{path} is a damaged or truncated GGUF file: {type(e).__name__}: {e}") from None


def _value(field) -> Any:
    """A scalar or string metadata value (arrays of strings come back as lists)."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[field.data[0]].tolist()[0]


def _meta(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else _value(field)


def _require(reader, path: Path, key: str) -> Any:
    value = _meta(reader, key)
    if value is None:
        raise GGUFError(f"{path} lacks the metadata key {key!r}, which the conversion needs")
    return value


def _hf_config(reader, path: Path) -> dict[str, Any]:
    """config.json contents from the GGUF metadata (llama.cpp's key names -> transformers' names)."""
    arch = _require(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1+ stores its RoPE scaling as a per-dimension factor tensor; the llama3 rope_scaling
        # parameters it was computed from are not in the file, so we cannot write an equivalent config.
        raise GGUFError(f"{path}: GGUF files with a rope_freqs tensor (Llama 3.1-style RoPE scaling) are "
                        "not supported; use the Hugging Face checkpoint folder of this model instead")

    a = arch + "."
    hidden = _require(reader, path, a + "embedding_length")
    heads = _require(reader, path, a + "attention.head_count")
    kv_heads = _meta(reader, a + "attention.head_count_kv", heads)
    head_dim = _meta(reader, a + "attention.key_length", hidden // heads)
    rope_dim = _meta(reader, a + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings (rope.dimension_count={rope_dim} != head_dim="
                        f"{head_dim}) are not supported for architecture {arch!r}")
    vocab = _meta(reader, a + "vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens.data)
        else:
            embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            if embd is None:
                raise GGUFError(f"{path} has neither a vocab size nor a token_embd.weight tensor")
            vocab = int(embd.shape[-1])

    cfg: dict[str, Any] = {
        "architectures": [_HF_CLASS[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(_require(reader, path, a + "feed_forward_length")),
        "num_hidden_layers": int(_require(reader, path, a + "block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(_meta(reader, a + "context_length", 2048)),
        "rms_norm_eps": _f32(_meta(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_meta(reader, a + "rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, path, a),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        cfg["mlp_bias"] = False
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def _f32(x: float) -> float:
    # GGUF stores these as float32: 1e-5 comes back as 9.99999974e-06. The shortest decimal that rounds
    # to the same float32 is the value the original config.json held.
    return float(str(np.float32(x)))


def _rope_scaling(reader, path: Path, a: str) -> dict[str, Any] | None:
    kind = _meta(reader, a + "rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(_require(reader, path, a + "rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": int(_require(reader, path, a + "rope.scaling.original_context_length"))}
    raise GGUFError(f"{path}: RoPE scaling type {kind!r} is not supported; expected none, linear or yarn")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json a conversion would write, from metadata only (no dequantization): for planners."""
    path = Path(path).expanduser()
    return _hf_config(_open(path), path)


# ---- tensors ------------------------------------------------------------------------------------------

def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf q/k permutation.

    HF orders each head's rotary dims as [first half | second half] (rotate_half); llama.cpp wants the
    pairs interleaved, so convert_hf_to_gguf does reshape(n_head, 2, d/2, ...).swapaxes(1, 2). Inverse:
    reshape(n_head, d/2, 2, ...).swapaxes(1, 2). Works for weights [out, in] and biases [out] alike.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader, path: Path, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF orientation) for every tensor, dequantized one at a time."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise GGUFError(f"{path}: tensor {t.name!r} has no Hugging Face counterpart for "
                            f"architecture {cfg['model_type']!r}; this GGUF is not a plain decoder")
        # numpy shape is ggml's reversed, i.e. already HF's [out, in]; dequantize keeps that.
        if t.tensor_type in plain:
            w = np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])
        else:
            try:
                w = dequantize(t.data, t.tensor_type)  # float32 (BF16 -> float32 too, exactly)
            except NotImplementedError:
                raise GGUFError(f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, which the "
                                "installed gguf package cannot dequantize") from None
        if cfg["model_type"] == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            n = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
            w = _unpermute(w, n)
        yield name, np.ascontiguousarray(w)


def _expected_names(cfg: dict[str, Any]) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for i in range(cfg["num_hidden_layers"]):
        names.update(f"model.layers.{i}.{part}.weight" for part in _BLOCK_TENSORS.values())
    return names


def _write_weights(reader, path: Path, cfg: dict[str, Any], out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0
    seen: set[str] = set()

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(out / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, w in _tensors(reader, path, cfg):
        tensor = torch.from_numpy(w.copy() if not w.flags.writeable else w)
        pending[name] = tensor
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        pending_bytes += nbytes
        total += nbytes
        if pending_bytes >= SHARD_BYTES:
            flush()
    flush()

    missing = _expected_names(cfg) - seen
    if missing:
        raise GGUFError(f"{path} lacks {len(missing)} tensors a {cfg['model_type']} model needs, "
                        f"e.g. {sorted(missing)[:3]}")

    if len(shards) == 1:
        (out / "shard-00000.safetensors").rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"shard-{i:05d}.safetensors").rename(out / fname)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(reader, path: Path, out: Path) -> None:
    if "tokenizer.ggml.model" not in reader.fields:
        return  # a weights-only GGUF (tests build these); the caller supplies a tokenizer if it needs one
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise GGUFError(f"{path}: transformers could not build a tokenizer from the GGUF vocabulary: "
                        f"{type(e).__name__}: {e}") from None
    if tok.chat_template is None and "tokenizer.chat_template" in reader.fields:
        tok.chat_template = _meta(reader, "tokenizer.chat_template")
    tok.save_pretrained(str(out))
    # transformers 5 names the class TokenizersBackend and keeps the template in chat_template.jinja;
    # transformers 4 knows neither. PreTrainedTokenizerFast is the same class under its old name, and a
    # template inside tokenizer_config.json is read by both, so the folder loads under either version.
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    if tcfg.get("tokenizer_class") == "TokenizersBackend":
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tok.chat_template and "chat_template" not in tcfg:
        tcfg["chat_template"] = tok.chat_template
    tcfg.pop("local_files_only", None)
    tcfg.pop("is_local", None)
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")


# ---- the cache ----------------------------------------------------------------------------------------

def cache_root() -> Path:
    """Where converted GGUF folders live: $DEJAVU_CACHE_DIR/gguf, default ~/.cache/dejavu/gguf."""
    root = switches.get("DEJAVU_CACHE_DIR")
    return Path(root).expanduser() / "gguf"


def cache_dir_for(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The folder a conversion of `path` goes to (it may not exist yet)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(
        f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0v{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    return (Path(root).expanduser() if root is not None else cache_root()) / f"{path.stem}-{key}"


@contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


@dataclass(frozen=True)
class Converted:
    folder: Path
    converted_now: bool  # False when the cache already held it


def convert_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a HF checkpoint folder for GGUF file `path`, converting it the first time."""
    return convert_gguf_info(path, cache_dir).folder


def convert_gguf_info(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Converted:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    final = cache_dir_for(path, cache_dir)
    if final.is_dir():
        return Converted(final, False)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the GGUF cache folder {final.parent} ({e.strerror}); set "
                      "DEJAVU_CACHE_DIR to a writable folder") from None
    with _locked(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process converted it while we waited for the lock
            return Converted(final, False)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a process that died mid-way
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            reader = _open(path)
            cfg = _hf_config(reader, path)
            cfg["dejavu_source"] = {"gguf": str(path.resolve()), "converter_version": CONVERTER_VERSION}
            _write_weights(reader, path, cfg, tmp)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            _write_tokenizer(reader, path, tmp)
            # mkdtemp and safetensors create owner-only files; a shared cache must be readable by all.
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            os.rename(tmp, final)  # atomic: readers see no folder or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Converted(final, True)
