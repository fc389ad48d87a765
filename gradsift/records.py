"""Read example records from JSONL or Parquet files lazily, validate them, track the position.

A :class:`RecordReader` reads one file in order, once, never holding more than one line (or
one Parquet row batch) in memory, and keeps a :class:`Position` for exact resume. Malformed
records raise :class:`DataError` naming ``file:line`` (Parquet: the 1-based row number), or,
with ``skip_bad=True``, are counted in ``skipped["bad_record"]`` and logged as warnings.
Blank lines are not records: they are counted in ``skipped["blank_line"]``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PYARROW_INSTALL = "pip install pyarrow"
_SHAPES = "'text', 'prompt' + 'response', or 'messages'"


class DataError(ValueError):
    """A data file is missing, unreadable, empty, or holds a malformed record (says where)."""


@dataclass(frozen=True)
class Position:
    """Where a reader stands in its file.

    Attributes:
        line: lines (Parquet: rows) consumed so far, bad and blank ones included.
        byte_offset: JSONL byte offset of the next line, for an O(1) seek on resume; ``0``
            with ``line > 0`` (and always for Parquet) means "skip ``line`` lines/rows".
    """

    line: int = 0
    byte_offset: int = 0


@dataclass
class Record:
    """One validated record, in exactly one shape (the other shape fields are ``None``)."""

    id: str
    source: str
    location: str
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _str_field(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        problem = "missing" if value is None else f"must be a string, not {type(value).__name__}"
        raise DataError(f"{where}: key {key!r} {problem}")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for n, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: messages[{n}] must be an object")
        out.append({k: _str_field(msg, k, f"{where}: messages[{n}]") for k in ("role", "content")})
    if not any(msg["role"] == "assistant" for msg in out):
        raise DataError(f"{where}: 'messages' has no assistant turn, so nothing to train on")
    return out


def parse_record(obj: Any, location: str, default_id: str, default_source: str) -> Record:
    """Validate one decoded record (see :mod:`gradsift.data` for the shapes).

    Raises:
        DataError: not an object, unknown or ambiguous shape, missing or ill-typed keys.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{location}: record must be a JSON object, not {type(obj).__name__}")
    present = {k for k, v in obj.items() if v is not None}
    shapes = [
        name
        for name, keys in (
            ("text", {"text"}),
            ("prompt", {"prompt", "response"}),
            ("messages", {"messages"}),
        )
        if present & keys
    ]
    if len(shapes) != 1:
        kind = "unknown" if not shapes else "ambiguous"
        raise DataError(f"{location}: {kind} record shape, keys {sorted(present)}; need {_SHAPES}")
    record_id = obj.get("id", default_id)
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)
    if not isinstance(record_id, str):
        raise DataError(f"{location}: key 'id' must be a string or an integer")
    source = default_source if obj.get("source") is None else _str_field(obj, "source", location)
    known = {"id", "source", "text", "prompt", "response", "messages"}
    record = Record(record_id, source, location, meta={k: obj[k] for k in obj if k not in known})
    if shapes == ["text"]:
        record.text = _str_field(obj, "text", location)
    elif shapes == ["prompt"]:
        record.prompt = _str_field(obj, "prompt", location)
        record.response = _str_field(obj, "response", location)
        if not record.response.strip():
            logger.warning("%s: empty response: only the end-of-sequence token carries loss",
                           location)
    else:
        record.messages = _messages(obj["messages"], location)
        if any(m["role"] == "assistant" and not m["content"].strip() for m in record.messages):
            logger.warning("%s: an assistant turn is empty: only its closing tokens carry loss",
                           location)
    return record


class RecordReader:
    """Iterator over the records of one JSONL or Parquet file (see :func:`read_records`)."""

    def __init__(self, path: str | Path, skip_bad: bool = False, start: Position | None = None):
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.position = start or Position()
        self.skipped: Counter[str] = Counter()
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        self._parquet = self.path.suffix.lower() in (".parquet", ".pq")
        self._rows = self._parquet_rows() if self._parquet else self._jsonl_rows()

    def _jsonl_rows(self) -> Iterator[tuple[Any, int]]:
        try:
            handle = self.path.open("rb")
        except OSError as err:
            raise DataError(f"{self.path}: cannot read: {err}") from err
        line, offset = self.position.line, self.position.byte_offset
        if offset:
            handle.seek(offset - 1)
            if handle.read(1) != b"\n":
                raise DataError(f"{self.path}: resume offset {offset} is not at a line start")
        else:
            for _ in range(line):
                handle.readline()
        return self._read_lines(handle)

    def _read_lines(self, handle: Any) -> Iterator[tuple[Any, int]]:
        with handle:
            while raw := handle.readline():
                yield raw, handle.tell()

    def _parquet_rows(self) -> Iterator[tuple[Any, int]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{self.path}: reading Parquet needs pyarrow: {PYARROW_INSTALL}"
            ) from None
        try:
            batches = pq.ParquetFile(self.path).iter_batches(batch_size=1024)
        except Exception as err:  # pyarrow raises its own error types
            raise DataError(f"{self.path}: cannot read as Parquet: {err}") from err
        return self._read_batches(batches, to_skip=self.position.line)

    @staticmethod
    def _read_batches(batches: Any, to_skip: int) -> Iterator[tuple[Any, int]]:
        for batch in batches:
            if to_skip >= batch.num_rows:
                to_skip -= batch.num_rows
                continue
            for row in batch.slice(to_skip).to_pylist():
                yield row, 0
            to_skip = 0

    def close(self) -> None:
        """Close the file; the reader then yields nothing more."""
        self._rows.close()

    def __iter__(self) -> RecordReader:
        return self

    def __next__(self) -> Record:
        for raw, offset in self._rows:
            line = self.position.line + 1
            self.position = Position(line, offset)
            where = f"{self.path}:{line}"
            if not self._parquet and not raw.strip():
                self.skipped["blank_line"] += 1
                logger.debug("%s: blank line", where)
                continue
            try:
                obj = raw if self._parquet else json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                error = DataError(f"{where}: invalid JSON: {err}")
            except RecursionError:
                error = DataError(f"{where}: invalid JSON: nested too deeply")
            else:
                try:
                    return parse_record(obj, where, f"{self.path.name}:{line}", self.path.stem)
                except DataError as err:
                    error = err
            if not self.skip_bad:
                raise error
            self.skipped["bad_record"] += 1
            logger.warning("skipped bad record: %s", error)
        raise StopIteration


def read_records(
    path: str | Path, skip_bad: bool = False, start: Position | None = None
) -> RecordReader:
    """Records of a JSONL file (one object per line) or a Parquet file, lazily, in order.

    Args:
        path: the file; ``.parquet``/``.pq`` is read as Parquet (needs pyarrow), else JSONL.
        skip_bad: count and log malformed records instead of raising.
        start: resume position (a reader's ``.position`` after the last record it returned).

    Returns:
        A :class:`RecordReader`: iterate it; ``.position`` and ``.skipped`` follow along.

    Raises:
        DataError: the file is missing or unreadable (at once), or a record is malformed
            (when reached; not with ``skip_bad``).
    """
    return RecordReader(path, skip_bad=skip_bad, start=start)
