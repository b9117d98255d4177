"""Text <-> token ids through transformers.AutoTokenizer, with the model's chat template when asked."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(folder: str | os.PathLike | None, *, model_name: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint folder (converted GGUF folders carry theirs)."""
    if folder is None:
        raise ValueError(f"model {model_name!r} has no tokenizer (a shape-only entry, or a checkpoint folder "
                         "without tokenizer files); pass token ids instead of text")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder))


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids per prompt. chat=True wraps each prompt as one user turn in the model's chat template,
    followed by the assistant's generation prompt; a model without a template gets the plain text (with
    a warning)."""
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts, got a single string")
    if chat and not has_chat_template(tokenizer):
        warnings.warn("the model's tokenizer has no chat template; encoding the prompts as plain text",
                      stacklevel=2)
        chat = False
    out = []
    for prompt in prompts:
        if chat:
            # Render to text, then tokenize: apply_chat_template(tokenize=True) returns a list in
            # transformers 4 and a BatchEncoding in 5. The template already holds the special tokens
            # (BOS, role markers), so the tokenizer must not add its own.
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens; give a non-empty prompt")
        out.append(list(ids))
    return out


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
