"""Gradual magnitude pruning: the schedule at every step, masks that hold under Adam, state, and runs through fit."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from gradwise.compress.gradual import GradualPruner
from gradwise.compress.prune import prunable_weights
from gradwise.config import PruneConfig, validate
from gradwise.models.mlp import MLP
from gradwise.store.checkpoint import load_model_state, load_training_state
from gradwise.train.loop import fit

N_WEIGHTS = 64 * 32 + 32 * 16 + 16 * 10  # 2720

# Zhu & Gupta's cubic from 0.2 to 0.8 with begin 5, end 30, every 5 (50 steps, fractions 0.1 and 0.6).
POINTS = {
    5: 0.2,
    10: 0.8 - 0.6 * 0.8**3,
    15: 0.8 - 0.6 * 0.6**3,
    20: 0.8 - 0.6 * 0.4**3,
    25: 0.8 - 0.6 * 0.2**3,
    30: 0.8,
}
CFG = PruneConfig(sparsity=0.8, initial_sparsity=0.2, begin_fraction=0.1, end_fraction=0.6, every_steps=5)


def expected_sparsity(step: int) -> float:
    reached = [p for p in POINTS if p <= step]
    return POINTS[max(reached)] if reached else 0.0


def make_model() -> MLP:
    torch.manual_seed(0)
    return MLP(64, [32, 16], 10)


def train(model: MLP, pruner: GradualPruner, steps: range, optimizer: torch.optim.Optimizer, check=None) -> None:
    generator = torch.Generator().manual_seed(1)
    for step in steps:
        x = torch.randn(16, 64, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if check is not None:
            check("moved", step)
        pruner.after_step(step)
        if check is not None:
            check("pruned", step)


def zeros(model: MLP) -> list[torch.Tensor]:
    return [getattr(m, a) == 0 for _, m, a in prunable_weights(model)]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_follows_the_schedule_and_pruned_weights_stay_zero_under_adam(scope: str):
    model = make_model()
    pruner = GradualPruner(model, CFG.model_copy(update={"scope": scope}), total_steps=50)
    assert (pruner.begin_step, pruner.end_step) == (5, 30)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # momentum moves zeroed weights unless re-masked
    seen = {"moved": 0, "previous": [torch.zeros_like(z) for z in zeros(model)]}

    def check(when: str, step: int) -> None:
        masks = [pruner.masks[name] for name, _, _ in pruner.weights]
        if when == "moved":
            seen["moved"] += sum(int((~z[m]).sum()) for z, m in zip(zeros(model), masks, strict=True))
            return
        s = expected_sparsity(step)
        assert pruner.scheduled(step) == pytest.approx(s)
        counts = [int(m.sum()) for m in masks]
        if scope == "global":
            assert sum(counts) == round(s * N_WEIGHTS)
        else:
            assert counts == [round(s * n) for n in (2048, 512, 160)]
        now = zeros(model)
        for z, m, before in zip(now, masks, seen["previous"], strict=True):
            assert torch.equal(z, m)  # exactly the pruned weights are zero, after every optimizer step
            assert not (before & ~z).any()  # a weight pruned once stays pruned
        seen["previous"] = now
        assert pruner.sparsity() == pytest.approx(sum(counts) / N_WEIGHTS)

    train(model, pruner, range(1, 51), optimizer, check)
    assert seen["moved"] > 0  # Adam did move pruned weights between steps; the pruner put them back
    assert pruner.sparsity() == pytest.approx(round(0.8 * N_WEIGHTS) / N_WEIGHTS if scope == "global" else 0.8, 1e-3)


def test_state_dict_round_trip_continues_identically():
    model = make_model()
    pruner = GradualPruner(model, CFG, total_steps=50)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, pruner, range(1, 13), optimizer)  # past two pruning points, mid-way to the next
    state = pruner.state_dict()
    assert state["target"] == pytest.approx(POINTS[10])
    assert all(m.dtype == torch.bool for m in state["masks"].values())

    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=0.01)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict would share tensors
    twin_pruner = GradualPruner(twin, CFG, total_steps=50)
    twin_pruner.load_state_dict(state)
    assert twin_pruner.target == pruner.target
    assert all(torch.equal(twin_pruner.masks[k], pruner.masks[k]) for k in pruner.masks)

    train(model, pruner, range(13, 40), optimizer)
    train(twin, twin_pruner, range(13, 40), twin_optimizer)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_other_weights():
    pruner = GradualPruner(make_model(), CFG, total_steps=50)
    state = pruner.state_dict()
    with pytest.raises(KeyError, match="missing"):
        pruner.load_state_dict({**state, "masks": {k: v for k, v in state["masks"].items() if k != "head.weight"}})
    wrong = {**state["masks"], "head.weight": torch.zeros(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"head\.weight"):
        pruner.load_state_dict({**state, "masks": wrong})


def test_live_weights_that_are_exactly_zero_do_not_break_the_count():
    model = make_model()
    pruner = GradualPruner(model, CFG, total_steps=50)
    pruner.after_step(5)
    before = {k: m.clone() for k, m in pruner.masks.items()}
    with torch.no_grad():
        model.body[0].linear.weight.zero_()  # 2048 zeros, more than the 1340 to prune next: ties everywhere
    pruner.after_step(10)
    assert sum(int(m.sum()) for m in pruner.masks.values()) == round(POINTS[10] * N_WEIGHTS)
    assert all(not (before[k] & ~pruner.masks[k]).any() for k in before)  # the earlier pruned stay pruned


def test_short_run_prunes_once_when_begin_and_end_round_together():
    model = make_model()
    cfg = PruneConfig(sparsity=0.5, begin_fraction=0.3, end_fraction=0.4)
    pruner = GradualPruner(model, cfg, total_steps=2)  # begin round(0.6) = 1, end round(0.8) = 1
    assert (pruner.begin_step, pruner.end_step) == (1, 1)
    pruner.after_step(1)
    assert sum(int(m.sum()) for m in pruner.masks.values()) == round(0.5 * N_WEIGHTS)


# --------------------------------------------------------------------------- through the training loop


def run_config(**sections):
    base = {
        "data": {"name": "digits", "limit": 400},
        "model": {"name": "mlp", "hidden": [32]},
        "optim": {"name": "adam", "lr": 0.01},
        "batch": {"size": 32},
        "stop": {"epochs": 3},
        "eval": {"every_steps": 7},
        "prune": {"sparsity": 0.75, "initial_sparsity": 0.25, "end_fraction": 0.5, "every_steps": 3},
        "log": {"progress": False, "plots": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(base)


def weight_zeros(state: dict[str, torch.Tensor], names: list[str]) -> tuple[int, int]:
    return sum(int((state[n] == 0).sum()) for n in names), sum(state[n].numel() for n in names)


def test_fit_prunes_to_the_final_sparsity(tmp_path: Path):
    summary = fit(run_config(), tmp_path / "run")
    assert summary["total_steps"] == 27  # 280 training rows, batches of 32: 9 steps an epoch
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    state = load_model_state(ckpt)
    # 64·32 + 32·10 = 2368 weights; round(0.75 · 2368) = 1776 zeros, biases untouched.
    assert weight_zeros(state, ["body.0.linear.weight", "head.weight"]) == (1776, 2368)
    assert int((state["body.0.linear.bias"] == 0).sum()) == 0
    saved = load_training_state(ckpt)["pruner"]
    assert saved["target"] == 0.75
    assert sum(int(m.sum()) for m in saved["masks"].values()) == 1776
    assert summary["final"]["test_accuracy"] > 0.8
    # The summary's sparsity is the zeros among the weight matrices (biases not counted): 1776 / 2368 = 0.75.
    assert summary["sparsity"] == 0.75
    assert summary["trainable_parameters"] == summary["parameters"] == 2368 + 32 + 10


def test_best_is_chosen_only_at_the_final_sparsity(tmp_path: Path):
    # Start from trained weights and prune hard: the evaluation at step 7 (sparsity still rising) scores
    # better than any at the final 0.95 (reached at step 14 of 27), but a denser model is not what this
    # run makes, so "best" must come from steps 14, 21 or 27.
    fit(run_config(prune=None), tmp_path / "dense")
    cfg = run_config(
        model={"init_from": str(tmp_path / "dense")},
        optim={"lr": 0.001},
        prune={"sparsity": 0.95, "initial_sparsity": 0.0},
    )
    summary = fit(cfg, tmp_path / "run")
    evals = {line["step"]: line["val_accuracy"] for line in read_evals(tmp_path / "run")}
    assert evals[7] > max(evals[14], evals[21], evals[27])  # the trap is real
    assert summary["best"]["step"] >= 14
    state = load_model_state(tmp_path / "run" / "checkpoints" / "best")
    assert weight_zeros(state, ["body.0.linear.weight", "head.weight"]) == (round(0.95 * 2368), 2368)


def read_evals(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "eval"]


def test_fit_resumes_pruning_bit_exactly(tmp_path: Path):
    cfg = run_config()
    fit(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_at_step_8() -> bool:  # between the pruning points 6 and 9 (begin 0, end round(13.5) = 14)
        calls["n"] += 1
        return calls["n"] == 8

    first = fit(cfg, tmp_path / "split", stop_requested=stop_at_step_8)
    assert first["status"] == "interrupted" and first["steps"] == 8
    assert 0 < load_training_state(tmp_path / "split" / "checkpoints" / "last")["pruner"]["target"] < 0.75
    fit(cfg, tmp_path / "split", resume=True)
    a = load_model_state(tmp_path / "whole" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "split" / "checkpoints" / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_lenet_300_100_pruned_12x_keeps_its_accuracy(tmp_path: Path):
    # The quality bar: an MLP of LeNet-300-100 shape on digits, trained dense, then gradually pruned
    # from its best weights to 12x fewer nonzero weights, loses at most 0.5 accuracy points on the test split.
    base = {
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [300, 100]},
        "optim": {"name": "adam", "lr": 1e-3},
        "batch": {"size": 64},
        "stop": {"epochs": 20},
        "log": {"progress": False, "plots": False},
    }
    dense = fit(validate(base), tmp_path / "dense")
    pruning = validate(
        {
            **base,
            "model": {**base["model"], "init_from": str(tmp_path / "dense")},
            "stop": {"epochs": 20},
            "prune": {"sparsity": 1 - 1 / 12, "end_fraction": 0.6, "every_steps": 10},
        }
    )
    pruned = fit(pruning, tmp_path / "pruned")
    state = load_model_state(tmp_path / "pruned" / "checkpoints" / "best")
    zero, total = weight_zeros(state, ["body.0.linear.weight", "body.1.linear.weight", "head.weight"])
    assert total == 64 * 300 + 300 * 100 + 100 * 10  # 50200
    assert total - zero == round(total / 12)  # 4183 nonzero weights
    assert pruned["final"]["test_accuracy"] >= dense["final"]["test_accuracy"] - 0.005
