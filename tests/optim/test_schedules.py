import json
import math
from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler

from gradwise.config import ScheduleConfig
from gradwise.optim.schedules import LRSchedule, schedule_multiplier, warmup_length


def _values(cfg: ScheduleConfig, total: int, steps: int | None = None) -> list[float]:
    return [schedule_multiplier(s, total, cfg) for s in range(total if steps is None else steps)]


def _approx(values: list[float]):
    return pytest.approx(values, rel=1e-7, abs=1e-12)


# --------------------------------------------------------------------------- hand-written values

HAND = [
    ("constant", {"warmup_steps": 3}, 12, [1 / 3, 2 / 3] + [1.0] * 10),
    # γ^t from step W on, floored at r = 0.05.
    (
        "exponential",
        {"warmup_steps": 2, "gamma": 0.5, "min_lr_ratio": 0.05},
        12,
        [0.5, 1.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.05, 0.05, 0.05, 0.05, 0.05],
    ),
    ("step", {"step_size": 3}, 10, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]),
    # Milestones count main-schedule steps t = step − W.
    (
        "multistep",
        {"warmup_steps": 2, "milestones": [2, 5], "gamma": 0.5},
        11,
        [0.5, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25],
    ),
    (
        "linear",
        {"warmup_steps": 2, "min_lr_ratio": 0.2},
        12,
        [0.5, 1, 1, 0.92, 0.84, 0.76, 0.68, 0.6, 0.52, 0.44, 0.36, 0.28],
    ),
    # 0.1 + 0.45 (1 + cos(π t / 8)).
    (
        "cosine",
        {"warmup_steps": 2, "min_lr_ratio": 0.1},
        10,
        [0.5, 1, 1, 0.96574578, 0.86819805, 0.72220754, 0.55, 0.37779246, 0.23180195, 0.13425421],
    ),
    # 0.5 + 0.5 (1 − t/10)².
    (
        "polynomial",
        {"power": 2.0, "min_lr_ratio": 0.5},
        10,
        [1, 0.905, 0.82, 0.745, 0.68, 0.625, 0.58, 0.545, 0.52, 0.505],
    ),
    # T' = 10, decay over the last ceil(0.3 · 10) = 3 steps: s = 0, 1/3, 2/3.
    ("wsd", {"warmup_steps": 2, "decay_fraction": 0.3, "decay_shape": "linear"}, 12, [0.5] + [1] * 9 + [2 / 3, 1 / 3]),
    # ceil(0.25 · 10) = 3 as well, not 2.
    ("wsd", {"warmup_steps": 2, "decay_fraction": 0.25, "decay_shape": "linear"}, 12, [0.5] + [1] * 9 + [2 / 3, 1 / 3]),
    ("wsd", {"warmup_steps": 2, "decay_fraction": 0.3, "decay_shape": "cosine"}, 12, [0.5] + [1] * 9 + [0.75, 0.25]),
    # 0.1 + 0.9 (1 − √s).
    (
        "wsd",
        {"warmup_steps": 2, "decay_fraction": 0.3, "decay_shape": "1-sqrt", "min_lr_ratio": 0.1},
        12,
        [0.5] + [1] * 9 + [0.48038476, 0.26515308],
    ),
    ("plateau", {"warmup_steps": 4}, 10, [0.25, 0.5, 0.75] + [1] * 7),
    # Peak at step 0.3·10 − 1 = 2; start 1/25, end 1/25/1e4.
    (
        "onecycle",
        {},
        10,
        [0.04, 0.52, 1.0, 0.95048463, 0.81174565, 0.61126202, 0.38874198, 0.18825835, 0.04951937, 4e-06],
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "total", "expected"), HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_hand_written_values(name, kwargs, total, expected):
    cfg = ScheduleConfig(name=name, **kwargs)
    assert _values(cfg, total) == _approx([float(v) for v in expected])


def test_past_the_end_stays_at_the_floor():
    cfg = ScheduleConfig(name="linear", warmup_steps=2, min_lr_ratio=0.2)
    assert schedule_multiplier(12, 12, cfg) == pytest.approx(0.2)
    assert schedule_multiplier(50, 12, cfg) == pytest.approx(0.2)


def test_bad_step_is_an_error():
    with pytest.raises(ValueError, match="step"):
        schedule_multiplier(-1, 10, ScheduleConfig())


# --------------------------------------------------------------------------- against torch schedulers


def _torch_lrs(make: Callable[[torch.optim.Optimizer], object], steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


TORCH = [
    ("exponential", {"gamma": 0.9}, lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9)),
    ("step", {"step_size": 4, "gamma": 0.5}, lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
    ("step", {"step_size": 7}, lambda o: lr_scheduler.StepLR(o, step_size=7)),
    (
        "multistep",
        {"milestones": [3, 8, 15], "gamma": 0.3},
        lambda o: lr_scheduler.MultiStepLR(o, milestones=[3, 8, 15], gamma=0.3),
    ),
    (
        "linear",
        {"min_lr_ratio": 0.1},
        lambda o: lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=25),
    ),
    ("cosine", {"min_lr_ratio": 0.05}, lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=25, eta_min=0.05)),
    ("polynomial", {"power": 1.7}, lambda o: lr_scheduler.PolynomialLR(o, total_iters=25, power=1.7)),
    (
        "onecycle",
        {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
        lambda o: lr_scheduler.OneCycleLR(
            o,
            max_lr=1.0,
            total_steps=25,
            pct_start=0.25,
            anneal_strategy="cos",
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=False,
            cycle_momentum=False,
        ),
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "make"), TORCH, ids=[f"{t[0]}-{i}" for i, t in enumerate(TORCH)])
def test_matches_the_torch_scheduler(name, kwargs, make):
    ours = _values(ScheduleConfig(name=name, **kwargs), 25)
    assert ours == pytest.approx(_torch_lrs(make, 25), rel=1e-9, abs=1e-12)


def test_warmup_shifts_the_main_schedule():
    cfg = ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=0.1)
    ours = _values(cfg, 25)
    assert ours[:5] == _approx([0.2, 0.4, 0.6, 0.8, 1.0])
    expected = _torch_lrs(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.1), 20)
    assert ours[5:] == pytest.approx(expected, rel=1e-9)


def test_warmup_fraction_sizes_the_warmup_by_the_runs_length():
    # 0.2 of 25 steps is the 5-step warmup above, the same multipliers to the last digit.
    by_steps = _values(ScheduleConfig(name="cosine", warmup_steps=5, min_lr_ratio=0.1), 25)
    assert _values(ScheduleConfig(name="cosine", warmup_fraction=0.2, min_lr_ratio=0.1), 25) == by_steps
    assert warmup_length(ScheduleConfig(warmup_fraction=0.05), 500) == 25
    assert warmup_length(ScheduleConfig(warmup_fraction=0.05), 4) == 1  # never rounds a warmup away
    with pytest.raises(ValueError, match="set one"):
        ScheduleConfig(warmup_steps=5, warmup_fraction=0.1)


# --------------------------------------------------------------------------- plateau


def test_plateau_hand_sequence():
    cfg = ScheduleConfig(
        name="plateau", patience=1, factor=0.5, cooldown=1, threshold=0.1, min_lr_ratio=0.2, warmup_steps=2
    )
    sched = LRSchedule(cfg, total_steps=100, mode="min")
    scales = []
    for value in [10, 9.5, 9.5, 8, 8, 8, 8, 8, 8]:
        sched.on_eval(value)
        scales.append(sched.multiplier(50))
    # 9.5 is not 10% better than 10; the second bad eval reduces; cooldown eats one; floored at 0.2.
    assert scales == _approx([1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2])
    assert sched.multiplier(0) == pytest.approx(0.5 * 0.2)  # warmup times the plateau factor


METRICS = [1.0, 0.9, 0.95, 0.91, 0.9, 0.7, 0.71, 0.72, 0.69, 0.69, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.4, 0.41, 0.42]


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize(("patience", "cooldown", "threshold"), [(0, 0, 0.0), (1, 2, 0.02), (2, 1, 1e-4)])
def test_plateau_matches_torch_reduce_on_plateau(mode, patience, cooldown, threshold):
    cfg = ScheduleConfig(
        name="plateau", factor=0.5, patience=patience, cooldown=cooldown, threshold=threshold, min_lr_ratio=0.01
    )
    ours = LRSchedule(cfg, total_steps=100, mode=mode)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, factor=0.5, patience=patience, threshold=threshold, threshold_mode="rel",
        cooldown=cooldown, min_lr=0.01,
    )  # fmt: skip
    got, expected = [], []
    for value in METRICS:
        ours.on_eval(value)
        ref.step(value)
        got.append(ours.multiplier(10))
        expected.append(opt.param_groups[0]["lr"])
    assert got == expected
    assert min(got) < 1.0  # the sequence does trigger reductions


def test_plateau_state_dict_round_trip_through_json():
    cfg = ScheduleConfig(name="plateau", patience=1, factor=0.5, cooldown=1)
    straight = LRSchedule(cfg, 100, "min")
    first = LRSchedule(cfg, 100, "min")
    assert json.loads(json.dumps(first.state_dict()))["best"] is None
    for value in METRICS[:9]:
        straight.on_eval(value)
        first.on_eval(value)
    resumed = LRSchedule(cfg, 100, "min")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    for value in METRICS[9:]:
        straight.on_eval(value)
        resumed.on_eval(value)
        assert resumed.multiplier(20) == straight.multiplier(20)
    assert resumed.state_dict() == straight.state_dict()


def test_only_plateau_reacts_to_evaluations():
    sched = LRSchedule(ScheduleConfig(name="cosine"), 10, "min")
    for value in [1.0, 2.0, 3.0, 4.0]:
        sched.on_eval(value)
    assert sched.multiplier(0) == 1.0
    assert math.isclose(sched.multiplier(5), 0.5)
