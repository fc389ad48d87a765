"""gradsift.bench.capture_cost on the tiny model: both timings run, interleaved, and report."""

from __future__ import annotations

import pytest

from gradsift.bench import capture_cost


def test_capture_cost_reports_both_and_their_ratio(capsys) -> None:
    assert capture_cost.main(["--model", "tiny", "--batch-size", "2", "--seq-len", "16",
                              "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0]: line for line in out.splitlines() if ":" in line}
    for name in ("plain fwd+bwd", "capture"):
        runs = lines[name].split("runs ")[1].split()
        assert len(runs) == 3 and all(float(t) > 0 for t in runs)
    ratio = float(out.strip().splitlines()[-1].split()[-1])
    assert ratio > 0
    with pytest.raises(SystemExit):
        capture_cost.main(["--model", "tiny", "--repeats", "0"])
