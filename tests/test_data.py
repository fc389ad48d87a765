"""Tests for gradsift.data / gradsift.records with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from gradsift.data import (
    DataError,
    ExampleStream,
    Position,
    collate,
    encode,
    load_examples,
    read_records,
)
from gradsift.loss import IGNORE_INDEX, per_sample_loss
from gradsift.models import load_tokenizer, tiny_llama

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "Now say bye."},
    {"role": "assistant", "content": "Bye, see you."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def labelled_runs(ex) -> list[list[int]]:
    """Maximal runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    return runs + ([current] if current else [])


def one_example(tmp_path, tok, row, max_length=256):
    path = write_jsonl(tmp_path / "f.jsonl", [row])
    return next(iter(ExampleStream(path, tok, max_length)))


def test_text_record_trains_on_every_token(tmp_path, tok):
    text = "The quick brown fox jumps over the lazy dog."
    ex = one_example(tmp_path, tok, {"text": text})
    assert ex.input_ids == tok(text)["input_ids"]
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.input_ids) == text
    assert (ex.id, ex.source, ex.meta) == ("f.jsonl:1", "f", {})


def test_prompt_response_trains_on_response_and_eos(tmp_path, tok):
    row = {"prompt": "Question: What is 2 + 3?\nAnswer:", "response": " 5", "id": 12,
           "source": "math", "wrong_answer": False}  # fmt: skip
    ex = one_example(tmp_path, tok, row)
    n_prompt = len(tok(row["prompt"])["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    [run] = labelled_runs(ex)
    assert tok.decode(run) == row["response"] + tok.eos_token
    assert tok.decode(ex.input_ids) == row["prompt"] + row["response"] + tok.eos_token
    assert (ex.id, ex.source, ex.meta) == ("12", "math", {"wrong_answer": False})


@pytest.mark.parametrize("with_system", [True, False])
def test_chat_trains_on_assistant_turns_only(tmp_path, tok, with_system):
    messages = CHAT if with_system else CHAT[1:]
    ex = one_example(tmp_path, tok, {"messages": messages})
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids) == rendered
    expected = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    assert [tok.decode(run) for run in labelled_runs(ex)] == expected
    unlabelled = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab < 0])
    assert "<|im_start|>assistant\n" in unlabelled and "Say hi." in unlabelled


def test_truncation_cuts_the_prompt_start_then_the_end(tmp_path, tok, caplog):
    prompt = "Tell me a long story about a dragon who lived in a cave by the sea."
    response = " Once upon a time there was a dragon."
    n_prompt = len(tok(prompt)["input_ids"])
    n_response = len(tok(response, add_special_tokens=False)["input_ids"]) + 1  # + eos
    row = {"prompt": prompt, "response": response}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    full = next(iter(ExampleStream(path, tok, 256)))
    assert full.input_ids[n_prompt:] == [t for t in full.labels if t >= 0]
    # room for the whole response: the prompt loses its start only
    length = n_prompt + n_response - 5
    cut = next(iter(ExampleStream(path, tok, length)))
    assert cut.input_ids == full.input_ids[5:]
    assert cut.labels == full.labels[5:]
    # tight: the prompt keeps max_length // 2 tokens (its end), the response its start
    length = 12
    cut = next(iter(ExampleStream(path, tok, length)))
    assert cut.input_ids == full.input_ids[n_prompt - 6 : n_prompt + 6]
    assert cut.labels == [-100] * 6 + full.input_ids[n_prompt : n_prompt + 6]


def test_untrainable_records_are_skipped_counted_and_logged(tmp_path, tok, caplog):
    chat = {"messages": [{"role": "user", "content": "a long question " * 10},
                         {"role": "assistant", "content": "short"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [chat, chat])
    stream = ExampleStream(path, tok, 8)  # chats keep their start: the answer is cut off
    with caplog.at_level(logging.WARNING):
        assert list(stream) == []
    assert stream.skipped == {"no_trainable_tokens": 2}
    assert f"{path}:1" in caplog.text and f"{path}:2" in caplog.text


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"prompt": "only a prompt"}', "'response' missing"),
    ('{"text": 5}', "must be a string"),
    ('{"foo": "bar"}', "unknown record shape"),
    ('{"text": "a", "prompt": "b", "response": "c"}', "ambiguous record shape"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "'content'"),
    ('{"text": "a", "id": [1]}', "'id'"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path, tok, line, reason):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "fine words"}, line, {"text": "also fine"}]
    )
    stream = ExampleStream(path, tok, 64)
    with pytest.raises(DataError) as err:
        stream.next_batch(3)
    assert f"{path}:2" in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_skipped_counted_and_logged(tmp_path, tok, caplog, line, reason):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "fine words"}, line, {"text": "also fine"}]
    )
    stream = ExampleStream(path, tok, 64, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        examples = stream.next_batch(3)
    assert [tok.decode(ex.input_ids) for ex in examples] == ["fine words", "also fine"]
    assert stream.skipped == {"bad_record": 1}
    assert f"{path}:2" in caplog.text


def test_target_set_errors_name_the_file(tmp_path, tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl"):
        load_examples(missing, tok, 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl.*no usable example"):
        load_examples(empty, tok, 64)
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "3"])
    with pytest.raises(DataError, match="bad.jsonl.*bad_record"):
        load_examples(only_bad, tok, 64, skip_bad=True)
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"line {i}"} for i in range(5)])
    assert [ex.id for ex in load_examples(good, tok, 64, limit=2)] == [
        "good.jsonl:1",
        "good.jsonl:2",
    ]


def mixed_rows() -> list:
    rows: list = []
    for i in range(12):
        if i % 3 == 0:
            rows.append({"text": f"Record number {i} is plain text."})
        elif i % 3 == 1:
            rows.append(
                {"prompt": f"Count to {i}:", "response": f" {' '.join(map(str, range(i)))}"}
            )
        else:
            rows.append({"messages": [{"role": "user", "content": f"Echo {i}"},
                                      {"role": "assistant", "content": str(i)}]})  # fmt: skip
    rows.insert(4, "")  # a blank line
    rows.insert(7, "not json")  # a bad line
    return rows


def test_resume_from_position_gives_the_same_next_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", mixed_rows())
    stream = ExampleStream(path, tok, 64, skip_bad=True)
    first = stream.next_batch(4)
    position, state = stream.position, json.loads(json.dumps(stream.state_dict()))
    rest = list(stream)
    assert len(first) == 4 and len(first) + len(rest) == 12
    assert stream.skipped == {"blank_line": 1, "bad_record": 1}
    for start in (position, Position(line=position.line)):  # seek, or skip lines
        again = list(ExampleStream(path, tok, 64, skip_bad=True, start=start))
        assert [(e.id, e.input_ids, e.labels) for e in again] == [
            (e.id, e.input_ids, e.labels) for e in rest
        ]
    restored = ExampleStream(path, tok, 64, skip_bad=True)
    restored.load_state_dict(state)
    assert [e.id for e in restored] == [e.id for e in rest]
    assert restored.skipped == stream.skipped
    with pytest.raises(DataError, match="not at a line start"):
        ExampleStream(path, tok, 64, start=Position(1, position.byte_offset - 1))


def test_next_batch_is_short_at_the_end(tmp_path, tok):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": f"number {i}"} for i in range(5)])
    stream = ExampleStream(path, tok, 64)
    assert [len(stream.next_batch(2)) for _ in range(4)] == [2, 2, 1, 0]
    assert stream.exhausted and stream.position.line == 5


def test_read_records_position_tracks_lines(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "a"}, "", {"text": "b"}])
    reader = read_records(path)
    assert next(reader).text == "a" and reader.position.line == 1
    assert next(reader).text == "b" and reader.position.line == 3
    assert reader.position.byte_offset == path.stat().st_size


def test_collate_pads_right_and_matches_unpadded_losses(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", mixed_rows()[:5])
    examples = ExampleStream(path, tok, 64, skip_bad=True).next_batch(4)
    batch = collate(examples, tok.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (4, width) and batch["input_ids"].dtype == torch.long
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        assert batch["input_ids"][row].tolist() == ex.input_ids + [tok.pad_token_id] * (width - n)
        assert batch["labels"][row].tolist() == ex.labels + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert batch["ids"] == [e.id for e in examples]
    assert batch["sources"] == ["c"] * 4
    model = tiny_llama(tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        padded = per_sample_loss(logits, batch["labels"])
        for row, ex in enumerate(examples):
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits
            expected = per_sample_loss(alone, torch.tensor([ex.labels]))[0]
            torch.testing.assert_close(padded[row], expected, rtol=1e-4, atol=1e-5)


def test_parquet_matches_jsonl(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [r for r in mixed_rows() if isinstance(r, dict)]
    keys = ["text", "prompt", "response", "messages"]
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=5)
    jsonl = write_jsonl(tmp_path / "s.jsonl", rows)
    from_parquet = list(ExampleStream(tmp_path / "s.parquet", tok, 64))
    from_jsonl = list(ExampleStream(jsonl, tok, 64))
    assert [(e.input_ids, e.labels) for e in from_parquet] == [
        (e.input_ids, e.labels) for e in from_jsonl
    ]
    assert from_parquet[0].id == "s.parquet:1"
    resumed = list(ExampleStream(tmp_path / "s.parquet", tok, 64, start=Position(line=7)))
    assert [e.input_ids for e in resumed] == [e.input_ids for e in from_jsonl[7:]]


def test_encode_directly(tok):
    from gradsift.records import parse_record

    record = parse_record({"text": "Hello"}, "x:1", "x:1", "x")
    assert encode(record, tok, 64) is None  # one token: nothing to predict after the shift
    record = parse_record({"text": "Hello world"}, "x:1", "x:1", "x")
    assert encode(record, tok, 64).labels == tok("Hello world")["input_ids"]


def test_chat_template_errors_name_the_record(tmp_path, tok):
    strict = load_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:]}])
    with pytest.raises(DataError, match=f"{path}:1.*unsupported role system"):
        ExampleStream(path, strict, 64).next_batch(2)
    stream = ExampleStream(path, strict, 64, skip_bad=True)
    [ex] = stream.next_batch(2)
    # this template has no generation prompt, so the "assistant: " header is trained on too
    runs = [strict.decode(run) for run in labelled_runs(ex)]
    assert runs == ["assistant: Hi!\n", "assistant: Bye, see you.\n"]
    assert stream.skipped == {"bad_record": 1}
