"""gradsift.report on small but real run directories written here, numbers checked by hand."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import scipy.stats
import yaml

from gradsift.report import (
    MissingRunFileError,
    RunDirError,
    load_run,
    markdown_table,
    plots,
    report,
    summarize_compare,
    write_report,
    write_run_report,
)

B, K, STEPS = 4, 2, 4
SOURCES = ["code", "math"]
# held-out target loss at the evaluation steps 0, 2, 4 (eval_every=2), per (method, seed)
TARGET = {
    ("random", 0): {0: 2.0, 2: 1.8, 4: 1.6},
    ("random", 1): {0: 2.0, 2: 1.9, 4: 1.4},
    ("ftw", 0): {0: 2.0, 2: 1.5, 4: 1.2},
    ("ftw", 1): {0: 2.0, 2: 1.7, 4: 1.45},
}
COSINES = [0.3, -0.1, 0.2, None]  # ftw's logged cosines every step (None: undefined)
TOKENS_PER_STEP = {("random", 0): 100, ("random", 1): 105, ("ftw", 0): 75, ("ftw", 1): 85}


def write_run(run_dir: Path, method: str, seed: int, target: dict[int, float],
              tokens_per_step: int, steps: int = STEPS, b: int = B, k: int = K) -> Path:
    """A run directory in the engine's format. ``ftw*`` selects ``code`` candidates with
    weights (0.75, 0.25); ``random`` selects the first k with uniform weights. Timing: capture
    ``0.1·step``, target 0.02, selection 0.01, update 0.05 seconds. ``ftw`` logs the
    candidates' cosines ``COSINES``."""
    run_dir.mkdir(parents=True)
    config = {"method": method, "seed": seed, "model": "tiny", "candidates_per_step": b,
              "budget_per_step": k, "steps": steps, "eval_every": 2}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    metrics, selections = [], []
    for step in range(steps + 1):
        record = {"step": step, "trained_samples": step * k,
                  "trained_tokens": step * tokens_per_step, "train_loss": 2.1 - 0.05 * step,
                  "candidate_loss": 2.2 - 0.04 * step, "lr": 1e-4, "wall_seconds": 0.5 * step}
        if step in target:
            record["target_loss"] = target[step]
        metrics.append(record)
        if step == 0:
            continue
        ids = [f"s{step}_{i}" for i in range(b)]
        sources = [SOURCES[i % 2] for i in range(b)]
        if method.startswith("ftw"):
            selected, weights = [ids[0], ids[2]], [0.75, 0.25]
        else:
            selected, weights = ids[:k], [1.0 / k] * k
        selections.append({
            "step": step, "candidate_ids": ids, "candidate_sources": sources,
            "selected_ids": selected, "weights": weights,
            "scores": [0.1 * i if method.startswith("ftw") else None for i in range(b)],
            "losses": [2.0 + 0.1 * i for i in range(b)], "rho": 0.5 if method == "ftw" else None,
            "timing": {"capture": 0.1 * step, "target": 0.02, "selection": 0.01,
                       "update": 0.05},
            "diagnostics": {"cosines": COSINES[:b]} if method == "ftw" else {},
        })
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "selections.jsonl").write_text("".join(json.dumps(s) + "\n" for s in selections))
    summary = {"final_target_loss": target[max(target)], "trained_samples": steps * k,
               "trained_tokens": steps * tokens_per_step, "steps": steps,
               "wall_seconds": 0.5 * steps, "method": method, "seed": seed}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    for (method, seed), target in TARGET.items():
        write_run(tmp_path / method / f"seed_{seed}", method, seed, target,
                  TOKENS_PER_STEP[method, seed])
    return tmp_path


def test_summary_numbers_match_hand_computation(compare_dir: Path) -> None:
    summary = summarize_compare(compare_dir)
    assert json.loads((compare_dir / "summary.json").read_text()) == summary
    random, ftw = summary["methods"]["random"], summary["methods"]["ftw"]

    # final target loss: mean and sample std (ddof=1) over the two seeds
    assert random["final_target_loss"]["mean"] == pytest.approx((1.6 + 1.4) / 2)
    assert random["final_target_loss"]["std"] == pytest.approx(abs(1.6 - 1.4) / 2 ** 0.5)
    assert ftw["final_target_loss"]["mean"] == pytest.approx((1.2 + 1.45) / 2)
    assert ftw["final_target_loss"]["std"] == pytest.approx(abs(1.2 - 1.45) / 2 ** 0.5)

    # AUC: trapezoids over steps 0-2 and 2-4, divided by the span 4
    def auc(l0: float, l2: float, l4: float) -> float:
        return (2 * (l0 + l2) / 2 + 2 * (l2 + l4) / 2) / 4

    assert ftw["auc_target_loss"]["mean"] == pytest.approx(
        (auc(2.0, 1.5, 1.2) + auc(2.0, 1.7, 1.45)) / 2)
    assert random["auc_target_loss"]["mean"] == pytest.approx(
        (auc(2.0, 1.8, 1.6) + auc(2.0, 1.9, 1.4)) / 2)

    # random's final loss is 1.5: ftw seed 0 reaches it at step 2 (1.5 <= 1.5), seed 1 at step
    # 4; random seed 0 never does (1.6), seed 1 at step 4.
    assert summary["random_final_target_loss"] == pytest.approx(1.5)
    assert ftw["steps_to_random_final"] == {
        "mean": 3.0, "reached": 2, "n": 2, "per_seed": {"0": 2, "1": 4}}
    assert random["steps_to_random_final"] == {
        "mean": 4.0, "reached": 1, "n": 2, "per_seed": {"0": None, "1": 4}}

    assert ftw["trained_tokens_mean"] == pytest.approx((4 * 75 + 4 * 85) / 2)
    assert random["trained_tokens_mean"] == pytest.approx((4 * 100 + 4 * 105) / 2)
    assert ftw["wall_seconds_mean"] == pytest.approx(2.0)
    assert ftw["wall_seconds_per_step"] == pytest.approx(0.5)
    # capture is 0.1·step over steps 1..4: mean 0.25
    assert ftw["seconds_per_step"] == pytest.approx(
        {"capture": 0.25, "target": 0.02, "selection": 0.01, "update": 0.05, "total": 0.33})
    assert summary["skipped"] == []

    # paired: ftw (best mean final) − random per seed: final (1.2 − 1.6, 1.45 − 1.4)
    pairs = {p["metric"]: p for p in summary["paired"]}
    assert {(p["best"], p["other"]) for p in summary["paired"]} == {("ftw", "random")}
    final = pairs["final_target_loss"]
    d = [1.2 - 1.6, 1.45 - 1.4]
    half = 12.706204736174707 * abs(d[0] - d[1]) / 2 ** 0.5 / 2 ** 0.5  # t_{0.975, 1}·sd/√2
    assert final["mean"] == pytest.approx(sum(d) / 2)
    assert (final["lo"], final["hi"]) == pytest.approx((sum(d) / 2 - half, sum(d) / 2 + half))
    assert (final["n"], final["lower"], final["higher"]) == (2, 1, 1)
    assert final["sign_p"] == pytest.approx(1.0)
    assert pairs["auc_target_loss"]["mean"] == pytest.approx(
        (auc(2.0, 1.5, 1.2) - auc(2.0, 1.8, 1.6) + auc(2.0, 1.7, 1.45) - auc(2.0, 1.9, 1.4)) / 2)
    assert pairs["auc_target_loss"]["lower"] == 2


# each held-out example's final loss (step 4), averaging to TARGET's final losses
FINAL_EACH = {("ftw", 0): [1.0, 1.2, 1.4], ("ftw", 1): [1.25, 1.45, 1.65],
              ("random", 0): [1.6, 1.3, 1.9], ("random", 1): [1.4, 1.4, 1.4]}


def _write_eval_losses(run_dir: Path, final: list) -> None:
    ids = ["t0", "t1", "t2"]
    rows = [{"step": 0, "ids": ids, "losses": [2.0, 2.0, 2.0]},
            {"step": 4, "ids": ids, "losses": final}]
    (run_dir / "eval_losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_final_loss_is_also_paired_over_seeds_and_held_out_examples(compare_dir: Path) -> None:
    for (method, seed), final in FINAL_EACH.items():
        _write_eval_losses(compare_dir / method / f"seed_{seed}", final)
    summary = summarize_compare(compare_dir)
    pairs = {p["metric"]: p for p in summary["paired"]}
    got = pairs["final_target_loss"]["over_examples"]
    assert "over_examples" not in pairs["auc_target_loss"]
    # by hand: D = ftw − random = [[-0.6, -0.1, -0.5], [-0.15, 0.05, 0.25]], mean -0.175;
    # seed means -0.4, 0.05 (variance 0.10125); example means -0.375, -0.025, -0.125
    # (variance 0.0325); residuals 0, ±0.15 (sum of squares 0.09 over 2 degrees of freedom:
    # 0.045). Terms: 0.10125/2 − 0.045/6, 0.0325/3 − 0.045/6, 0.045/6
    seed_term, example_term, noise = 0.10125 / 2 - 0.0075, 0.0325 / 3 - 0.0075, 0.0075
    var = seed_term + example_term + noise
    # Satterthwaite's degrees of freedom: the mean squares 0.10125/2 (1 df), 0.0325/3 (2 df)
    # and 0.045/6 (2 df, coefficient −1)
    dof = var**2 / ((0.10125 / 2) ** 2 / 1 + (0.0325 / 3) ** 2 / 2 + 0.0075**2 / 2)
    half = scipy.stats.t.ppf(0.975, dof) * var ** 0.5
    assert got["mean"] == pytest.approx(-0.175)
    assert (got["lo"], got["hi"]) == pytest.approx((-0.175 - half, -0.175 + half))
    assert (got["n_seeds"], got["n_examples"]) == (2, 3)
    assert got["example_share"] == pytest.approx(example_term / var)
    assert ("paired ftw − random (final), over seeds and held-out examples: -0.1750"
            in markdown_table(summary))
    html = write_report(compare_dir).read_text()
    assert f"[{-0.175 - half:+.4f}, {-0.175 + half:+.4f}] (3 examples)" in html

    # one seed without the per-example log: no interval over examples, the rest unchanged
    (compare_dir / "random" / "seed_1" / "eval_losses.jsonl").unlink()
    pairs = {p["metric"]: p for p in summarize_compare(compare_dir)["paired"]}
    assert "over_examples" not in pairs["final_target_loss"]
    # a malformed record names the file and the step
    _write_eval_losses(compare_dir / "random" / "seed_1", [1.4, 1.4])
    with pytest.raises(RunDirError, match=r"random/seed_1/eval_losses.jsonl step 4: 3 ids"):
        summarize_compare(compare_dir)


def test_steps_to_random_final_is_null_without_random(tmp_path: Path) -> None:
    write_run(tmp_path / "ftw" / "seed_0", "ftw", 0, TARGET["ftw", 0], 75)
    write_run(tmp_path / "ftw" / "seed_1", "ftw", 1, TARGET["ftw", 1], 85)
    summary = summarize_compare(tmp_path)
    assert summary["random_final_target_loss"] is None
    reach = summary["methods"]["ftw"]["steps_to_random_final"]
    assert reach["mean"] is None and reach["reached"] == 0


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_write_report_embeds_plots(compare_dir: Path) -> None:
    path = write_report(compare_dir)
    assert path == compare_dir / "report.html"
    html = path.read_text()
    pngs = _embedded_pngs(html)
    assert len(pngs) == 5  # loss vs steps, loss vs tokens, sources, ftw weights, timing
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(png) > 10_000  # matplotlib drew something, not an empty canvas
    saved = sorted(p.name for p in (compare_dir / "plots").glob("*.png"))
    assert saved == sorted(["ftw_weights.png", "source_shares.png", "step_time.png",
                            "target_loss_vs_steps.png", "target_loss_vs_tokens.png"])
    assert "<table>" in html and "ftw" in html and "random" in html
    assert "Paired differences" in html and "ftw − random" in html
    assert (compare_dir / "summary.json").is_file()


def test_report_without_ftw_skips_weights_plot(tmp_path: Path) -> None:
    write_run(tmp_path / "random" / "seed_0", "random", 0, TARGET["random", 0], 100)
    html = write_report(tmp_path).read_text()
    assert len(_embedded_pngs(html)) == 4
    assert not (tmp_path / "plots" / "ftw_weights.png").exists()


def test_markdown_table_lists_each_method(compare_dir: Path) -> None:
    table = markdown_table(summarize_compare(compare_dir))
    lines = table.splitlines()
    assert lines[0].startswith("| method |")
    rows = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("|")}
    assert set(rows) == {"ftw", "random"}
    assert list(rows) == ["ftw", "random"]  # ordered by final target loss
    assert "1.3250 ± 0.1768" in rows["ftw"] and "3.0 (2/2)" in rows["ftw"]
    assert "4.0 (1/2)" in rows["random"]
    paired = [line for line in lines if line.startswith("paired ")]
    assert [line.split(":")[0] for line in paired] == ["paired ftw − random (final)",
                                                       "paired ftw − random (AUC)"]
    assert "-0.1750 [95% CI" in paired[0] and "over 2 seeds; lower on 1, higher on 1" in paired[0]


def test_missing_file_error_names_the_file(compare_dir: Path) -> None:
    (compare_dir / "ftw" / "seed_1" / "selections.jsonl").unlink()
    with pytest.raises(MissingRunFileError, match="selections.jsonl"):
        summarize_compare(compare_dir)


def test_skip_incomplete_counts_and_skips(compare_dir: Path, caplog) -> None:
    (compare_dir / "ftw" / "seed_1" / "summary.json").unlink()
    summary = summarize_compare(compare_dir, skip_incomplete=True)
    assert len(summary["skipped"]) == 1 and "summary.json" in summary["skipped"][0]["reason"]
    assert summary["methods"]["ftw"]["n_seeds"] == 1
    assert summary["methods"]["ftw"]["final_target_loss"] == {"mean": 1.2, "std": None}
    assert "skipped 1 of 4 runs" in caplog.text
    assert "1 incomplete run(s) skipped" in markdown_table(summary)


def test_malformed_line_error_names_file_and_line(compare_dir: Path) -> None:
    with open(compare_dir / "random" / "seed_0" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "trained_')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:6"):
        summarize_compare(compare_dir)


def test_run_report_and_dispatch(compare_dir: Path) -> None:
    run_dir = compare_dir / "ftw" / "seed_0"
    path = write_run_report(run_dir)
    assert path == run_dir / "report.html"
    pngs = _embedded_pngs(path.read_text())
    assert len(pngs) == 6 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert 'id="cosines"' in path.read_text()
    assert 'id="cosines"' not in write_run_report(compare_dir / "random" / "seed_0").read_text()
    assert report(run_dir) == run_dir / "report.html"
    assert report(compare_dir) == compare_dir / "report.html"
    with pytest.raises(FileNotFoundError, match="neither"):
        report(compare_dir / "plots")


def test_inconsistent_selection_record_is_reported(compare_dir: Path) -> None:
    path = compare_dir / "ftw" / "seed_0" / "selections.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["selected_ids"] = ["nope", records[1]["selected_ids"][1]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"selections\.jsonl step 2: selected ids not among"):
        write_report(compare_dir)


def test_run_report_of_a_run_still_in_progress(compare_dir: Path) -> None:
    run_dir = compare_dir / "ftw" / "seed_0"
    (run_dir / "summary.json").unlink()  # the run has not finished yet
    path = write_run_report(run_dir)
    assert len(_embedded_pngs(path.read_text())) == 6
    with pytest.raises(ValueError, match="summary.json"):
        summarize_compare(compare_dir)  # a comparison still needs finished runs


def test_cosine_plot_shows_each_candidate_once_selected_by_weight(compare_dir: Path) -> None:
    run_dir = compare_dir / "ftw" / "seed_0"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["method_options"] = {"min_cosine": 0.05}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    fig = plots.plot_run_cosines(load_run(run_dir))
    rest, chosen = fig.axes[0].collections
    steps = list(range(1, STEPS + 1))
    # ftw selects candidates 0 and 2 (weights 0.75, 0.25); candidate 3's cosine is None
    assert rest.get_offsets().tolist() == [[s, -0.1] for s in steps]
    assert chosen.get_offsets().tolist() == [[s, c] for s in steps for c in (0.3, 0.2)]
    assert chosen.get_sizes().tolist() == [60 * K * w for _ in steps for w in (0.75, 0.25)]
    assert [line.get_ydata()[0] for line in fig.axes[0].lines] == [0.0, 0.05]
    assert plots.plot_run_cosines(load_run(compare_dir / "random" / "seed_0")) is None
