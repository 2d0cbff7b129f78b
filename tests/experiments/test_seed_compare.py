"""Multi-seed comparison: statistics against numpy/scipy, time to target, an end-to-end compare on digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_ind

from gradwise.config import read_yaml
from gradwise.errors import ConfigError
from gradwise.experiments.compare import (
    Target,
    compare_runs,
    mean_std,
    noise_test,
    parse_target,
    summarize,
    time_to_target,
)
from gradwise.report.curves import mean_band

QUIET = ["log.progress=false", "log.plots=false"]


def fake_run(path: Path, *, seed: int, test_acc: float, best: float, evals: list[tuple[int, float]]) -> Path:
    """A run directory as fit writes it: config.yaml, summary.json, metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"seed: {seed}\n")
    summary = {
        "status": "completed",
        "monitor": "val_accuracy",
        "mode": "max",
        "best": {"step": evals[-1][0], "value": best},
        "final": {"val_accuracy": best, "test_accuracy": test_acc},
        "steps": evals[-1][0],
        "wall_time_s": 0.01 * evals[-1][0],
    }
    (path / "summary.json").write_text(json.dumps(summary))
    lines = []
    for step in range(1, evals[-1][0] + 1):
        lines.append({"kind": "train", "step": step, "loss": 1.0 / step, "time": 0.01 * step})
    lines += [{"kind": "eval", "step": s, "split": "val", "val_accuracy": v} for s, v in evals]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_mean_and_sample_std_match_numpy():
    values = [0.91, 0.935, 0.92, 0.95]
    stats = mean_std(values)
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert stats["n"] == 4
    one = mean_std([0.9, None, float("nan")])
    assert one == {"mean": 0.9, "std": None, "n": 1, "values": [0.9]}


def test_parse_target_and_its_errors():
    assert parse_target("val_accuracy>=0.95") == Target("val_accuracy", ">=", 0.95)
    assert parse_target(" val_loss <= 1e-1 ") == Target("val_loss", "<=", 0.1)
    for bad in ("val_accuracy>0.9", "accuracy=0.9", "val_loss<=abc"):
        with pytest.raises(ConfigError, match="metric>=value"):
            parse_target(bad)


def test_time_to_target_from_a_hand_made_metrics_log(tmp_path: Path):
    run = fake_run(tmp_path / "r", seed=0, test_acc=0.9, best=0.97, evals=[(10, 0.8), (20, 0.96), (30, 0.97)])
    # first evaluation at or above 0.95 is step 20; the train line of step 20 says 0.2 s
    assert time_to_target(run, parse_target("val_accuracy>=0.95")) == {"step": 20, "seconds": pytest.approx(0.2)}
    assert time_to_target(run, parse_target("val_accuracy>=0.99")) is None
    assert time_to_target(run, parse_target("val_accuracy<=0.85")) == {"step": 10, "seconds": pytest.approx(0.1)}


def test_summarize_statistics_and_welch_test_on_synthetic_runs(tmp_path: Path):
    a_acc, b_acc = [0.90, 0.91, 0.905], [0.95, 0.96, 0.955]
    groups = {
        "a": [
            fake_run(tmp_path / f"a{i}", seed=i, test_acc=x, best=x + 0.01, evals=[(10, 0.5), (20, x)])
            for i, x in enumerate(a_acc)
        ],
        "b": [
            fake_run(tmp_path / f"b{i}", seed=i, test_acc=x, best=x + 0.01, evals=[(10, 0.96), (20, x)])
            for i, x in enumerate(b_acc)
        ],
    }
    report = summarize(groups, parse_target("val_accuracy>=0.95"))
    assert report["primary"] == "test_accuracy"
    a, b = report["strategies"]
    assert a["final"]["test_accuracy"]["mean"] == pytest.approx(np.mean(a_acc))
    assert a["final"]["test_accuracy"]["std"] == pytest.approx(np.std(a_acc, ddof=1))
    assert a["best"]["mean"] == pytest.approx(np.mean(a_acc) + 0.01)
    assert a["seeds"] == [0, 1, 2]
    assert (a["target"]["reached"], b["target"]["reached"]) == (0, 3)
    assert b["target"]["steps"]["mean"] == 10
    assert b["noise"]["verdict"] == "best"
    assert a["noise"]["p_value"] == pytest.approx(ttest_ind(a_acc, b_acc, equal_var=False).pvalue)
    assert a["noise"]["verdict"] == "worse"


def test_noise_test_edge_cases():
    assert noise_test([0.9], [0.8, 0.85]) is None
    assert noise_test([0.9, 0.9], [0.9, 0.9]) == 1.0
    assert noise_test([0.9, 0.9], [0.8, 0.8]) == 0.0
    a, b = [0.95, 0.96, 0.94], [0.955, 0.945, 0.96]
    p = noise_test(a, b)
    assert p == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue)
    assert p > 0.05


def test_mean_band_over_seeds_of_different_lengths():
    steps, mean, low, high = mean_band(
        [(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0])), (np.array([1, 3]), np.array([3.0, 5.0]))]
    )
    assert steps.tolist() == [1, 2, 3]
    assert mean.tolist() == pytest.approx([2.0, 3.0, 4.0])  # the second seed interpolated to 4.0 at step 2
    assert low.tolist() == [1.0, 2.0, 3.0] and high.tolist() == [3.0, 4.0, 5.0]
    steps, mean, _, _ = mean_band([(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0])), (np.array([1]), np.array([5.0]))])
    assert mean.tolist() == pytest.approx([3.0, 2.0, 3.0])  # a run that ended at step 1 counts only there


def write_recipe(path: Path, out_dir: Path, variants: dict) -> Path:
    lines = [
        "description: two strategies",
        "seed: 0",
        f"out_dir: {out_dir}",
        "data: {name: digits}",
        "model: {name: mlp, hidden: [32]}",
        "optim: {name: adam, lr: 0.01}",
        "stop: {epochs: 2}",
        "variants:",
    ]
    lines += [f"  {name}: {json.dumps(v)}" for name, v in variants.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_end_to_end_two_strategies_two_seeds_on_digits(tmp_path: Path):
    recipe = write_recipe(
        tmp_path / "two.yaml",
        tmp_path / "runs",
        {"adam": {}, "sgd": {"optim.name": "sgd", "optim.lr": 0.05}},
    )
    out = compare_runs([str(recipe)], seeds=2, target="val_accuracy>=0.5", overrides=QUIET)
    assert out == tmp_path / "runs" / "compare-two"
    for name in ("adam", "sgd"):
        for seed in (0, 1):
            run = out / name / f"seed-{seed}"
            assert read_yaml(run / "config.yaml")["seed"] == seed
            assert (run / "summary.json").is_file()
    report = json.loads((out / "compare.json").read_text())
    rows = {r["strategy"]: r for r in report["strategies"]}
    adam = json.loads((out / "adam" / "seed-1" / "summary.json").read_text())
    values = [
        json.loads((out / "adam" / f"seed-{s}" / "summary.json").read_text())["final"]["test_accuracy"] for s in (0, 1)
    ]
    assert rows["adam"]["final"]["test_accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert rows["adam"]["steps"]["mean"] == adam["steps"]
    assert "| adam | 2 |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 10_000
    # Run again: every seed is read, nothing retrained (the files are untouched).
    stamp = (out / "adam" / "seed-0" / "summary.json").stat().st_mtime_ns
    compare_runs([str(recipe)], seeds=2, overrides=QUIET)
    assert (out / "adam" / "seed-0" / "summary.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_identical_strategies_with_different_seeds_are_within_noise(tmp_path: Path):
    recipe = write_recipe(tmp_path / "same.yaml", tmp_path / "runs", {"first": {}, "again": {"seed": 10}})
    out = compare_runs([str(recipe)], seeds=2, out=tmp_path / "cmp", overrides=QUIET)
    rows = {r["strategy"]: r for r in json.loads((out / "compare.json").read_text())["strategies"]}
    assert rows["again"]["seeds"] == [10, 11]
    loser = next(r for r in rows.values() if r["noise"]["verdict"] != "best")
    assert loser["noise"]["verdict"] == "within noise"
    assert "within noise (p=" in (out / "compare.md").read_text()


def test_a_seed_directory_with_another_config_is_refused(tmp_path: Path):
    recipe = write_recipe(tmp_path / "one.yaml", tmp_path / "runs", {"adam": {}})
    seed_dir = tmp_path / "cmp" / "adam" / "seed-0"
    seed_dir.mkdir(parents=True)
    raw = read_yaml(recipe)
    raw.pop("variants")
    raw["optim"]["lr"] = 0.5
    import yaml

    (seed_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"holds a run with optim.lr=0.5"):
        compare_runs([str(recipe)], out=tmp_path / "cmp", overrides=QUIET)


def test_bad_targets_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="--seeds"):
        compare_runs(["digits-mlp"], seeds=0)
    with pytest.raises(ConfigError, match="no bundled recipe"):
        compare_runs(["no-such-recipe"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a run directory"):
        compare_runs([str(tmp_path / "empty")])
