"""End-to-end wiring: what ``fit`` logs and decides, against values recomputed by hand with plain torch.

The parts have their own tests (optimizers against torch.optim, schedules, the stopper on hand-worked
sequences); these run the real entry point on tiny data for a few steps and check that the loop joins the
parts the way the docs say: the loss it logs, the noise it adds, the LR it uses, when it stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gradwise.config import validate
from gradwise.store.checkpoint import load_model_state
from gradwise.store.rundir import read_metrics
from gradwise.train.batching import EpochSampler
from gradwise.train.loop import fit
from gradwise.train.setup import NOISE_SEED_OFFSET, SAMPLER_SEED_OFFSET, build_run

Weights = dict[str, torch.Tensor]
# Adds the noise of 0-based step t to the gradients (by parameter name) and returns them.
NoiseFn = Callable[[int, Weights], Weights]

COMMON = {
    "device": "cpu",
    "log": {"progress": False, "plots": False},
    "checkpoint": {"min_interval_s": 0},
}


def config(**sections: Any):
    """A tiny fp64 linear regression (42 training rows), with ``sections`` merged over it."""
    raw: dict[str, Any] = {
        **COMMON,
        "precision": "fp64",
        "data": {"name": "linear", "n_samples": 60},
        "model": {"name": "linear"},
        "optim": {"name": "sgd", "lr": 0.1},
        "batch": {"size": "full"},
        "stop": {"epochs": None, "max_steps": 4},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(raw)


def start_of(cfg) -> tuple[Weights, torch.Tensor, torch.Tensor, list[str]]:
    """The initial weights (seeded as ``fit`` seeds), the fp64 training set and the optimizer's parameter order."""
    parts = build_run(cfg)
    start = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}
    names = {id(p): name for name, p in parts.model.named_parameters()}
    order = [names[id(p)] for group in parts.optimizer.param_groups for p in group["params"]]
    x = parts.data.train.x.to(torch.float64)
    y = parts.data.train.y.to(torch.float64)
    return start, x, y, order


def sgd_replay(
    start: Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Sequence[torch.Tensor],
    lrs: Sequence[float],
    noise: NoiseFn | None = None,
) -> tuple[list[float], Weights]:
    """Plain SGD on ``y ≈ x Wᵀ + b`` with the MSE loss: the loss before every step and the final weights."""
    w = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    losses = []
    for t, (rows, lr) in enumerate(zip(batches, lrs, strict=True)):
        out = x[rows] @ w["head.weight"].T + w["head.bias"]
        loss = ((out - y[rows]) ** 2).mean()
        losses.append(float(loss.detach()))
        grads = dict(zip(w, torch.autograd.grad(loss, list(w.values())), strict=True))
        if noise is not None:
            grads = noise(t, grads)
        with torch.no_grad():
            for k in w:
                w[k] -= lr * grads[k]
    return losses, {k: v.detach() for k, v in w.items()}


def assert_weights_close(actual: Weights, expected: Weights) -> None:
    assert set(actual) == set(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-10, atol=1e-12)


def max_difference(a: Weights, b: Weights) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def last_weights(run_dir: Path) -> Weights:
    return load_model_state(run_dir / "checkpoints" / "last")


# --------------------------------------------------------------------------- 1. the logged loss


def test_logged_loss_is_the_mse_of_the_weights_before_each_step(tmp_path: Path):
    # Batches of 10 over 42 rows: four full ones, the short tail of 2, then the next epoch's first.
    cfg = config(batch={"size": 10}, stop={"max_steps": 6})
    start, x, y, _ = start_of(cfg)
    sampler = EpochSampler(len(y), seed=cfg.seed + SAMPLER_SEED_OFFSET)
    batches = [sampler.take(10)[0] for _ in range(6)]
    assert [len(b) for b in batches] == [10, 10, 10, 10, 2, 10]
    losses, final = sgd_replay(start, x, y, batches, [0.1] * 6)

    fit(cfg, tmp_path / "run")
    train, _ = read_metrics(tmp_path / "run")
    assert [line["step"] for line in train] == [1, 2, 3, 4, 5, 6]
    assert [line["batch_size"] for line in train] == [10, 10, 10, 10, 2, 10]
    assert [line["loss"] for line in train] == pytest.approx(losses, rel=1e-12)
    # The first loss is that of the initial weights on the first batch, computed with no replay at all.
    first = F.mse_loss(x[batches[0]] @ start["head.weight"].T + start["head.bias"], y[batches[0]])
    assert train[0]["loss"] == pytest.approx(float(first), rel=1e-12)
    assert_weights_close(last_weights(tmp_path / "run"), final)


def test_accumulated_uneven_micro_batches_log_the_full_batch_mean(tmp_path: Path):
    # 7 rows in 3 micro-batches (3, 2, 2): the mean of the micro-batch means is not the batch mean.
    cfg = config(batch={"size": 7, "accumulate": 3}, stop={"max_steps": 2})
    start, x, y, _ = start_of(cfg)
    sampler = EpochSampler(len(y), seed=cfg.seed + SAMPLER_SEED_OFFSET)
    batches = [sampler.take(7)[0] for _ in range(2)]
    losses, final = sgd_replay(start, x, y, batches, [0.1] * 2)

    squared = ((x[batches[0]] @ start["head.weight"].T + start["head.bias"] - y[batches[0]]) ** 2).reshape(-1)
    mean_of_means = float(torch.stack([part.mean() for part in torch.tensor_split(squared, 3)]).mean())
    assert abs(mean_of_means - losses[0]) > 1e-6 * losses[0]  # the two conventions are told apart

    fit(cfg, tmp_path / "run")
    train, _ = read_metrics(tmp_path / "run")
    assert [line["loss"] for line in train] == pytest.approx(losses, rel=1e-12)
    assert_weights_close(last_weights(tmp_path / "run"), final)


# --------------------------------------------------------------------------- 2. language-model loss per token


def test_language_model_loss_is_the_mean_token_cross_entropy(tmp_path: Path):
    seq_len, rows = 16, 5
    cfg = validate(
        {
            **COMMON,
            "precision": "fp64",
            "data": {"name": "python_source", "corpus_chars": 10_000, "vocab_size": 300, "seq_len": seq_len},
            "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16},
            "task": {"kind": "language_modeling"},
            "optim": {"name": "sgd", "lr": 0.1},
            # 5 rows in micro-batches of 3 and 2: a per-row or per-micro-batch mean would differ.
            "batch": {"size": rows, "accumulate": 2},
            "stop": {"epochs": None, "max_steps": 1},
        }
    )
    parts = build_run(cfg)
    vocab = parts.data.info.vocab_size
    assert vocab is not None
    sampler = EpochSampler(len(parts.data.train.y), seed=cfg.seed + SAMPLER_SEED_OFFSET)
    batch = sampler.take(rows)[0]
    x, y = parts.data.train.x[batch], parts.data.train.y[batch]
    assert y.shape == (rows, seq_len) and bool((y >= 0).all())  # every position is a target token
    parts.model.eval()  # dropout is 0: the same forward as in training
    with torch.no_grad():
        logits = parts.model(x)
    token_mean = float(F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)))

    fit(cfg, tmp_path / "run")
    train, _ = read_metrics(tmp_path / "run")
    logged = train[0]["loss"]
    assert logged == pytest.approx(token_mean, rel=1e-9)
    # At initialisation the logits are near zero, so the per-token loss is near ln(vocab); a loss summed
    # over a row and divided by rows would be seq_len times larger.
    assert abs(logged - math.log(vocab)) < 0.25


# --------------------------------------------------------------------------- 3. gradient noise


def annealed_noise(cfg, order: list[str], *, offset: int = 0, as_std: bool = False) -> NoiseFn:
    """The noise the docs describe: at 0-based step t, N(0, σ²) with σ² = eta / (1 + t)^gamma.

    Drawn from a CPU generator seeded ``seed + NOISE_SEED_OFFSET``, one float64 draw per parameter in the
    optimizer's order. ``offset`` shifts t (1 = the 1-based mistake); ``as_std`` uses the variance as σ.
    """
    generator = torch.Generator().manual_seed(cfg.seed + NOISE_SEED_OFFSET)
    eta, gamma = cfg.noise.eta, cfg.noise.gamma

    def add(t: int, grads: Weights) -> Weights:
        variance = eta / (1 + t + offset) ** gamma
        sigma = variance if as_std else math.sqrt(variance)
        noisy = dict(grads)
        for name in order:
            draw = torch.randn(grads[name].shape, generator=generator, dtype=torch.float64)
            noisy[name] = grads[name] + sigma * draw
        return noisy

    return add


def test_gradient_noise_has_the_documented_variance_at_0_based_steps(tmp_path: Path):
    steps, lr = 4, 0.1
    cfg = config(noise={"eta": 0.25, "gamma": 0.55}, optim={"lr": lr}, stop={"max_steps": steps})
    start, x, y, order = start_of(cfg)
    assert sorted(order) == ["head.bias", "head.weight"]
    batches = [torch.arange(len(y))] * steps  # full batch: the sampler's order does not matter
    losses, final = sgd_replay(start, x, y, batches, [lr] * steps, annealed_noise(cfg, order))

    fit(cfg, tmp_path / "run")
    train, _ = read_metrics(tmp_path / "run")
    actual = last_weights(tmp_path / "run")
    assert [line["loss"] for line in train] == pytest.approx(losses, rel=1e-12)
    assert_weights_close(actual, final)
    # The settings tell the conventions apart: 1-based steps, or eta/(1+t)^gamma taken as the std.
    for wrong in ({"offset": 1}, {"as_std": True}):
        _, other = sgd_replay(start, x, y, batches, [lr] * steps, annealed_noise(cfg, order, **wrong))
        assert max_difference(other, actual) > 1e-3, wrong
    _, noiseless = sgd_replay(start, x, y, batches, [lr] * steps)
    assert max_difference(noiseless, actual) > 1e-3


# --------------------------------------------------------------------------- 4. early stopping


def expected_stop(
    evals: list[tuple[int, float]], mode: str, patience: int, min_delta: float
) -> tuple[int | None, int | None, float | None]:
    """(step it stops at or None, best step, best value): an improvement beats the best by more than min_delta."""
    best: float | None = None
    best_step: int | None = None
    bad = 0
    for step, value in evals:
        if best is None:
            better = math.isfinite(value)
        elif mode == "min":
            better = value < best - min_delta
        else:
            better = value > best + min_delta
        if better:
            best, best_step, bad = value, step, 0
        else:
            bad += 1
            if bad >= patience:
                return step, best_step, best
    return None, best_step, best


# Digits with 60 validation rows (accuracy moves in steps of 1/60) and a fast noisy SGD: both metrics
# improve for a while, then stall by less than min_delta, which stops these runs well before the budget,
# and later than they would stop with min_delta=0.
STOP_RUN = {
    "data": {"name": "digits", "limit": 400},
    "model": {"name": "mlp", "hidden": [16]},
    "optim": {"name": "sgd", "lr": 0.5},
    "batch": {"size": 16},
    "eval": {"every_steps": 2},
}
STOP_CASES = {
    "max-val_accuracy": {"epochs": None, "max_steps": 40, "monitor": "val_accuracy", "patience": 2, "min_delta": 0.02},
    "min-val_loss": {"epochs": None, "max_steps": 40, "monitor": "val_loss", "patience": 2, "min_delta": 0.02},
}


@pytest.mark.parametrize("case", sorted(STOP_CASES))
def test_early_stopping_follows_patience_and_min_delta_from_the_config(tmp_path: Path, case: str):
    stop = STOP_CASES[case]
    raw = {**COMMON, **STOP_RUN, "stop": stop}
    monitor, patience, min_delta = stop["monitor"], stop["patience"], stop["min_delta"]
    mode = "max" if monitor == "val_accuracy" else "min"

    summary = fit(validate(raw), tmp_path / "run")
    train, evals = read_metrics(tmp_path / "run")
    logged = [(line["step"], line[monitor]) for line in evals if line["split"] == "val"]
    stop_step, best_step, best = expected_stop(logged, mode, patience, min_delta)

    assert summary["mode"] == mode and summary["monitor"] == monitor
    assert stop_step is not None, f"{case}: the settings should stop early; evaluations {logged}"
    assert summary["status"] == "early_stopped"
    assert summary["steps"] == stop_step == logged[-1][0] == train[-1]["step"]
    assert summary["best"]["step"] == best_step
    assert best_step is not None and best_step > logged[0][0]  # improvements after the first evaluation counted
    assert summary["best"]["value"] == pytest.approx(best, rel=1e-12)
    # restore_best: the final validation score is that of the best step's weights.
    assert summary["final_weights"] == "best"
    assert summary["final"][monitor] == pytest.approx(best, rel=1e-9)
    # min_delta changes the decision here: without it the run would not have stopped where it did.
    plain = expected_stop(logged, mode, patience, 0.0)
    assert plain[:2] != (stop_step, best_step), f"{case}: min_delta does not matter for {logged}"


# --------------------------------------------------------------------------- 5. the LR in use


def cosine_lr(base: float, warmup: int, total: int, floor: float) -> list[float]:
    """Linear warmup (s + 1)/W, then cosine from 1 down to ``floor`` reached at t = total − W (one past the end)."""
    lrs = []
    for s in range(total):
        if s < warmup:
            lrs.append(base * (s + 1) / warmup)
        else:
            t, span = s - warmup, total - warmup
            lrs.append(base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / span))))
    return lrs


def step_lr(base: float, warmup: int, total: int, gamma: float, step_size: int) -> list[float]:
    """Linear warmup, then ``gamma`` every ``step_size`` steps counted after the warmup."""
    return [
        base * (s + 1) / warmup if s < warmup else base * gamma ** ((s - warmup) // step_size) for s in range(total)
    ]


LR_CASES = {
    "cosine": (
        {"name": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1},
        cosine_lr(0.2, warmup=3, total=10, floor=0.1),
    ),
    "step": (
        {"name": "step", "warmup_steps": 2, "gamma": 0.5, "step_size": 3},
        step_lr(0.2, warmup=2, total=10, gamma=0.5, step_size=3),
    ),
}


@pytest.mark.parametrize("case", sorted(LR_CASES))
def test_logged_and_applied_lr_follow_the_closed_form_schedule(tmp_path: Path, case: str):
    schedule, lrs = LR_CASES[case]
    cfg = config(optim={"lr": 0.2}, schedule=schedule, stop={"max_steps": 10})
    start, x, y, _ = start_of(cfg)
    batches = [torch.arange(len(y))] * 10
    losses, final = sgd_replay(start, x, y, batches, lrs)

    fit(cfg, tmp_path / "run")
    train, _ = read_metrics(tmp_path / "run")
    assert [line["lr"] for line in train] == pytest.approx(lrs, rel=1e-12)
    # The LR the optimizer used, not only the one logged: every later loss and the final weights follow it.
    assert [line["loss"] for line in train] == pytest.approx(losses, rel=1e-12)
    assert_weights_close(last_weights(tmp_path / "run"), final)
    _, constant = sgd_replay(start, x, y, batches, [0.2] * 10)
    assert max_difference(constant, final) > 1e-4
