"""BatchNorm never sees a micro-batch of 1: an epoch's short last step is lent examples by the step before it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gradwise.config import BatchConfig, load_config
from gradwise.errors import ConfigError, GradwiseWarning
from gradwise.experiments.recipes import find_recipe
from gradwise.store.checkpoint import load_model_state, load_training_state
from gradwise.train.batching import BatchPlan, EpochSampler, step_end
from gradwise.train.loop import fit

# digits with data.limit=400 has 280 training examples: 280 = 9·31 + 1, so batch.size=31 leaves a last step of 1.
LIMIT, N_TRAIN, SIZE = 400, 280, 31
QUICK = [f"data.limit={LIMIT}", f"batch.size={SIZE}", "schedule.warmup_steps=2", "log.progress=false"]


@pytest.mark.parametrize(
    ("cursor", "size", "n", "min_take", "end"),
    [
        (0, 31, 280, 2, 31),  # an ordinary step
        (248, 31, 280, 2, 278),  # would leave 1: leaves 2
        (278, 31, 280, 2, 280),  # the last step takes the 2 left
        (248, 31, 280, 1, 279),  # no minimum: the plain cut
        (0, 2, 3, 2, 2),  # cannot lend (it would keep only 1): the plain cut, which the setup refuses
        (240, 31, 280, 8, 271),  # 4 ranks · accumulate 1 · 2 = 8: leaves 9, it would have left 9 anyway
        (248, 31, 280, 8, 272),  # would leave 1: leaves 8
    ],
)
def test_step_end(cursor: int, size: int, n: int, min_take: int, end: int) -> None:
    assert step_end(cursor, size, n, min_take) == end


@pytest.mark.parametrize(("world", "accumulate"), [(1, 1), (1, 3), (2, 1), (3, 2)])
def test_every_micro_batch_on_every_rank_holds_two(world: int, accumulate: int) -> None:
    plan = BatchPlan(BatchConfig(size=SIZE, accumulate=accumulate), N_TRAIN)
    steps_before = plan.total_steps(2, None)
    plan.require_micro_batches_of(2, world)
    assert plan.total_steps(2, None) == steps_before == 2 * math.ceil(N_TRAIN / SIZE)  # the schedule's length holds
    sampler = EpochSampler(N_TRAIN, seed=0)
    seen: list[int] = []
    for step in range(steps_before // 2):
        planned = plan.size(step, sampler.epoch)
        indices, ended = sampler.take(planned)  # as the loop calls it: the minimum rides on the size
        seen += indices.tolist()
        n = len(indices)
        count = min(accumulate, math.ceil(n / world)) if world > 1 else None  # the loop's own count
        for rank in range(world):
            chunks = plan.micro_batches(indices[rank::world], count)
            assert min(len(chunk) for chunk in chunks) >= 2, (step, rank)
        assert ended == (step == steps_before // 2 - 1)
    assert sorted(seen) == list(range(N_TRAIN))  # nothing dropped, nothing twice


def test_a_plan_without_batch_norm_is_unchanged() -> None:
    plan = BatchPlan(BatchConfig(size=SIZE), N_TRAIN)
    assert type(plan.size(0, 0)) is int
    sampler = EpochSampler(N_TRAIN, seed=0)
    sizes = [len(sampler.take(plan.size(step, 0))[0]) for step in range(10)]
    assert sizes == [SIZE] * 9 + [1]


def test_batch_norm_run_warns_and_trains_without_a_micro_batch_of_one(tmp_path: Path) -> None:
    cfg = load_config(find_recipe("digits-cnn"), [*QUICK, "stop.epochs=2"])
    with pytest.warns(GradwiseWarning, match=r"would hold 1 of the 280 .* leaves it 1 more; no example is dropped"):
        summary = fit(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 20
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = [line["batch_size"] for line in lines if line["kind"] == "train"]
    assert sizes == ([SIZE] * 8 + [SIZE - 1, 2]) * 2


@pytest.mark.filterwarnings("ignore::gradwise.errors.GradwiseWarning")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch.size=1"], r"steps of at least 2 examples, .* makes one of 1; raise batch.size to 2"),
        (["batch.size=2", "data.limit=403"], r"makes one of 1; raise batch.size to 3"),  # 281 examples: odd
        (["batch.size=8", "batch.accumulate=8"], r"steps of at least 16 examples, but batch.size=8"),
    ],
)
def test_an_unavoidable_micro_batch_of_one_is_a_config_error(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = load_config(find_recipe("digits-cnn"), [*QUICK, "stop.epochs=1", *overrides])
    with pytest.raises(ConfigError, match=message):
        fit(cfg, tmp_path / "run")


@pytest.mark.filterwarnings("ignore::gradwise.errors.GradwiseWarning")
def test_resume_across_a_lent_step_is_bit_exact(tmp_path: Path) -> None:
    cfg = load_config(find_recipe("digits-cnn"), [*QUICK, "stop.epochs=2", "eval.every_steps=4"])
    whole = fit(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_after_the_lending_step() -> bool:
        calls["n"] += 1
        return calls["n"] == 9  # steps 0..8 done: the 9th took 30 and left 2 for the epoch's last

    first = fit(cfg, tmp_path / "split", stop_requested=stop_after_the_lending_step)
    assert first["status"] == "interrupted" and first["steps"] == 9
    state = load_training_state(tmp_path / "split" / "checkpoints" / "last")
    assert (state["sampler"]["epoch"], state["sampler"]["cursor"]) == (0, N_TRAIN - 2)
    second = fit(cfg, tmp_path / "split", resume=True)
    assert (second["steps"], second["status"]) == (whole["steps"], whole["status"])
    a = load_model_state(tmp_path / "whole" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "split" / "checkpoints" / "last")
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def losses(run: str) -> list[float]:
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [line["loss"] for line in lines if line["kind"] == "train"]

    assert losses("whole") == losses("split")
