"""The examples a user copies from actually run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_online_loop_example_runs_and_selects_within_budget():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "online_loop.py"), "--model", "tiny",
         "--steps", "2"], capture_output=True, text=True, timeout=300, check=True).stdout
    steps = re.findall(r"^step (\d+): rho=.*, trained on (.*)$", out, flags=re.M)
    assert [s for s, _ in steps] == ["1", "2"]
    for _, picked in steps:
        assert picked == "nothing" or 1 <= picked.count("(w=") <= 2
    assert "target loss before" in out and "target loss after" in out

