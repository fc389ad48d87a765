"""Session 32 (descriptive): where ftw's selection spends its time in full fine-tuning of the
bundled SmolLM2-135M (the suite's steady code scenario, lr 3e-5, seed 0, 2 threads): cProfile
of the selections of steps 3 and 4. Output: ``profile-full-ftw.txt``.

    python docs/benchmarks/s32-2026-12-03/s32_profile.py > profile-full-ftw.txt
"""

import cProfile
import pstats
from dataclasses import replace
from pathlib import Path

import torch

from gradsift.bench.scenarios import SUITES, build_data, choose_scenarios, make_trainer
from gradsift.models import load_model_and_tokenizer
from gradsift.select import get_selector

torch.set_num_threads(2)
suite = replace(SUITES["steady"], finetune="full", lr=3e-5)
sc = choose_scenarios(suite, ["code"])[0]
out = Path("runs/s32-profile")
data = build_data(sc, suite, out / sc.name / "data")
base, tok = load_model_and_tokenizer(suite.model, dtype=torch.float32)
sel = get_selector("ftw")
tr = make_trainer(base, tok, sc, suite, sel, 0, data, out / "run")
tr.step()
tr.step()
orig = sel.select
prof = cProfile.Profile()
def wrapped(ctx):
    prof.enable()
    try:
        return orig(ctx)
    finally:
        prof.disable()
sel.select = wrapped
for _ in range(2):
    tr.step()
pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
