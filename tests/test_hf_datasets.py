"""🤗 datasets as stream and target: the same examples as gradsift's own reader, resumable."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from runfiles import read_jsonl, tiny_config, write_config, write_data  # noqa: E402

from gradsift.cli import main  # noqa: E402
from gradsift.data import ExampleStream  # noqa: E402
from gradsift.hf_datasets import DatasetStream, dataset_examples, is_dataset_spec  # noqa: E402
from gradsift.models import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _key(examples):
    return [(e.id, e.source, e.input_ids, e.labels) for e in examples]


def test_a_dataset_gives_the_examples_of_the_jsonl_reader(tmp_path, tokenizer):
    data = write_data(tmp_path / "d")
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(_rows(data / "stream.jsonl"))]
    (data / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = ExampleStream(data / "ids.jsonl", tokenizer, 32).next_batch(100)
    # a Dataset with the records' columns (a key a row lacks is None in that row)
    keys = sorted({k for r in rows for k in r})
    table = datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])
    got = DatasetStream(table, tokenizer, 32, name="stream").next_batch(100)
    for a, b in zip(_key(reference), _key(got), strict=True):
        assert a[0] == b[0] and a[2:] == b[2:]
    # already tokenized rows pass through unchanged
    tokenized = datasets.Dataset.from_list(
        [{"id": e.id, "input_ids": e.input_ids, "labels": e.labels} for e in reference])
    again = DatasetStream(tokenized, tokenizer, 32).next_batch(100)
    assert [(e.input_ids, e.labels) for e in again] == [(e.input_ids, e.labels)
                                                         for e in reference]


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_the_position_resumes_exactly(tmp_path, tokenizer, kind):
    data = write_data(tmp_path / "d", n_stream=30)
    spec = f"json:{data / 'stream.jsonl'}"
    assert is_dataset_spec(spec) and not is_dataset_spec(str(data / "stream.jsonl"))

    def make():
        if kind == "iterable":
            return DatasetStream(spec, tokenizer, 32)
        ds = datasets.load_dataset("json", data_files=str(data / "stream.jsonl"), split="train")
        return DatasetStream(ds, tokenizer, 32)

    whole = make()
    batches = [_key(whole.next_batch(4)) for _ in range(5)]
    first = make()
    first.next_batch(4), first.next_batch(4)
    state = json.loads(json.dumps(first.state_dict()))  # JSON, as a checkpoint stores it
    resumed = make()
    resumed.load_state_dict(state)
    assert [_key(resumed.next_batch(4)) for _ in range(3)] == batches[2:]


def test_the_command_reads_saved_datasets_and_specs(tmp_path, tokenizer):
    data = write_data(tmp_path / "d")
    datasets.Dataset.from_list(_rows(data / "target.jsonl")).save_to_disk(str(tmp_path / "tgt"))
    config = write_config(tmp_path / "c.yaml", tiny_config(
        stream=f"json:{data / 'stream.jsonl'}", target=str(tmp_path / "tgt"), steps=2,
        checkpoint_every=1))
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 0
    assert [r["step"] for r in read_jsonl(out / "selections.jsonl")] == [1, 2]
    (out / "summary.json").unlink()
    assert main(["--quiet", "run", "--resume", str(out)]) == 0  # resumes a dataset stream too
    target, _ = dataset_examples(str(tmp_path / "tgt"), tokenizer, 32)
    assert len(target) == len(_rows(data / "target.jsonl"))
