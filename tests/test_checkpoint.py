"""Checkpoints: written without ever losing the last good one, verified, fallen back from."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from gradsift import checkpoint as ckpt
from gradsift.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


@dataclass
class _State:
    step: int = 0
    trained_samples: int = 0
    log_offsets: dict = field(default_factory=dict)


class _Counter:
    """A stream or selector: just a resumable number."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


class StubTrainer:
    """What ``save_checkpoint`` / ``load_checkpoint`` read and write, on a 2-layer MLP."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        self.params = dict(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.scheduler = None
        self.target_grad = None
        self.device = torch.device("cpu")
        self.target_generator = torch.Generator().manual_seed(1)
        self.selector_generator = torch.Generator().manual_seed(2)
        self.state = _State()
        self.stream, self.selector = _Counter(), _Counter()

    def state_dict(self) -> dict:
        return {"params": {n: p.detach().clone() for n, p in self.params.items()},
                "target_grad": None,
                "torch": {"optimizer": self.optimizer.state_dict(),
                          "target_generator": self.target_generator.get_state(),
                          "selector_generator": self.selector_generator.get_state()},
                "info": {"trainer": asdict(self.state), "stream": self.stream.state_dict(),
                         "selector": self.selector.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.params) - set(state["params"])
        if missing:
            raise CheckpointError(f"the checkpoint lacks trainable parameters {sorted(missing)}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["torch"]["optimizer"])
        self.target_generator.set_state(state["torch"]["target_generator"])
        self.selector_generator.set_state(state["torch"]["selector_generator"])
        for key, value in state["info"]["trainer"].items():
            setattr(self.state, key, value)
        self.stream.load_state_dict(state["info"]["stream"])
        self.selector.load_state_dict(state["info"]["selector"])


    def advance(self) -> None:
        """One fake training step: parameters, optimizer state and counters all change."""
        loss = self.model(torch.randn(3, 8)).square().sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.state.step += 1
        self.state.trained_samples += 2
        self.stream.n += 4


def save(root: Path, trainer: StubTrainer, keep: int = 3) -> Path:
    return save_checkpoint(root, trainer.state.step, trainer.state_dict(), keep=keep)


def load(root: Path, trainer: StubTrainer, which: Path | None = None) -> Path:
    return load_checkpoint(root, which, restore=trainer.load_state_dict)[0]


def _run(root: Path, steps: int, keep: int = 5) -> StubTrainer:
    trainer = StubTrainer()
    for _ in range(steps):
        trainer.advance()
        save(root, trainer, keep=keep)
    return trainer


def _restored(root: Path) -> StubTrainer:
    fresh = StubTrainer(seed=99)
    load(root, fresh)
    return fresh


def _same_params(a: StubTrainer, b: StubTrainer) -> bool:
    return all(torch.equal(a.params[n], b.params[n]) for n in a.params)


def test_a_checkpoint_has_a_manifest_that_verifies(tmp_path):
    root = tmp_path / "ck"
    trainer = _run(root, 2)
    folder = root / "step_000002"
    assert (root / "latest").read_text() == "step_000002"
    assert verify_checkpoint(folder) is None
    assert {"trainable.safetensors", "state.pt", "state.json", "manifest.json"} <= {
        p.name for p in folder.iterdir()}
    back = _restored(root)
    assert _same_params(trainer, back) and back.state.step == 2 and back.stream.n == 8


def test_keep_only_the_newest_checkpoints(tmp_path):
    root = tmp_path / "ck"
    _run(root, 5, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000005"]


def test_saving_the_same_step_again_never_loses_the_last_good_one(tmp_path, monkeypatch):
    """Defect 5: the old code removed step_N before renaming the new one into place."""
    root = tmp_path / "ck"
    trainer = _run(root, 3)
    real_replace = os.replace

    def replace_fails_for_the_new_folder(src, dst):
        if Path(src).name == ".tmp-step_000003":
            raise OSError(28, "No space left on device")  # or a kill -9 right here
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_fails_for_the_new_folder)
    with pytest.raises(OSError):
        save(root, trainer)
    monkeypatch.undo()
    found = latest_checkpoint(root)
    assert found.name.endswith("step_000003") and verify_checkpoint(found) is None
    assert _restored(root).state.step == 3
    assert not list(root.glob(".tmp-*"))  # a failed write cleans up after itself
    trainer.advance()
    save(root, trainer)  # the next save tidies the aside copy away
    assert not list(root.glob(".old-*"))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        pos = len(data) - 5  # inside the tensor data, past the header
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1:])
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize(
    ("target", "how", "reason"),
    [
        ("trainable.safetensors", "truncate", "trainable.safetensors: "),
        ("trainable.safetensors", "flip", "trainable.safetensors: checksum mismatch"),
        ("state.pt", "truncate", "state.pt: "),
        ("state.json", "truncate", "state.json: "),
        ("manifest.json", "truncate", "manifest.json unreadable"),
        ("manifest.json", "delete", "no manifest.json"),
        ("state.pt", "delete", "state.pt: missing"),
    ],
)
def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, caplog, target, how,
                                                                 reason):
    """Defect 7: truncated, bit-flipped or missing files are caught by the manifest."""
    root = tmp_path / "ck"
    _run(root, 3)
    reference = StubTrainer(seed=99)
    load(root, reference, root / "step_000002")
    _damage(root / "step_000003" / target, how)
    assert reason in verify_checkpoint(root / "step_000003")
    with caplog.at_level(logging.WARNING, logger="gradsift.checkpoint"):
        back = _restored(root)
    assert back.state.step == 2 and _same_params(back, reference)
    assert "step_000003 is damaged" in caplog.text and reason in caplog.text
    # the damaged future is moved aside, so it neither wins again nor takes a retention slot
    assert (root / ".damaged-step_000003").is_dir() and not (root / "step_000003").exists()


@pytest.mark.parametrize("pointer", ["deleted", "garbage", "missing folder"])
def test_a_broken_latest_pointer_is_not_a_dead_end(tmp_path, pointer):
    root = tmp_path / "ck"
    _run(root, 2)
    if pointer == "deleted":
        (root / "latest").unlink()
    elif pointer == "garbage":
        (root / "latest").write_bytes(b"\x00\xff../../etc")
    else:
        (root / "latest").write_text("step_000099")
    assert _restored(root).state.step == 2


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    root = tmp_path / "ck"
    _run(root, 2)
    _damage(root / "step_000001" / "state.pt", "flip")
    _damage(root / "step_000002" / "trainable.safetensors", "truncate")
    with pytest.raises(CheckpointError) as err:
        _restored(root)
    text = str(err.value)
    assert "no intact checkpoint" in text and "step_000001: state.pt" in text
    assert "step_000002: trainable.safetensors" in text
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        load(tmp_path / "empty", StubTrainer())


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    root = tmp_path / "ck"
    _run(root, 1)
    other = StubTrainer()
    other.params = {"extra.weight": torch.nn.Parameter(torch.zeros(2)), **other.params}
    with pytest.raises(CheckpointError, match="lacks trainable parameters"):
        load(root, other)
