"""Example streams: read JSONL/Parquet records lazily, tokenize them with loss masks, collate.

Each record is one example in one of three shapes (``None`` values count as absent):

* ``{"text": str}`` — loss on every token;
* ``{"prompt": str, "response": str}`` — ``prompt`` then ``response`` then the eos token,
  each part tokenized on its own (so the boundary is exact); loss on the response and eos;
* ``{"messages": [{"role": str, "content": str}, ...]}`` — rendered with the tokenizer's chat
  template; loss on the assistant turns only (their content and closing tokens, not the
  ``<|im_start|>assistant`` header).

Optional keys: ``"id"`` (str or int; default ``"<file name>:<line>"``), ``"source"`` (default
the file stem); other keys are kept in ``Example.meta``. Labels follow the Hugging Face
causal-LM convention: ``-100`` marks positions without loss and the shift happens inside the
loss (:func:`gradsift.loss.per_sample_loss`).

**Truncation policy**: a prompt/response record that is too long first loses the *start* of
its prompt (the end, next to the response, is kept), but the prompt keeps at least
``max_length // 2`` tokens; then every record keeps its first ``max_length`` tokens. So a long
prompt never crowds the response out entirely. A record left with no trainable position (no
label at positions ``1..T-1``, the ones that carry loss after the shift) is skipped and
counted under ``"no_trainable_tokens"`` with a warning naming file:line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradsift.loss import IGNORE_INDEX
from gradsift.records import DataError, Position, Record, RecordReader, read_records

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "Example",
    "ExampleStream",
    "Position",
    "Record",
    "RecordReader",
    "collate",
    "encode",
    "load_examples",
    "read_examples",
    "read_records",
]


@dataclass
class Example:
    """One tokenized example.

    Attributes:
        id: stable identifier, used by selection logs.
        source: label used by reports (e.g. ``"code"``).
        input_ids: token ids, at most ``max_length`` of them.
        labels: same length; the token id where the example carries loss, else ``-100``.
        meta: the record's other keys (e.g. ``{"wrong_answer": True}``).
    """

    id: str
    source: str
    input_ids: list[int]
    labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, trainable)`` pieces.

    The assistant turn ``i`` spans from the end of the rendering of ``messages[:i]`` with the
    generation prompt to the end of the rendering of ``messages[:i+1]``. Both renderings must
    be prefixes of the full one; if the generation prompt is not, the span starts after the
    rendering of ``messages[:i]`` (the header is then trained on too).
    """

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    cuts: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start_text = render(messages[:i], True)
        if not full.startswith(start_text):
            start_text = render(messages[:i], False)
        end_text = render(messages[: i + 1], False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        cuts.append((len(start_text), len(end_text)))
    pieces, pos = [], 0
    for start, end in cuts:
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    pieces.append((full[pos:], False))
    return [(text, trainable) for text, trainable in pieces if text]


def encode(record: Record, tokenizer: Any, max_length: int) -> Example | None:
    """Tokenize ``record`` with its loss mask, truncated by the policy in the module docstring.

    Returns:
        The example, or ``None`` when no trainable position is left after truncation.

    Raises:
        DataError: the tokenizer's chat template cannot render the record's messages.
    """
    if record.text is not None:
        ids = list(tokenizer(record.text, add_special_tokens=True)["input_ids"])
        pieces = [(ids, True)]
    elif record.messages is not None:
        try:
            segments = _chat_segments(list(record.messages), tokenizer)
        except Exception as err:  # template errors (e.g. jinja2's) name no record
            raise DataError(f"{record.location}: cannot render the chat: {err}") from err
        pieces = [(_tokenize(tokenizer, text), trainable) for text, trainable in segments]
    else:
        prompt_ids = list(tokenizer(record.prompt, add_special_tokens=True)["input_ids"])
        response_ids = _tokenize(tokenizer, record.response)
        if tokenizer.eos_token_id is not None:
            response_ids.append(tokenizer.eos_token_id)
        prompt_budget = max(max_length - len(response_ids), max_length // 2)
        pieces = [(prompt_ids[-prompt_budget:] if prompt_budget else [], False),
                  (response_ids, True)]
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trainable in pieces:
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Example(record.id, record.source, input_ids, labels, dict(record.meta))


class ExampleStream:
    """Tokenized examples from one file, read lazily, in order, once.

    ``stream.position`` after a batch can be passed as ``start`` to a new stream over the same
    file to continue exactly after that batch (or use :meth:`state_dict` /
    :meth:`load_state_dict`, which also carry the skip counts). ``skipped`` counts skips by
    reason: ``"bad_record"`` (only with ``skip_bad``), ``"blank_line"``,
    ``"no_trainable_tokens"``.

    Args:
        path: JSONL (``.jsonl``/``.json``/other) or Parquet (``.parquet``) file.
        tokenizer: a Hugging Face tokenizer (with a chat template for ``messages`` records).
        max_length: longest example in tokens (longer ones are cut on the right).
        skip_bad: skip malformed records (counted, logged) instead of raising ``DataError``.
        start: position to resume from (default: the beginning).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        max_length: int,
        skip_bad: bool = False,
        start: Position | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.reader = read_records(path, skip_bad=skip_bad, start=start)
        self._skips: Counter[str] = Counter()  # restored counts + encoding skips
        self.exhausted = False

    @property
    def position(self) -> Position:
        """Position just after the last record consumed (for exact resume)."""
        return self.reader.position

    @property
    def skipped(self) -> dict[str, int]:
        """Number of skipped records by reason."""
        return dict(self.reader.skipped + self._skips)

    def skipped_counts(self) -> dict[str, int]:
        """Same as :attr:`skipped` (method form)."""
        return self.skipped

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable resume state: the position and the skip counts so far."""
        pos = self.position
        return {"line": pos.line, "byte_offset": pos.byte_offset, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a stream over the same file."""
        self.reader.close()
        start = Position(int(state["line"]), int(state["byte_offset"]))
        self.reader = read_records(self.reader.path, skip_bad=self.reader.skip_bad, start=start)
        self._skips = Counter(state.get("skipped", {}))
        self.exhausted = False

    def close(self) -> None:
        """Close the underlying file (also done at the end of the stream)."""
        self.reader.close()

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        for record in self.reader:
            try:
                example = encode(record, self.tokenizer, self.max_length)
            except DataError as err:
                if not self.reader.skip_bad:
                    raise
                self._skips["bad_record"] += 1
                logger.warning("skipped bad record: %s", err)
                continue
            if example is not None:
                return example
            self._skips["no_trainable_tokens"] += 1
            logger.warning(
                "%s: skipped record %r: no trainable token within max_length=%d",
                record.location,
                record.id,
                self.max_length,
            )
        self.exhausted = True
        raise StopIteration

    def next_batch(self, size: int) -> list[Example]:
        """The next ``size`` examples (fewer at the end of the stream, ``[]`` once exhausted)."""
        batch = []
        for example in self:
            batch.append(example)
            if len(batch) == size:
                break
        return batch


def read_examples(
    path: str | Path,
    tokenizer: Any,
    max_length: int,
    skip_bad: bool = False,
    limit: int | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """All examples of a (small) file, e.g. the target set, and the skip counts by reason.

    Raises:
        DataError: the file is missing, unreadable, or yields no example.
    """
    stream = ExampleStream(path, tokenizer, max_length, skip_bad=skip_bad)
    examples = stream.next_batch(limit) if limit is not None else list(stream)
    stream.close()
    if not examples:
        raise DataError(f"{path}: no usable example (skipped: {stream.skipped or 'none'})")
    return examples, stream.skipped


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_length: int,
    skip_bad: bool = False,
    limit: int | None = None,
) -> list[Example]:
    """All examples of a (small) file, e.g. the target set; at most ``limit`` of them.

    Raises:
        DataError: the file is missing, unreadable, or yields no example.
    """
    return read_examples(path, tokenizer, max_length, skip_bad=skip_bad, limit=limit)[0]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Any]:
    """Right-pad examples into a batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` as (B, T) LongTensors (pads: id
        ``pad_token_id``, mask 0, label -100), with ``T`` the longest example, plus ``ids`` and
        ``sources`` (lists of str).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "ids": [ex.id for ex in examples],
        "sources": [ex.source for ex in examples],
    }


def join_batches(first: dict[str, Any], second: dict[str, Any], pad_token_id: int
                 ) -> dict[str, Any]:
    """Two collated batches as one: ``second``'s rows after ``first``'s, both right-padded to
    the wider one (pads: ``pad_token_id``, mask 0, label -100)."""
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]),
                                                   value=value) for b in (first, second)])
           for key, value in fill.items()}
    for key in ("ids", "sources"):
        if key in first and key in second:
            out[key] = [*first[key], *second[key]]
    return out


def split_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` rows of a collated batch (tensors and lists alike)."""
    return {key: value[:n] for key, value in batch.items()}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors moved to ``device`` (its lists as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
