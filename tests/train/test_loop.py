"""The one training loop: accumulation, resume, logging, stopping, failures."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from gradwise.config import validate
from gradwise.errors import TrainingError
from gradwise.optim.schedules import schedule_multiplier
from gradwise.store.checkpoint import load_model_state, load_training_state
from gradwise.train.loop import fit


def config(**sections):
    base = {
        "data": {"name": "digits", "limit": 400},
        "model": {"name": "mlp", "hidden": [32]},
        "optim": {"name": "sgd", "lr": 0.1},
        "batch": {"size": 32},
        "stop": {"epochs": 2},
        "log": {"progress": False, "plots": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(base)


def read_lines(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == kind]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(run_dir / "checkpoints" / "last")


@pytest.mark.parametrize("accumulate", [3, 5])
def test_accumulated_step_equals_the_large_batch_step(tmp_path: Path, accumulate: int):
    # float64 so that the only difference could be the accumulation itself; 32/3 and 32/5 are uneven splits.
    common = {"precision": "fp64", "optim": {"name": "momentum", "lr": 0.05}, "stop": {"max_steps": 6, "epochs": None}}
    fit(config(**common), tmp_path / "big")
    fit(config(**common, batch={"size": 32, "accumulate": accumulate}), tmp_path / "acc")
    big, acc = final_weights(tmp_path / "big"), final_weights(tmp_path / "acc")
    for key in big:
        torch.testing.assert_close(acc[key], big[key], rtol=1e-12, atol=1e-12)
    big_losses = [line["loss"] for line in read_lines(tmp_path / "big", "train")]
    acc_losses = [line["loss"] for line in read_lines(tmp_path / "acc", "train")]
    assert acc_losses == pytest.approx(big_losses, rel=1e-12)


RESUME_CASES = {
    "adamw-cosine-noise-dropout": {
        "model": {"name": "mlp", "hidden": [32], "dropout": 0.2},
        "optim": {"name": "adamw", "lr": 0.003},
        "regularize": {"weight_decay": 0.01},
        "noise": {"eta": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 5},
    },
    "ema-plateau-ramp-earlystop": {
        "optim": {"name": "momentum", "momentum_form": "ema", "lr": 0.3},
        "schedule": {"name": "plateau", "patience": 0, "factor": 0.5},
        "batch": {"size": 48, "ramp": {"start": 8, "steps": 12}, "lr_scaling": "sqrt"},
        "stop": {"epochs": 6, "patience": 2, "monitor": "val_loss"},
    },
    "muon-multipliers": {
        "model": {"name": "mlp", "hidden": [32, 16]},
        "optim": {"name": "muon", "lr": 0.01, "lr_multipliers": {"head.*": 0.5}},
        "regularize": {"weight_decay": 0.01},
    },
    "adaptive-accumulate-l1-clip-batchnorm": {
        "model": {"name": "mlp", "hidden": [32], "norm": "batch"},
        "optim": {"name": "adaptive", "lr": 0.5, "adaptive_beta": 0.1},
        "batch": {"size": 32, "accumulate": 2, "at_epochs": {1: 64}},
        "regularize": {"l1": 1e-4, "clip_grad_norm": 1.0},
        "schedule": {"name": "wsd", "warmup_steps": 3},
    },
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_mid_epoch_is_bit_exact(tmp_path: Path, case: str):
    # Dropout, shuffling and gradient noise draw random numbers; plateau, ramps and the stopper carry state:
    # resume must restore all of it.
    cfg = config(**{"eval": {"every_steps": 7}, "stop": {"epochs": 3}, **RESUME_CASES[case]})
    whole = fit(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_at_step_17() -> bool:
        calls["n"] += 1
        return calls["n"] == 17  # mid-epoch for every case above

    first = fit(cfg, tmp_path / "split", stop_requested=stop_at_step_17)
    assert first["status"] == "interrupted" and first["steps"] == 17
    state = load_training_state(tmp_path / "split" / "checkpoints" / "last")
    assert 0 < state["sampler"]["cursor"]
    second = fit(cfg, tmp_path / "split", resume=True)
    assert (second["steps"], second["status"]) == (whole["steps"], whole["status"])
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses_a = [line["loss"] for line in read_lines(tmp_path / "whole", "train")]
    losses_b = [line["loss"] for line in read_lines(tmp_path / "split", "train")]
    assert losses_a == losses_b  # and no step was logged twice


def test_logged_lr_is_the_schedule_at_every_step(tmp_path: Path):
    cfg = config(schedule={"name": "cosine", "warmup_steps": 4, "min_lr_ratio": 0.1}, stop={"epochs": 2})
    summary = fit(cfg, tmp_path / "run")
    logged = [line["lr"] for line in read_lines(tmp_path / "run", "train")]
    total = summary["total_steps"]
    expected = [0.1 * schedule_multiplier(step, total, cfg.schedule) for step in range(total)]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert logged[0] == pytest.approx(0.1 / 4)
    assert logged[3] == pytest.approx(0.1)


def test_batch_size_schedule_and_linear_lr_scaling(tmp_path: Path):
    cfg = config(batch={"size": 32, "at_epochs": {1: 64}, "lr_scaling": "linear"}, stop={"epochs": 2})
    fit(cfg, tmp_path / "run")
    lines = read_lines(tmp_path / "run", "train")
    assert [line["batch_size"] for line in lines] == [32] * 8 + [24] + [64] * 4 + [24]
    # Linear scaling doubles the LR with the batch; the short last batch of an epoch is not a batch change.
    assert [line["lr"] for line in lines] == pytest.approx([0.1] * 9 + [0.2] * 5)


def test_full_batch_gd_takes_one_step_per_epoch(tmp_path: Path):
    summary = fit(config(optim={"name": "gd", "lr": 0.5}, batch={"size": "full"}, stop={"epochs": 5}), tmp_path / "r")
    assert summary["steps"] == 5
    assert [line["batch_size"] for line in read_lines(tmp_path / "r", "train")] == [280] * 5
    assert len(read_lines(tmp_path / "r", "eval")) == 5


def test_early_stopping_records_why_and_restores_best(tmp_path: Path):
    # An LR this large makes val loss worse after the first evaluations.
    cfg = config(optim={"name": "sgd", "lr": 3.0}, stop={"epochs": 30, "patience": 2, "monitor": "val_loss"})
    summary = fit(cfg, tmp_path / "run")
    assert summary["status"] == "early_stopped"
    assert "did not improve for 2 evaluations" in summary["stop_reason"]
    assert summary["steps"] < summary["total_steps"]
    assert summary["final_weights"] == "best"
    assert summary["final"]["val_loss"] == pytest.approx(summary["best"]["value"], rel=1e-6)


def test_nan_loss_is_a_clear_error_and_keeps_the_run(tmp_path: Path):
    cfg = config(
        optim={"name": "sgd", "lr": 1e6},
        data={"name": "diabetes"},
        task={"kind": "regression"},
        eval={"every_steps": 1},
        stop={"epochs": 5},
    )
    with pytest.raises(TrainingError) as info:
        fit(cfg, tmp_path / "run")
    message = str(info.value)
    assert re.search(r"(training loss|val_loss) is (nan|inf) at step \d+", message)
    assert "at step" in message and "checkpoint 'last' (step " in message and "\n" not in message
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").exists()


def test_one_process_reads_losses_in_windows_and_still_names_the_step_that_went_nan(tmp_path: Path, monkeypatch):
    # Reading a loss makes the host wait for the device: one process settles every STOP_CHECK_STEPS steps
    # (or at an epoch end / evaluation), not every step. A NaN in the middle of a window is still reported
    # at its own step, and no record from it on is written.
    from gradwise.train import ledger, loop

    monkeypatch.setattr(loop, "SETTLE_EVERY_S", 1e9)  # only the step rules, whatever the machine's load
    settles = []
    real_settle = ledger.LossLedger.settle
    monkeypatch.setattr(
        ledger.LossLedger, "settle", lambda self, asked: settles.append(self.pending) or real_settle(self, asked)
    )
    cfg = config(batch={"size": 8}, stop={"epochs": 1})
    summary = fit(cfg, tmp_path / "clean")
    steps = summary["steps"]
    assert steps > 2 * loop.STOP_CHECK_STEPS
    assert len(settles) <= steps // loop.STOP_CHECK_STEPS + 3 and max(settles) == loop.STOP_CHECK_STEPS
    assert [line["step"] for line in read_lines(tmp_path / "clean", "train")] == list(range(1, steps + 1))
    assert all(isinstance(line["loss"], float) for line in read_lines(tmp_path / "clean", "train"))

    # Step 4 (0-based index 3) runs with a NaN weight, so its loss is NaN.
    from gradwise.train import setup

    real_build = setup.build_run

    def build(cfg, **kwargs):
        parts = real_build(cfg, **kwargs)
        real_step = loop._train_step

        def step(parts_, index, net, ctx):
            if index == 3:
                with torch.no_grad():
                    next(parts_.model.parameters()).fill_(float("nan"))
            return real_step(parts_, index, net, ctx)

        monkeypatch.setattr(loop, "_train_step", step)
        return parts

    monkeypatch.setattr(loop, "build_run", build)
    with pytest.raises(TrainingError, match=r"training loss is nan at step 4 "):
        fit(cfg, tmp_path / "nan")
    assert [line["step"] for line in read_lines(tmp_path / "nan", "train")] == [1, 2, 3]
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 4  # not the window's end, where it was read


def test_an_error_between_two_settlings_keeps_the_steps_before_it(tmp_path: Path, monkeypatch):
    from gradwise.train import loop

    monkeypatch.setattr(loop, "SETTLE_EVERY_S", 1e9)
    real_step = loop._train_step

    def step(parts, index, steps, ctx):
        if index == 9:
            raise RuntimeError("the device went away")
        return real_step(parts, index, steps, ctx)

    monkeypatch.setattr(loop, "_train_step", step)
    with pytest.raises(RuntimeError, match="the device went away"):
        fit(config(batch={"size": 8}, stop={"epochs": 1}), tmp_path / "run")
    lines = read_lines(tmp_path / "run", "train")
    assert [line["step"] for line in lines] == list(range(1, 10)) and all(math.isfinite(x["loss"]) for x in lines)


def test_clipping_logs_the_gradient_norm_of_every_step(tmp_path: Path):
    summary = fit(config(regularize={"clip_grad_norm": 1.0}, batch={"size": 8}, stop={"epochs": 1}), tmp_path / "run")
    norms = [line["grad_norm"] for line in read_lines(tmp_path / "run", "train")]
    assert len(norms) == summary["steps"] and all(isinstance(n, float) and n > 0 for n in norms)


def test_l2_penalty_in_the_loss_equals_torch_coupled_weight_decay(tmp_path: Path):
    # SGD on loss + (λ/2)|w|² must equal torch SGD(weight_decay=λ) on the loss; biases are exempt in ours,
    # so compare with a torch optimizer that decays only the weight matrices.
    lam = 0.05
    cfg = config(precision="fp64", regularize={"l2": lam}, stop={"max_steps": 4, "epochs": None})
    fit(cfg, tmp_path / "ours")
    from gradwise.train.setup import build_run

    parts = build_run(config(precision="fp64", stop={"max_steps": 4, "epochs": None}))
    model = parts.model
    decay = [p for name, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1]
    reference = torch.optim.SGD([{"params": decay, "weight_decay": lam}, {"params": no_decay}], lr=0.1)
    x = parts.data.train.x.double()
    y = parts.data.train.y
    for _ in range(4):
        indices, _ = parts.sampler.take(32)
        reference.zero_grad()
        parts.task.loss(model(x[indices]), y[indices]).backward()
        reference.step()
    ours = final_weights(tmp_path / "ours")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-12, atol=1e-12)


def test_variants_train_each_and_compare(tmp_path: Path):
    from gradwise.experiments.variants import run_variants

    raw = {
        "data": {"name": "digits", "limit": 300},
        "model": {"name": "mlp", "hidden": [16]},
        "stop": {"epochs": 1},
        "log": {"progress": False, "plots": False},
        "out_dir": str(tmp_path),
        "variants": {"sgd": {"optim.name": "sgd", "optim.lr": 0.1}, "adam": {"optim.name": "adam"}},
    }
    parent = run_variants(raw, validate(raw), "tour.yaml", "tour")
    table = json.loads((parent / "comparison.json").read_text())
    assert [row["variant"] for row in table] == ["sgd", "adam"]
    assert json.loads((parent / "sgd" / "summary.json").read_text())["optimizer"] == "sgd"
    assert (parent / "comparison.png").stat().st_size > 1000


def test_bf16_autocast_trains_as_well_as_fp32(tmp_path: Path):
    common = {"optim": {"name": "adam", "lr": 0.003}, "stop": {"epochs": 6}}
    fp32 = fit(config(**common), tmp_path / "fp32")
    summary = fit(config(precision="bf16", **common), tmp_path / "r")
    assert summary["final"]["test_accuracy"] >= fp32["final"]["test_accuracy"] - 0.03
    assert summary["final"]["test_accuracy"] >= 0.85
    weights = final_weights(tmp_path / "r")
    assert all(t.dtype == torch.float32 for t in weights.values())  # autocast, not a bf16 model


def test_deterministic_mode_gives_identical_runs(tmp_path: Path):
    cfg = config(deterministic=True, model={"name": "mlp", "hidden": [32], "dropout": 0.3})
    fit(cfg, tmp_path / "a")
    fit(cfg, tmp_path / "b")
    assert torch.are_deterministic_algorithms_enabled()
    fit(config(), tmp_path / "c")
    assert not torch.are_deterministic_algorithms_enabled()  # the global flag follows each run's config
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_noise_is_seeded_and_changes_the_trajectory(tmp_path: Path):
    noisy = config(noise={"eta": 0.05, "gamma": 0.55}, stop={"max_steps": 10, "epochs": None})
    fit(noisy, tmp_path / "a")
    fit(noisy, tmp_path / "b")
    fit(config(stop={"max_steps": 10, "epochs": None}), tmp_path / "quiet")
    a, b, quiet = (final_weights(tmp_path / n) for n in ("a", "b", "quiet"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], quiet[k]) for k in a)


def test_checkpoint_interval_defers_best_but_keeps_it_consistent(tmp_path: Path):
    cfg = config(checkpoint={"min_interval_s": 1e9}, stop={"epochs": 4})
    summary = fit(cfg, tmp_path / "r")
    ckpts = tmp_path / "r" / "checkpoints"
    assert {p.name for p in ckpts.iterdir() if p.is_symlink()} == {"last", "best"}
    from gradwise.experiments.evaluation import evaluate_run

    best = evaluate_run(tmp_path / "r", checkpoint="best", split="val")
    assert best.metrics["val_accuracy"] == pytest.approx(summary["best"]["value"])
    assert load_training_state(ckpts / "last")["counters"]["step"] == summary["steps"]


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"schedule": {"warmup_steps": 10_000}}, "schedule.warmup_steps: got 10000, but the run has only 18"),
        # 8 examples in 8 micro-batches: 1 each, every step (a short last step is lent examples, not refused).
        ({"model": {"name": "mlp", "hidden": [8], "norm": "batch"}, "batch": {"size": 8, "accumulate": 8}}, "of 8;"),
        ({"model": {"name": "mlp", "hidden": [8], "norm": "batch"}, "batch": {"size": 1}}, "at least 2 examples"),
    ],
)
def test_settings_that_would_fail_mid_run_are_refused_up_front(tmp_path: Path, sections, expected):
    from gradwise.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expected)):
        fit(config(**sections), tmp_path / "r")


def test_a_decay_that_never_fires_is_a_warning(tmp_path: Path):
    from gradwise.errors import GradwiseWarning

    with pytest.warns(GradwiseWarning, match="schedule.milestones: 500 is beyond the run's 18 steps"):
        fit(config(schedule={"name": "multistep", "milestones": [500]}), tmp_path / "r")


def test_hooks_see_every_step_and_evaluation_and_may_end_the_run(tmp_path: Path):
    from gradwise.train.loop import FitHooks

    seen_steps, seen_evals = [], []

    def after_step(step: int, loss: float) -> str | None:
        seen_steps.append((step, loss))
        return "range test diverged" if step == 12 else None

    summary = fit(config(eval={"every_steps": 5}), tmp_path / "a", hooks=FitHooks(after_step=after_step))
    assert summary["status"] == "stopped" and summary["stop_reason"] == "range test diverged"
    assert summary["steps"] == 12
    assert [s for s, _ in seen_steps] == list(range(1, 13))
    assert [line["loss"] for line in read_lines(tmp_path / "a", "train")] == [loss for _, loss in seen_steps]

    def after_eval(step: int, metrics: dict[str, float]) -> str | None:
        seen_evals.append((step, metrics["val_accuracy"]))
        return "pruned by the sweep" if step == 10 else None

    summary = fit(config(eval={"every_steps": 5}), tmp_path / "b", hooks=FitHooks(after_eval=after_eval))
    # The reason goes through the early stopper, as patience would: the best weights are restored.
    assert summary["status"] == "early_stopped" and summary["stop_reason"] == "pruned by the sweep"
    assert [s for s, _ in seen_evals] == [5, 10] and summary["steps"] == 10
    logged = [line["val_accuracy"] for line in read_lines(tmp_path / "b", "eval")]
    assert logged[:2] == [v for _, v in seen_evals]


@pytest.mark.parametrize("restore_best", [False, True])
def test_the_final_validation_is_scored_once_unless_other_weights_are_restored(tmp_path, monkeypatch, restore_best):
    """The last step's evaluation is of the final weights: the summary reuses it instead of a second pass."""
    import gradwise.train.loop as loop

    scored: list[str] = []
    real = loop.evaluate

    def counting(model, task, split, name, *args, **kwargs):
        scored.append(name)
        return real(model, task, split, name, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", counting)
    # lr 2.0 makes the last evaluation worse than an earlier one, so a best exists to restore.
    cfg = config(optim={"lr": 2.0}, stop={"epochs": 3, "restore_best": restore_best}, eval={"every_steps": 4})
    summary = fit(cfg, tmp_path / "run")
    evals = read_lines(tmp_path / "run", "eval")
    restored = summary["final_weights"] == "best"
    assert scored.count("val") == len(evals) + (1 if restored else 0) and scored.count("test") == 1
    if not restored:
        assert {k: v for k, v in evals[-1].items() if k.startswith("val_")} == {
            k: v for k, v in summary["final"].items() if k.startswith("val_")
        }
