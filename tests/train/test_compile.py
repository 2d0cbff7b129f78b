"""``model.compile``: the forward alone (``model``) or the whole step (``step``), with the eager run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradwise.config import validate
from gradwise.errors import GradwiseWarning
from gradwise.store.checkpoint import load_model_state
from gradwise.train import compiled
from gradwise.train.loop import fit

pytestmark = pytest.mark.slow  # inductor compiles C++ for every graph: tens of seconds on a small CPU


def config(**sections):
    base = {
        "data": {"name": "digits", "limit": 400},  # 280 training rows: batch 32 leaves a short last batch
        "model": {"name": "mlp", "hidden": [32]},
        "optim": {"name": "momentum", "lr": 0.05, "momentum": 0.9},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "regularize": {"clip_grad_norm": 1.0},
        "batch": {"size": 32},
        "stop": {"epochs": 2},
        "log": {"progress": False, "plots": False},
    }
    for key, value in sections.items():
        base[key] = value if key == "optim" else {**base.get(key, {}), **value}
    return validate(base)


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(run_dir / "checkpoints" / "last")


@pytest.mark.parametrize("optim", [{"name": "momentum", "lr": 0.05, "momentum": 0.9}, {"name": "adamw", "lr": 3e-3}])
def test_a_compiled_step_trains_as_the_eager_step_does(tmp_path: Path, optim: dict):
    eager = fit(config(optim=optim), tmp_path / "eager")
    step = fit(config(optim=optim, model={"compile": "step"}), tmp_path / "step")
    assert step["steps"] == eager["steps"] == 18
    # torch's momentum SGD compiles its update; the fused AdamW is one kernel already and stays so.
    assert step["compiled"] == {"loss_and_backward": True, "update": optim["name"] == "momentum"}
    # Inductor fuses and reorders float32 arithmetic: close to the eager run, not bit-equal to it.
    assert losses(tmp_path / "step") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-5)
    for name, value in weights(tmp_path / "eager").items():
        torch.testing.assert_close(weights(tmp_path / "step")[name], value, rtol=1e-4, atol=1e-5)
    assert step["final"]["test_accuracy"] == pytest.approx(eager["final"]["test_accuracy"], abs=0.01)


def test_a_compiled_run_resumes_bit_exactly(tmp_path: Path):
    cfg = config(model={"compile": "step"})
    whole = fit(cfg, tmp_path / "whole")
    calls = []
    # Stops after step 11: past the first epoch's short last batch, so the resumed half starts on a full one.
    part = fit(cfg, tmp_path / "split", stop_requested=lambda: calls.append(1) or len(calls) >= 11)
    assert part["status"] == "interrupted" and part["steps"] == 11
    resumed = fit(cfg, tmp_path / "split", resume=True)
    assert resumed["steps"] == whole["steps"]
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    for name, value in weights(tmp_path / "whole").items():
        assert torch.equal(weights(tmp_path / "split")[name], value), name


def test_a_step_that_cannot_compile_trains_eagerly_after_one_warning(tmp_path: Path, monkeypatch):
    fit(config(), tmp_path / "eager")

    def broken(fn, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("no C++ compiler\nsecond line")

        return fails

    monkeypatch.setattr(compiled.torch, "compile", broken)
    with pytest.warns(GradwiseWarning, match=r"model\.compile=step: torch\.compile could not compile the loss .*"
                      r"RuntimeError: no C\+\+ compiler\); training eagerly instead"):  # fmt: skip
        summary = fit(config(model={"compile": "step"}), tmp_path / "fallback")
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")
    assert summary["compiled"] == {"loss_and_backward": False, "update": False}


def test_an_optimizer_that_refuses_a_tensor_lr_keeps_its_update_eager(tmp_path: Path):
    # torch refuses a tensor LR for an explicit foreach=True: the loss compiles, the update stays eager.
    optim = {"name": "adam", "lr": 3e-3, "extra": {"fused": False, "foreach": True}}
    summary = fit(config(optim=optim, model={"compile": "step"}), tmp_path / "run")
    assert summary["compiled"] == {"loss_and_backward": True, "update": False}
    assert summary["status"] == "completed"


def test_compiling_the_forward_alone_keeps_the_eager_numbers_and_names(tmp_path: Path):
    eager = fit(config(), tmp_path / "eager")
    forward = fit(config(model={"compile": "model"}), tmp_path / "model")
    assert losses(tmp_path / "model") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4, abs=1e-5)
    assert set(weights(tmp_path / "model")) == set(weights(tmp_path / "eager"))
    assert forward["final"]["test_accuracy"] == pytest.approx(eager["final"]["test_accuracy"], abs=0.01)
