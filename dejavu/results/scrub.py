"""Keep secrets out of everything we write: config dumps, summaries, W&B config and tables.

Two nets: values under secret-looking keys (``api_key``, ``password``, ``hf_token`` ...) are replaced, and
the values of secret-looking environment variables (``WANDB_API_KEY``, ``HF_TOKEN``, ``*_SECRET`` ...) are
cut out of every string wherever they appear, e.g. inside a command line or a URL.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

REDACTED = "<redacted>"

# Whole words only, so that stop_token_ids, num_token_peers or TOKENIZERS_PARALLELISM are left alone.
_SECRET_KEY = re.compile(r"(^|[_.-])(api[_-]?key|apikey|secret|secret[_-]?key|passw(or)?d|access[_-]?token|"
                         r"auth[_-]?token|hf[_-]?token|bearer[_-]?token|private[_-]?key|credentials?)($|[_.-])",
                         re.IGNORECASE)
_SECRET_ENV = re.compile(r"(^|_)(API_?KEY|TOKEN|SECRET|SECRET_KEY|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIALS?)($|_)",
                         re.IGNORECASE)
_MIN_SECRET_LEN = 8  # shorter values ("1", "true") would cut ordinary text to pieces


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-looking variables, longest first."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def scrub_text(text: str, secrets: list[str] | None = None) -> str:
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, REDACTED)
    return text


def scrub(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a plain (JSON/YAML-like) structure with secrets replaced by ``<redacted>``."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") and not isinstance(v, Mapping)
                    else scrub(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        return scrub_text(obj, secrets)
    return obj
