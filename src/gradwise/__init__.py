"""gradwise: train, fine-tune and compress PyTorch models, every strategy a switch in a YAML file.

The Python API (:mod:`gradwise.api`)::

    import gradwise

    run = gradwise.train("tabular", stop={"epochs": 20})
    run.predict("new_rows.csv")
    gradwise.load("runs/tabular-20261204-120000").evaluate("test")

Imported lazily: ``import gradwise`` stays instant, torch loads on the first call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Run", "load", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gradwise import api

        return getattr(api, name)
    raise AttributeError(f"module 'gradwise' has no attribute {name!r}")
