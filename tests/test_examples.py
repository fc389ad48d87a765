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


def test_the_readme_library_snippet_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it as a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, check=True, cwd=tmp_path).stdout
    indices, weights = out.strip().splitlines()[-1].split("] [")
    chosen = [int(i) for i in indices.strip("[]").split(",") if i.strip()]
    assert 1 <= len(chosen) <= 4 and all(0 <= i < 12 for i in chosen)
    assert abs(sum(float(w) for w in weights.strip("[]").split(",")) - 1) < 1e-5
