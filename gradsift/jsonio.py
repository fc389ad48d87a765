"""Strict JSON for logs and summaries: non-finite numbers become ``null``, files are replaced
atomically.

``json.dumps`` writes ``NaN`` and ``Infinity`` by default, which no strict JSON reader accepts.
Every file gradsift writes goes through :func:`json_safe` first; a record whose top-level
numbers were replaced names them in ``"nonfinite"`` (the reason the value is missing).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _plain(obj: Any) -> Any:
    """numpy / torch scalars and arrays as Python numbers and lists."""
    return obj.tolist() if hasattr(obj, "tolist") and callable(obj.tolist) else obj


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/±inf (also in numpy and torch values) replaced by ``None``."""
    obj = _plain(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _has_nonfinite(value: Any) -> bool:
    value = _plain(value)
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_nonfinite(v) for v in value)
    return False


def safe_record(record: dict[str, Any]) -> dict[str, Any]:
    """:func:`json_safe` of a log record, plus ``"nonfinite": [keys]`` naming the top-level
    keys whose value (or part of it) was NaN/inf and is now ``null``."""
    bad = [k for k, v in record.items() if _has_nonfinite(v)]
    out = json_safe(record)
    if bad:
        out["nonfinite"] = bad
    return out


def dumps_line(record: dict[str, Any]) -> str:
    """One strict JSON line (no NaN/Infinity tokens) for a ``.jsonl`` log, with the newline."""
    return json.dumps(safe_record(record), allow_nan=False) + "\n"


def write_json(path: str | Path, obj: dict[str, Any], indent: int = 1) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (temporary file, fsync, rename)."""
    return write_text_atomic(path, json.dumps(safe_record(obj), indent=indent,
                                              allow_nan=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old or the new
    file, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Replace ``path`` with one JSON object per line (keys sorted), atomically: processes that
    write the same file at once (suite shards building shared data) each rename a complete
    file of their own into place."""
    return write_text_atomic(path, "".join(
        json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: str | Path, error: type[Exception] = ValueError,
               require: str | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line (each with the key ``require``).

    Raises:
        error: a line is not JSON, not a JSON object, or lacks ``require`` (names file and line).
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or (require is not None and require not in row):
                what = "" if require is None else f" with a {require!r} key"
                raise error(f"{path}:{lineno}: expected a JSON object{what}")
            rows.append(row)
    return rows
