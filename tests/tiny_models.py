"""Tiny random checkpoints of each family, saved with transformers' own classes (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128)

# The prompts every token-equality test runs: unequal lengths, so the batch is right-padded and the
# slots decode at different positions.
REFERENCE_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [40]]
REFERENCE_NEW = 32


def llama(folder: Path, *, tied: bool = False, kv_heads: int = 2, bias: bool = True, layers: int = 4) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINY, "num_hidden_layers": layers}, num_key_value_heads=kv_heads,
                      intermediate_size=128, tie_word_embeddings=tied, attention_bias=bias,
                      rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(LlamaForCausalLM(cfg), folder)


def opt(folder: Path, *, pre_norm: bool = True, proj_dim: int | None = None, layers: int = 4) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=96, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    ffn_dim=128, max_position_embeddings=128, do_layer_norm_before=pre_norm,
                    word_embed_proj_dim=proj_dim or 64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(OPTForCausalLM(cfg), folder)


def _save(model, folder: Path) -> Path:
    torch.manual_seed(0)
    # Wider than the default init so that the next-token distribution is peaked, as in real models;
    # the comparison then tests the arithmetic rather than near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return Path(folder)


def hf_greedy(folder: Path, prompts: list[list[int]], new_tokens: int, dtype=torch.float64) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding in the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
        outs.append(y[0, len(ids):].tolist())
    return outs


# ---- GPT-2 and BLOOM -----------------------------------------------------------------------------------

def gpt2(folder: Path, *, layers: int = 4, heads: int = 4, hidden: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=96, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                     activation_function="gelu_new", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save_with_norms(GPT2LMHeadModel(cfg), folder)


def bloom(folder: Path, *, layers: int = 4, heads: int = 4, hidden: int = 64, post_ln_residual: bool = False) -> Path:
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=96, hidden_size=hidden, n_layer=layers, n_head=heads,
                      apply_residual_connection_post_layernorm=post_ln_residual,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save_with_norms(BloomForCausalLM(cfg), folder)


def _save_with_norms(model, folder: Path) -> Path:
    # _save's init gives LayerNorm gains near 1 only to names containing "norm"; GPT-2 and BLOOM call some
    # of theirs ln_1 / ln_2 / ln_f, which would otherwise get gains near 0 and a flat, near-tie output.
    _save(model, folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in f".{name}" and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
    model.save_pretrained(folder)
    return Path(folder)
