"""Every quality number in the README's recipe table is reproduced here, on the test split, within a stated tolerance.

The numbers are read from README.md itself, so a changed recipe and a stale README cannot both pass.
A row that states a decimal number must be checked here or be a bar with its own test
(``tests/recipes/test_recipes.py``); numbers that take minutes to reproduce live in
``benchmarks/RESULTS.md`` with their commands instead.

Tolerances: one or two test rows either way for an accuracy (270 digits: 1 image is 0.0037;
52 penguins: 1 bird is 0.019), 0.05 for an R² on diabetes' 66 test rows, 3 % for a perplexity.
CPU kernels differ between machines in summation order, so exact equality would be a test of the
machine, not the recipe.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gradwise.config import apply_overrides, read_yaml, validate
from gradwise.experiments.recipes import find_recipe
from gradwise.train.loop import fit

ROOT = Path(__file__).resolve().parents[2]
DECIMAL = r"(-?\d+\.\d+)"


@dataclass(frozen=True)
class Claim:
    """A phrase of the README row, the summary value it states, and how close a rerun must come."""

    pattern: str
    key: str  # "final.test_accuracy", "unigram_perplexity.value", or "reference" (computed by the check)
    tolerance: float
    relative: bool = False


@dataclass(frozen=True)
class Check:
    overrides: tuple[str, ...]
    claims: tuple[Claim, ...]


ACCURACY_1 = 0.01
CHECKS: dict[str, Check] = {
    "digits-cnn": Check(
        (),
        (
            Claim(rf"test accuracy {DECIMAL}", "final.test_accuracy", ACCURACY_1),
            Claim(rf"best val {DECIMAL}", "final.val_accuracy", ACCURACY_1),
        ),
    ),
    "digits-lenet300": Check((), (Claim(rf"test accuracy {DECIMAL}", "final.test_accuracy", ACCURACY_1),)),
    "diabetes-regression": Check(
        (),
        (
            Claim(rf"test R² {DECIMAL}", "final.test_r2", 0.05),
            Claim(rf"\(val {DECIMAL}", "final.val_r2", 0.05),
            Claim(rf"Ridge \(α = 1, same standardized features\) reaches {DECIMAL}", "reference", 0.005),
        ),
    ),
    "minilm-topics-probe": Check(
        (),
        (
            Claim(rf"test accuracy {DECIMAL}", "final.test_accuracy", 0.02),
            Claim(rf"macro-F1 {DECIMAL}", "final.test_macro_f1", 0.03),
        ),
    ),
    "tabular": Check(
        (),
        (
            Claim(rf"test accuracy {DECIMAL}", "final.test_accuracy", 0.02),
            Claim(rf"HistGradientBoosting on the same split {DECIMAL}", "reference", 0.005),
        ),
    ),
    "gpt-python": Check(
        ("stop.max_steps=200",),
        (
            Claim(rf"test perplexity {DECIMAL}", "final.test_perplexity", 0.03, relative=True),
            Claim(rf"unigram baseline of {DECIMAL}", "unigram_perplexity.value", 0.1),
        ),
    ),
}
# Rows whose number is a bar another test holds them to.
BARS = {
    "digits-mlp": "tests/recipes/test_recipes.py::test_digits_mlp_reaches_95_percent",
    "breast-cancer-l1l2": "tests/recipes/test_recipes.py::test_breast_cancer_with_l1_l2_and_early_stopping",
    "linear-gd-vs-sgd": "tests/recipes/test_recipes.py::test_linear_regression_recovers_slope_and_intercept...",
}


def recipe_rows() -> dict[str, str]:
    """Recipe name → the table's last cell ("measured"), for every row of the README's bundled-recipes table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("### Bundled recipes") :]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| `([\w-]+)`", line)
        if match:
            rows[match.group(1)] = line.strip()[1:-1].split("|")[-1].strip()  # the last cell, empty or not
        elif rows and not line.startswith("|"):
            break
    return rows


# Numbers in a row that are not results: sizes, settings and the commands they were measured with.
CONTEXT = (
    r"\(\d+ images\)", r"\(\d+ penguins\)", r"\d+ test rows", r"stop\.max_steps=\d+", r"[δα] = \d+",
    r"\d+ seeds", r"--seeds \d+", r"seed \d+", r"\d+ steps", r"F1\b",
)  # fmt: skip
NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"


def unchecked_numbers(name: str, measured: str) -> list[str]:
    """The numbers of a README row's "measured" cell that no claim checks and no context explains."""
    if name in BARS:
        return []  # a bar, held by its own test
    covered: list[tuple[int, int]] = []
    for claim in CHECKS[name].claims if name in CHECKS else ():
        covered += [m.span(1) for m in re.finditer(claim.pattern, measured)]
    for pattern in CONTEXT:
        covered += [m.span() for m in re.finditer(pattern, measured)]
    return [
        m.group()
        for m in re.finditer(NUMBER, measured)
        if not any(start <= m.start() and m.end() <= end for start, end in covered)
    ]


def test_the_guard_catches_a_number_nobody_checks():
    assert unchecked_numbers("digits-cnn", "test accuracy 0.996 (270 images), best val 0.993") == []
    assert unchecked_numbers("digits-cnn", "test accuracy 0.996, train loss 0.031") == ["0.031"]
    assert unchecked_numbers("digits-batch-ramp", "perplexity 144 after 3 seeds") == ["144"]
    assert unchecked_numbers("digits-mlp", "test accuracy ≥ 0.95 (a bar)") == []


def test_every_stated_number_is_checked():
    rows = recipe_rows()
    assert set(CHECKS) <= set(rows), f"README rows missing: {set(CHECKS) - set(rows)}"
    for name, measured in rows.items():
        assert not unchecked_numbers(name, measured), (
            f"README states {unchecked_numbers(name, measured)} for {name} ({measured!r}), which no test checks"
        )
    for name, check in CHECKS.items():
        for claim in check.claims:
            assert re.search(claim.pattern, rows[name]), f"{name}: the README row no longer says {claim.pattern!r}"
        for override in check.overrides:  # the row names the command it was measured with
            assert override in rows[name], f"{name}: the README row must name {override}"


def _value(summary: dict[str, Any], key: str) -> float:
    node: Any = summary
    for part in key.split("."):
        node = node[part]
    return float(node)


def _reference(name: str, run_dir: Path) -> float:
    """The scikit-learn figure a row compares with, on the run's own split."""
    if name == "diabetes-regression":
        from sklearn.linear_model import Ridge
        from sklearn.metrics import r2_score

        from gradwise.compress.runs import load_run_model

        _, data, _, _, _ = load_run_model(run_dir, "best")
        ridge = Ridge().fit(data.train.x.numpy(), data.train.y.numpy().ravel())
        return float(r2_score(data.test.y.numpy().ravel(), ridge.predict(data.test.x.numpy())))
    spec = importlib.util.spec_from_file_location("tabular_vs_hgb", ROOT / "benchmarks" / "tabular_vs_hgb.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.hgb_score("penguins", None)[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*looks like a row id")
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_readme_number_reproduces(name: str, tmp_path: Path):
    check = CHECKS[name]
    stated_row = recipe_rows()[name]
    recipe = find_recipe(name)
    raw = apply_overrides(read_yaml(recipe), [*check.overrides, "log.progress=false", "log.plots=false"])
    summary = fit(validate(raw, source=str(recipe)), tmp_path / name)
    for claim in check.claims:
        stated = float(re.search(claim.pattern, stated_row).group(1))
        got = _reference(name, tmp_path / name) if claim.key == "reference" else _value(summary, claim.key)
        tolerance = claim.tolerance * abs(stated) if claim.relative else claim.tolerance
        assert got == pytest.approx(stated, abs=tolerance), f"{name}: README says {stated} ({claim.key}), got {got:.4f}"
