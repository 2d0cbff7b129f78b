"""A new optimizer, a new model and a new hook each take one module and no edit elsewhere.

This module is that one module: it registers a sign-SGD optimizer, a two-layer "tiny" model and
a step-counting hook in-process, then trains, checkpoints and resumes a run that uses all three
through the public entry points only.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

from gradwise.config import MODELS, OPTIMIZERS, Component, ModelSection, OptimSection, validate
from gradwise.config.base import PositiveInt
from gradwise.errors import ConfigError
from gradwise.store.checkpoint import load_training_state, resolve_checkpoint
from gradwise.train.hooks import Hook
from gradwise.train.loop import fit
from gradwise.train.strategies import RunStrategy, register_strategy, unregister_strategy

# --------------------------------------------------------------------------- the plugin (one module)


class SignSGDConfig(OptimSection):
    """``sign_sgd``: θ ← θ − lr·sign(g) (Bernstein et al. 2018, "signSGD")."""

    name: Literal["sign_sgd"] = "sign_sgd"


class SignSGD(torch.optim.Optimizer):
    def __init__(self, groups: list[dict[str, Any]], lr: float) -> None:
        super().__init__(groups, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class TinyConfig(ModelSection):
    """``tiny``: one hidden layer of ``width`` units."""

    name: Literal["tiny"] = "tiny"
    width: PositiveInt = 8


class StepCounter(Hook):
    state_key: ClassVar[str | None] = "step_counter"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def after_optimizer_step(self, steps: int) -> None:
        self.seen.append(steps)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": torch.tensor(self.seen, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = [int(v) for v in state["seen"]]


COUNTERS: list[StepCounter] = []


def _counter_hooks(model: nn.Module, cfg: Any, total_steps: int) -> list[Hook]:
    COUNTERS.append(StepCounter())
    return [COUNTERS[-1]]


@pytest.fixture
def plugin():
    OPTIMIZERS.register(
        Component(SignSGDConfig, lambda groups, cfg: SignSGD(groups, cfg.lr), capabilities={"prepare": None})
    )
    MODELS.register(
        Component(
            TinyConfig,
            lambda cfg, info: nn.Sequential(
                nn.Linear(info.n_features, cfg.width), nn.ReLU(), nn.Linear(cfg.width, info.n_outputs)
            ),
        )
    )
    register_strategy(
        RunStrategy(section="step_counter", active=lambda cfg: cfg.model.name == "tiny", hooks=_counter_hooks)
    )
    COUNTERS.clear()
    yield
    OPTIMIZERS.unregister("sign_sgd")
    MODELS.unregister("tiny")
    unregister_strategy("step_counter")


# --------------------------------------------------------------------------- the proof


def _config(tmp_path, **extra: Any):
    raw = {
        "data": {"name": "wine"},
        "model": {"name": "tiny", "width": 6},
        "optim": {"name": "sign_sgd", "lr": 0.01},
        "batch": {"size": 32},
        "stop": {"max_steps": 6, "epochs": None},
        "eval": {"every_steps": 3},
        "checkpoint": {"min_interval_s": 0},
        "log": {"progress": False, "plots": False},
        "out_dir": str(tmp_path),
        **extra,
    }
    return validate(raw)


def test_registered_components_are_validated_and_listed(plugin):
    assert "sign_sgd" in OPTIMIZERS.names() and "tiny" in MODELS.names()
    with pytest.raises(ConfigError, match=r"model\.hidden does not apply to model\.name 'tiny'"):
        validate({"model": {"name": "tiny", "hidden": [4]}})
    with pytest.raises(ConfigError, match=r"optim\.betas does not apply to optim\.name 'sign_sgd'"):
        validate({"optim": {"name": "sign_sgd", "betas": [0.9, 0.99]}})


def test_a_run_trains_resumes_and_checkpoints_the_hook_with_the_registered_parts(plugin, tmp_path):
    cfg = _config(tmp_path)
    run = tmp_path / "run"
    fit(cfg, run)
    assert COUNTERS[-1].seen == [1, 2, 3, 4, 5, 6]
    state = load_training_state(resolve_checkpoint(run, "last"))
    assert state["step_counter"]["seen"].tolist() == [1, 2, 3, 4, 5, 6]

    # The same run stopped after 3 steps and resumed ends with the same weights and the hook's whole history.
    short = tmp_path / "short"
    fit(_config(tmp_path, stop={"max_steps": 3, "epochs": None}), short)
    fit(cfg, short, resume=True)
    assert COUNTERS[-1].seen == [1, 2, 3, 4, 5, 6]
    from gradwise.store.checkpoint import load_model_state

    full = load_model_state(resolve_checkpoint(run, "last"))
    resumed = load_model_state(resolve_checkpoint(short, "last"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_the_sign_update_is_what_ran(plugin, tmp_path):
    """One step of sign-SGD moves every weight by exactly ±lr (or 0 where the gradient is 0)."""
    from gradwise.train.setup import build_run

    cfg = _config(tmp_path, stop={"max_steps": 1, "epochs": None})
    before = {k: v.clone() for k, v in build_run(cfg).model.state_dict().items()}
    fit(cfg, tmp_path / "one")
    from gradwise.store.checkpoint import load_model_state

    after = load_model_state(resolve_checkpoint(tmp_path / "one", "last"))
    for key, value in before.items():
        moved = (after[key].double() - value.double()).abs()
        assert torch.all(torch.isclose(moved, torch.tensor(0.01, dtype=torch.float64)) | (moved == 0)), key
