"""Session 32 (descriptive): ftw's ``factored_p`` against its exact ``P`` on the bundled
SmolLM2-135M, fully fine-tuned, at the states of one real run.

A run of exact ftw (the suite's ``steady`` code scenario, every parameter trained, lr 3e-5,
seed 0) takes STEPS steps; at each, the same selection context is also scored with
``factored_p``, and the two are compared: the fit error of ``P̃``, ``K`` (relative Frobenius
error, correlation of the off-diagonal cosines, the diagonal's ratios), ``b`` (must be equal),
the picks and weights, and the wall time of each selection.

    python docs/benchmarks/s32-2026-12-03/s32_factored.py OUT [--steps 6] [--threads 2]
        [--suite steady] [--scenario code]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gradsift.bench.scenarios import SUITES, build_data, choose_scenarios, make_trainer
from gradsift.models import load_model_and_tokenizer
from gradsift.objective import alignment_and_interaction, target_direction
from gradsift.optim_state import next_step_preconditioner
from gradsift.select import Selection, SelectionContext, Selector, get_selector


class Twin(Selector):
    """Exact ftw, whose choice the run takes; ``factored_p`` scored beside it."""

    def __init__(self) -> None:
        self.exact = get_selector("ftw")
        self.factored = get_selector("ftw", factored_p=True)
        self.config, self.name = self.exact.config, "ftw"
        self.needs_target, self.needs_grads = True, True
        self.needs = self.exact.needs
        self.rows: list[dict] = []

    @property
    def needs_target_samples(self) -> bool:
        return self.exact.needs_target_samples

    def select(self, ctx: SelectionContext) -> Selection:
        row: dict = {}
        picks = {}
        for name, sel in (("exact", self.exact), ("factored", self.factored)):
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            out = sel.select(replace(ctx, generator=gen))
            row[f"seconds_{name}"] = round(time.perf_counter() - t0, 3)
            picks[name] = out
            row[f"indices_{name}"] = out.indices.tolist()
            row[f"weights_{name}"] = [round(w, 4) for w in out.weights.tolist()]
        row["factored_log_rms"] = picks["factored"].diagnostics.get("factored_log_rms")
        row["scores_max_abs_diff"] = float((picks["exact"].scores
                                            - picks["factored"].scores).abs().max())
        row["scores_max_abs"] = float(picks["exact"].scores.abs().max())
        names = ctx.candidates.param_names
        state = ctx.optimizer_state
        if state.moments is not None:
            p, _ = next_step_preconditioner(state.moments, ctx.target_grad, names)
        else:
            p = {n: state.preconditioner[n] for n in names}
        g_hat = target_direction({n: ctx.target_grad[n] for n in names}, state, False)
        t0 = time.perf_counter()
        k_exact = alignment_and_interaction(ctx.candidates, g_hat, p).gram.double()
        t1 = time.perf_counter()
        k_fact = alignment_and_interaction(ctx.candidates, g_hat, p, factored=True).gram.double()
        t2 = time.perf_counter()
        dots = ctx.candidates.dot_dense({n: g_hat[n] * p[n] for n in names})
        t3 = time.perf_counter()
        del dots
        if state.moments is not None:
            next_step_preconditioner(state.moments, ctx.target_grad, names)
        t4 = time.perf_counter()
        row["seconds_products_exact_factored_b_only_p"] = [
            round(x, 3) for x in (t1 - t0, t2 - t1, t3 - t2, t4 - t3)]
        row["k_rel_frobenius_error"] = float((k_fact - k_exact).norm() / k_exact.norm())
        diag_e, diag_f = k_exact.diagonal(), k_fact.diagonal()
        ratio = (diag_f / diag_e).numpy()
        row["k_diag_ratio_min_median_max"] = [round(float(x), 4) for x in
                                              (ratio.min(), np.median(ratio), ratio.max())]
        off = ~np.eye(len(diag_e), dtype=bool)
        cos_e = (k_exact / torch.outer(diag_e.sqrt(), diag_e.sqrt())).numpy()[off]
        cos_f = (k_fact / torch.outer(diag_f.sqrt(), diag_f.sqrt())).numpy()[off]
        row["k_cosine_corr"] = round(float(np.corrcoef(cos_e, cos_f)[0, 1]), 4)
        row["k_cosine_max_abs_diff"] = round(float(np.abs(cos_e - cos_f).max()), 4)
        self.rows.append(row)
        return picks["exact"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suite", default="steady", help="smoke: a check of this script")
    parser.add_argument("--scenario", default="code")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite = replace(SUITES[args.suite], finetune="full", lr=3e-5)
    scenario = choose_scenarios(suite, [args.scenario])[0]
    data = build_data(scenario, suite, args.out / scenario.name / "data")
    base, tokenizer = load_model_and_tokenizer(suite.model, dtype=torch.float32)
    twin = Twin()
    trainer = make_trainer(base, tokenizer, scenario, suite, twin, 0, data, args.out / "run")
    for step in range(1, args.steps + 1):
        trainer.step()
        row = {"step": step, **twin.rows[-1]}
        print(json.dumps(row), flush=True)
    (args.out / "rows.json").write_text(json.dumps(twin.rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
