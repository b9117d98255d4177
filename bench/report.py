"""What every bench script does with its numbers at the end: write them as JSON (folders made as needed)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, data, **kw) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, **kw) + "\n")
    return out
