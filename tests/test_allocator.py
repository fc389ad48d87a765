"""The CPU allocator setting: fewer fresh pages per step, counted by the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradsift.config import ConfigError, load_config

_LOOP = """
import json, resource, sys, torch
from gradsift.allocator import tune_cpu_allocator
tuned = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
x = torch.randn(256, 256)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # warm up: the first step faults its pages in either way
    a = torch.ones(16 << 20); b = a * 2; del a, b
f0 = faults()
for _ in range(8):  # a "step": two 64 MiB tensors allocated, touched, freed
    a = torch.ones(16 << 20); b = a * 2; del a, b
print(json.dumps({"tuned": tuned, "faults": faults() - f0}))
"""


def _run(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _LOOP, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_reuses_pages_instead_of_faulting_fresh_ones() -> None:
    system, tuned = _run("system"), _run("tuned")
    assert tuned["tuned"] is True
    step = (128 << 20) // 4096  # one step's fresh 4 KiB pages
    # 8 steps x 128 MiB of fresh 4 KiB pages: ~260 000 faults when malloc maps and unmaps
    assert system["faults"] > 8 * step // 2
    # tuned: the heap grows once (one step's worth was measured, 32 768 faults), never every
    # step: at most two steps' worth over the eight
    assert tuned["faults"] <= 2 * step < system["faults"] / 2


def test_a_users_own_allocator_setting_is_left_alone() -> None:
    assert _run("tuned", MALLOC_MMAP_THRESHOLD_="65536")["tuned"] is False


def test_config_key_is_checked() -> None:
    assert load_config(None, ["cpu_allocator=system"]).cpu_allocator == "system"
    with pytest.raises(ConfigError, match="cpu_allocator"):
        load_config(None, ["cpu_allocator=jemalloc"])
