"""The JSON-lines input of the KV-CoE commands (`embed --jsonl`, `probe train --data`)."""

from __future__ import annotations

import json
from pathlib import Path

from kvzap_trt.errors import KvzapError


def read_jsonl(path: Path, needs: str = "") -> list[tuple[int, dict]]:
    """Lines of JSON objects, each with a non-empty string "text" (blank lines skipped) -> (line
    number, object) pairs. needs: what else a line must carry, for the error message."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KvzapError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KvzapError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise KvzapError(f'{path}:{n}: each line must be an object with a non-empty string "text"{needs}')
        rows.append((n, obj))
    if not rows:
        raise KvzapError(f"{path} holds no texts")
    return rows
