"""The ``tabular`` recipe on raw public tables against scikit-learn's HistGradientBoosting, same split.

The tables are used as shipped (strings, gaps, a row-number column); the bar is the issue's: within
2 points of gradient boosting on the test rows. The comparison code is the benchmark's
(benchmarks/tabular_vs_hgb.py), so the numbers in benchmarks/RESULTS.md come from the same functions.
Diamonds runs on its first 4,000 rows here (the full table takes ~2 minutes; see RESULTS.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "tabular_vs_hgb.py"


def benchmark():
    spec = importlib.util.spec_from_file_location("tabular_vs_hgb", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*looks like a row id")
@pytest.mark.filterwarnings("ignore:.*have no value in the target")
@pytest.mark.parametrize(
    ("table", "limit"),
    [("penguins", None), ("penguins-mass", None), ("diamonds", 4000), ("diamonds-cut", 4000)],
)
def test_tabular_recipe_is_within_two_points_of_gradient_boosting(table: str, limit: int | None):
    bench = benchmark()
    ours, metric, _ = bench.gradwise_score(table, limit, [])
    theirs, _ = bench.hgb_score(table, limit)
    assert metric in ("test_accuracy", "test_r2")
    assert ours >= theirs - 0.02, f"{table}: gradwise {metric} {ours:.4f} vs HistGradientBoosting {theirs:.4f}"
