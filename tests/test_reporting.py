"""report_to: the run log's scalars reach TensorBoard (read back with TensorBoard's own
reader and compared with metrics.jsonl / selections.jsonl); a missing backend package is one
line at start, before the run folder exists."""

from __future__ import annotations

import shutil
import sys

import pytest
from runfiles import one_thread, read_jsonl, selections, tiny_config, write_config, write_data

from gradsift import reporting
from gradsift.cli import main
from gradsift.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def expected_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """What the run's own logs say each tag must hold, step by step (nulls left out)."""
    metrics, chosen = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "selections.jsonl")
    pairs = {
        "train/loss": [(m["step"], m.get("train_loss")) for m in metrics],
        "train/learning_rate": [(m["step"], m.get("lr")) for m in metrics],
        "eval/target_loss": [(m["step"], m.get("target_loss")) for m in metrics],
        "train/n_selected": [(r["step"], len(r["selected_ids"])) for r in chosen],
        "train/rho": [(r["step"], r["rho"]) for r in chosen],
    }
    return {tag: [(s, v) for s, v in rows if v is not None] for tag, rows in pairs.items()}


def assert_same(got, want):
    assert sorted(got) == sorted(t for t, rows in want.items() if rows)
    for tag, rows in want.items():
        assert [s for s, _ in got.get(tag, [])] == [s for s, _ in rows], tag
        for (_, a), (_, b) in zip(got.get(tag, []), rows, strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9), tag  # TensorBoard keeps float32


def test_tensorboard_gets_every_step_and_a_resume_does_not_draw_steps_twice(tmp_path, data):
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=3, checkpoint_every=2))
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--set", "report_to=tensorboard",
                 "--out", str(out)]) == 0
    want = expected_scalars(out)
    assert [s for s, _ in want["eval/target_loss"]] == [0, 2, 3]
    assert [s for s, _ in want["train/n_selected"]] == [1, 2, 3]
    assert want["train/rho"], "ftw reports rho"
    assert_same(tensorboard_scalars(out), want)
    assert load_config(out / "config.yaml").report_to == ["tensorboard"]

    # killed after step 3's log but before the summary: resume replays step 3 from the
    # step-2 checkpoint; TensorBoard drops the first step 3 (purge_step), the logs likewise
    (out / "summary.json").unlink()
    assert main(["--quiet", "run", "--resume", str(out)]) == 0
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert_same(tensorboard_scalars(out), expected_scalars(out))


@pytest.mark.parametrize("backend,package", [("tensorboard", "tensorboard"),
                                             ("wandb", "wandb"), ("trackio", "trackio")])
def test_a_missing_backend_package_is_one_line_at_start(tmp_path, data, capsys, monkeypatch,
                                                        backend, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` fails as if absent
    config = write_config(tmp_path / "c.yaml", tiny_config(data, report_to=[backend]))
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"gradsift: error: config key 'report_to': {backend} needs the package "
                   f"{package}: pip install {package} (or remove {backend} from report_to)")
    assert not out.exists()  # preflight: nothing written


def test_report_to_follows_training_arguments(monkeypatch):
    assert load_config(None).report_to == []  # default: none
    for value, names in (("none", []), ("null", []), ("tensorboard", ["tensorboard"]),
                         ("[wandb, tensorboard]", ["tensorboard", "wandb"]),
                         ("tensorboard,wandb", ["tensorboard", "wandb"]), ("all", ["all"])):
        assert load_config(None, [f"report_to={value}"]).report_to == names, value
    with pytest.raises(ConfigError, match=r"'report_to': unknown backend 'tensorbord' \(did "
                                          r"you mean tensorboard\?\)"):
        load_config(None, ["report_to=tensorbord"])
    with pytest.raises(ConfigError, match="'report_to': 'none' cannot be combined"):
        load_config(None, ["report_to=[none, wandb]"])
    with pytest.raises(ConfigError, match="'report_to' must be a list"):
        load_config(None, ["report_to=3"])
    # all: every backend whose package imports, and no error for the others
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "trackio", None)
    assert reporting.check_report_to(["all"]) == [reporting.TensorBoardReporter]


def test_scalars_of_skips_nulls_and_unknown_logs():
    from gradsift.runlog import METRICS, SELECTIONS

    assert reporting.scalars_of(METRICS, {"step": 0, "target_loss": 2.5, "train_loss": None}) \
        == {"eval/target_loss": 2.5}
    assert reporting.scalars_of(SELECTIONS, {"step": 4, "selected_ids": [], "rho": None}) \
        == {"train/n_selected": 0.0}
    assert reporting.scalars_of("other.jsonl", {"step": 1, "train_loss": 1.0}) == {}


def test_compare_restarted_with_another_report_to_reuses_its_runs(tmp_path, data, capsys):
    """report_to only chooses where a run is logged: a compare restarted with another one
    reuses the finished runs, and a stopped run resumes logging to the requested backends."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=2))
    argv = ["--quiet", "compare", "--config", str(config), "--methods", "random",
            "--seeds", "0,1", "--out", str(tmp_path / "cmp")]
    assert main(argv) == 0
    finished, stopped = (tmp_path / "cmp" / "random" / f"seed_{s}" for s in (0, 1))
    first = selections(stopped)
    finished_log = (finished / "selections.jsonl").stat().st_mtime_ns
    # seed 1 was stopped after step 2's log, before its checkpoint and summary
    for name in ("summary.json", "checkpoints/step_000002"):
        path = stopped / name
        path.unlink() if path.is_file() else shutil.rmtree(path)
    assert main([*argv, "--set", "report_to=tensorboard"]) == 0, capsys.readouterr().err
    assert (finished / "selections.jsonl").stat().st_mtime_ns == finished_log  # reused
    assert load_config(finished / "config.yaml").report_to == []  # as it was logged
    assert selections(stopped) == first  # resumed at step 2
    assert load_config(stopped / "config.yaml").report_to == ["tensorboard"]
    assert [s for s, _ in tensorboard_scalars(stopped)["train/n_selected"]] == [2]
    assert not (finished / "tensorboard").exists()
    # any other key still counts
    assert main([*argv, "--set", "report_to=tensorboard", "--set", "lr=0.02"]) == 2
    assert "was made with another config (lr: 0.01 → 0.02)" in capsys.readouterr().err
