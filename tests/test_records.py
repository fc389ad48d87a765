"""The record parser under fuzzing (hypothesis): no input raises anything but ``DataError``."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradsift.records import DataError, Record, parse_record, read_records

KEYS = ["text", "prompt", "response", "messages", "id", "source", "role", "content", "meta"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=5),
    max_leaves=20,
)
# objects that look like records more often than chance would make them
record_like = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5)
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                    st.sampled_from(["user", "assistant", ""]) | json_values),
                    max_size=3)


@settings(max_examples=300, deadline=None)
@given(obj=json_values | record_like | st.fixed_dictionaries({"messages": messages}))
def test_parse_record_raises_only_data_error(obj):
    try:
        record = parse_record(obj, "f.jsonl:1", "f.jsonl:1", "f")
    except DataError as err:
        assert str(err).startswith("f.jsonl:1")
    else:
        assert isinstance(record, Record) and isinstance(record.id, str)
        shapes = [record.text, record.prompt, record.messages]
        assert sum(s is not None for s in shapes) == 1


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))
    | json_values.map(lambda v: json.dumps(v).encode())
    | record_like.map(lambda v: json.dumps(v).encode()),
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=lines, skip_bad=st.booleans())
def test_reader_raises_only_data_error_and_counts_every_line(rows, skip_bad):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.jsonl"
        path.write_bytes(b"".join(r + b"\n" for r in rows))
        reader = read_records(path, skip_bad=skip_bad)
        got = []
        try:
            got = list(reader)
        except DataError as err:
            assert not skip_bad and f"{path}:" in str(err)
            return
        assert reader.position.line == len(rows)
        assert len(got) + sum(reader.skipped.values()) == len(rows)


def test_deeply_nested_json_is_a_data_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="deep.jsonl:1: invalid JSON: nested too deeply"):
        list(read_records(path))


@pytest.mark.parametrize("record", [
    {"prompt": "2+2?", "response": ""},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
])
def test_an_empty_response_warns(record, caplog):
    """Defect 11: an empty response trains on the end-of-sequence token alone."""
    with caplog.at_level(logging.WARNING, logger="gradsift.records"):
        parse_record(record, "f.jsonl:7", "f.jsonl:7", "f")
    assert "f.jsonl:7: " in caplog.text and "empty" in caplog.text
