"""gradwise: train, fine-tune and compress PyTorch models, every strategy a switch in a YAML file.

The Python API (:mod:`gradwise.api`)::

    import gradwise

    run = gradwise.train("tabular", stop={"epochs": 20})
    run.predict("new_rows.csv")
    gradwise.load("runs/tabular-20261204-120000").evaluate("test")

Imported lazily: ``import gradwise`` stays instant, torch loads on the first call.
"""

from __future__ import annotations

from gradwise.api import Run, load  # light: torch loads on the first call, not here
from gradwise.api import _train_package as train  # the package gradwise.train, callable: see gradwise.api

__all__ = ["Run", "load", "train"]
