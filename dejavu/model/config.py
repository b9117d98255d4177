"""One family-agnostic description of a decoder-only model, read from a Hugging Face config.json.

Every other part of the system (stages, KV cache, streaming, planner) sizes itself from this, so it
carries only what those parts need, under one set of names whatever the family calls them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "opt", "gpt2", "bloom")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    # float64 exists so tests can compare against a reference with no rounding near-ties.
    "fp64": torch.float64,
    "float64": torch.float64,
}


_DTYPE_NAMES: dict = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: how messages, chunk meta and results name a dtype (cached:
    the streaming path asks on every flush)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown data type {name!r}; expected one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # Llama family
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    # OPT family
    pre_layer_norm: bool = True
    word_embed_proj_dim: int | None = None
    activation: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    # ---- sizes the planner and the cache need -------------------------------------------------------
    def kv_bytes_per_token_per_layer(self, dtype: torch.dtype) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def layer_param_count(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2
        ffn = h * self.intermediate_size * (3 if self.family == "llama" else 2)
        return attn + ffn

    def check_tensor_parallel(self, tp: int) -> None:
        if tp < 1:
            raise ValueError(f"tensor parallel degree must be >= 1, got {tp}")
        for key, n in (("num_heads", self.num_heads), ("num_kv_heads", self.num_kv_heads),
                       ("intermediate_size", self.intermediate_size)):
            if n % tp:
                raise ValueError(f"tensor parallel degree {tp} does not divide the model's {key}={n}")

    def check_layer_range(self, first: int, last: int) -> None:
        if not (0 <= first < last <= self.num_layers):
            raise ValueError(
                f"layer range [{first}, {last}) is outside the model's {self.num_layers} layers "
                f"(need 0 <= first < last <= {self.num_layers})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type", "")
        reader = _READERS.get(model_type)
        if reader is None:
            raise ValueError(
                f"model_type {model_type!r} in config.json is not supported; expected one of {sorted(_READERS)}")
        return reader(hf)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint folder {folder}")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(hf)


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _llama(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("mlp_bias"):
        raise ValueError("config.json sets mlp_bias=true, which this engine's Llama blocks do not support")
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        rope_scaling=hf.get("rope_scaling") or _rope_params_scaling(hf),
        # Qwen2 has biases on q/k/v only; Llama's attention_bias puts one on o_proj as well.
        qkv_bias=hf.get("attention_bias", False) or hf.get("model_type") == "qwen2",
        out_bias=hf.get("attention_bias", False),
        activation=hf.get("hidden_act", "silu"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def _rope_params_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    # transformers >= 5 writes RoPE settings under "rope_parameters" instead of rope_theta/rope_scaling.
    params = hf.get("rope_parameters")
    if not params or params.get("rope_type", "default") == "default":
        return None
    return dict(params)


def _opt(hf: dict[str, Any]) -> ModelConfig:
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    proj = hf.get("word_embed_proj_dim", hidden)
    return ModelConfig(
        family="opt",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf["ffn_dim"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=1e-5,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=hf.get("enable_bias", True),
        out_bias=hf.get("enable_bias", True),
        pre_layer_norm=hf.get("do_layer_norm_before", True),
        word_embed_proj_dim=proj if proj != hidden else None,
        activation=hf.get("activation_function", "relu"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
        extra={"layer_norm_elementwise_affine": hf.get("layer_norm_elementwise_affine", True)},
    )


def _gpt2(hf: dict[str, Any]) -> ModelConfig:
    # Variants whose attention our shared Attention cannot express must fail here, not give wrong tokens.
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("config.json sets scale_attn_by_inverse_layer_idx=true (attention scaled by "
                         "1/(layer+1)), which this engine's GPT-2 blocks do not support; expected false")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("config.json sets scale_attn_weights=false (unscaled attention), which this engine's "
                         "GPT-2 blocks do not support; expected true")
    # reorder_and_upcast_attn only changes the precision of the score matmul (fp32), not the maths: accepted.
    heads = hf["n_head"]
    hidden = hf["n_embd"]
    return ModelConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_positions=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=True,
        out_bias=True,
        activation=hf.get("activation_function", "gelu_new"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
    )


def _bloom(hf: dict[str, Any]) -> ModelConfig:
    # Hub BLOOM configs spell the sizes n_embed / num_attention_heads / n_layer; save_pretrained writes
    # hidden_size / n_head. n_embed wins when both are present, as in BloomConfig.
    hidden = hf.get("n_embed") or hf.get("hidden_size")
    heads = hf.get("n_head") or hf.get("num_attention_heads")
    layers = hf.get("n_layer") or hf.get("num_hidden_layers")
    for key, value in (("n_embed/hidden_size", hidden), ("n_head/num_attention_heads", heads),
                       ("n_layer/num_hidden_layers", layers)):
        if not value:
            raise ValueError(f"BLOOM config.json has no {key}")
    if hidden % heads:
        raise ValueError(f"BLOOM config.json: hidden size {hidden} is not a multiple of n_head={heads}")
    return ModelConfig(
        family="bloom",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        # ALiBi has no position table; seq_length is the training context, the cache's size limit here.
        max_positions=hf.get("seq_length") or 2048,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=True,
        out_bias=True,
        activation="bloom_gelu",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
        extra={"apply_residual_connection_post_layernorm":
               bool(hf.get("apply_residual_connection_post_layernorm", False))},
    )


_READERS = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "opt": _opt,
    "gpt2": _gpt2,
    "bloom": _bloom,
}


def register_reader(model_type: str, reader) -> None:
    """Families added later (GPT-2, BLOOM) register how to read their config.json here."""
    _READERS[model_type] = reader
