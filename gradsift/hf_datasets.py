"""🤗 ``datasets`` as a stream or a target set (optional: ``pip install gradsift[datasets]``).

:class:`DatasetStream` reads a ``datasets.Dataset`` or ``IterableDataset`` with the engine's
stream interface (``next_batch``, ``state_dict``, ``load_state_dict``): rows have the shapes of
gradsift's JSONL records (``text``; ``prompt`` + ``response``; ``messages``; optional ``id`` and
``source``) and go through the same tokenization, or are already tokenized (``input_ids`` and
optionally ``labels``). The position is resumable: the row index of a ``Dataset``, and
``IterableDataset.state_dict()`` of an iterable one.

A config's ``stream``/``target`` may name a dataset instead of a file (:func:`is_dataset_spec`):

* a folder written by ``Dataset.save_to_disk`` (read with ``load_from_disk``);
* ``json:PATH``, ``parquet:PATH``, ``csv:PATH``, ``arrow:PATH`` or ``text:PATH``: the builder of
  ``datasets.load_dataset`` on local files (``PATH`` may be a glob), streamed.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from gradsift.data import Example, encode
from gradsift.records import DataError, parse_record

logger = logging.getLogger(__name__)

BUILDERS = ("json", "parquet", "csv", "arrow", "text")
_SPEC = re.compile(rf"^({'|'.join(BUILDERS)}):(.+)$")


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ModuleNotFoundError(
            "reading a 🤗 datasets dataset needs the `datasets` package: "
            "pip install 'gradsift[datasets]'") from e
    return datasets


def is_dataset_spec(value: str) -> bool:
    """``json:PATH``-style builder specs and ``save_to_disk`` folders (not plain files)."""
    return bool(_SPEC.match(value)) or Path(value).is_dir()


def split_spec(value: str) -> tuple[str | None, str]:
    """``"json:data/*.jsonl"`` → ``("json", "data/*.jsonl")``; a folder → ``(None, folder)``."""
    match = _SPEC.match(value)
    return (match.group(1), match.group(2)) if match else (None, value)


def load_dataset_spec(value: str, streaming: bool = True) -> Any:
    """The dataset a spec names (see the module docstring).

    Raises:
        DataError: the folder is not a saved dataset, or the files cannot be read.
    """
    datasets = _require_datasets()
    builder, path = split_spec(value)
    try:
        if builder is None:
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"{path}: a DatasetDict without a 'train' split "
                                    f"(splits: {sorted(loaded)})")
                loaded = loaded["train"]
            return loaded
        return datasets.load_dataset(builder, data_files=path, split="train",
                                     streaming=streaming)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{value}: cannot be read as a dataset: {e}") from e


def row_to_example(row: dict[str, Any], index: int, name: str, tokenizer: Any,
                   max_length: int) -> Example | None:
    """One dataset row as an ``Example`` (None: no trainable token within ``max_length``).

    Raises:
        DataError: the row has none of the record shapes (names the row).
    """
    where = f"{name}[{index}]"
    if "input_ids" in row and row["input_ids"] is not None:
        ids = [int(t) for t in row["input_ids"]][:max_length]
        labels = row.get("labels")
        labels = list(ids) if labels is None else [int(t) for t in labels][:max_length]
        if len(labels) != len(ids):
            raise DataError(f"{where}: 'labels' and 'input_ids' differ in length")
        if all(t == -100 for t in labels[1:]):
            return None
        return Example(id=str(row.get("id", where)), source=str(row.get("source") or name),
                       input_ids=ids, labels=labels)
    record = parse_record(dict(row), where, default_id=where, default_source=name)
    return encode(record, tokenizer, max_length)


class DatasetStream:
    """A ``datasets.Dataset`` / ``IterableDataset`` (or a spec, see the module docstring) as a
    candidate stream with a resumable position.

    Args:
        dataset: the dataset, or a spec string.
        tokenizer: tokenizes rows that are not tokenized yet.
        max_length: longest example in tokens.
        skip_bad: skip malformed rows (counted) instead of raising ``DataError``.
        name: the rows' default ``source`` and the prefix of their default ids.
    """

    def __init__(self, dataset: Any, tokenizer: Any, max_length: int, skip_bad: bool = False,
                 name: str | None = None):
        if isinstance(dataset, str):
            name = name or split_spec(dataset)[1]
            dataset = load_dataset_spec(dataset)
        datasets = _require_datasets()
        self.dataset, self.tokenizer, self.max_length = dataset, tokenizer, max_length
        self.skip_bad, self.name = skip_bad, name or "dataset"
        self.iterable = isinstance(dataset, datasets.IterableDataset)
        self.index = 0  # rows consumed
        self._skips: Counter[str] = Counter()
        self._iterator: Any = None

    def _rows(self) -> Any:
        if self._iterator is None:
            self._iterator = (iter(self.dataset) if self.iterable else
                              (self.dataset[i] for i in range(self.index, len(self.dataset))))
        return self._iterator

    def next_batch(self, size: int) -> list[Example]:
        """The next ``size`` examples (fewer at the end, ``[]`` once exhausted)."""
        out: list[Example] = []
        rows = self._rows()
        while len(out) < size:
            try:
                row = next(rows)
            except StopIteration:
                break
            index = self.index
            self.index += 1
            try:
                example = row_to_example(row, index, self.name, self.tokenizer, self.max_length)
            except DataError as err:
                if not self.skip_bad:
                    raise
                self._skips["bad_record"] += 1
                logger.warning("skipped bad row: %s", err)
                continue
            if example is None:
                self._skips["no_trainable_tokens"] += 1
                continue
            out.append(example)
        return out

    def skipped_counts(self) -> dict[str, int]:
        return dict(self._skips)

    def state_dict(self) -> dict[str, Any]:
        """Rows consumed, skip counts and, for an ``IterableDataset``, its own state."""
        state: dict[str, Any] = {"index": self.index, "skipped": dict(self._skips)}
        if self.iterable:
            state["dataset"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the rows a :meth:`state_dict` had consumed."""
        self.index = int(state["index"])
        self._skips = Counter(state.get("skipped", {}))
        if self.iterable:
            self.dataset.load_state_dict(state["dataset"])
        self._iterator = None


def dataset_examples(dataset: Any, tokenizer: Any, max_length: int, skip_bad: bool = False,
                     name: str | None = None) -> tuple[list[Example], dict[str, int]]:
    """Every example of a (small) dataset or spec, e.g. a target set, and the skip counts.

    Raises:
        DataError: it yields no example.
    """
    stream = DatasetStream(dataset, tokenizer, max_length, skip_bad=skip_bad, name=name)
    examples: list[Example] = []
    while batch := stream.next_batch(256):
        examples += batch
    if not examples:
        raise DataError(f"{name or 'dataset'}: no usable example "
                        f"(skipped: {stream.skipped_counts() or 'none'})")
    return examples, stream.skipped_counts()
