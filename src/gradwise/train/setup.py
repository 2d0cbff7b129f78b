"""From a validated RunConfig to the objects the training loop composes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradwise.config import RunConfig, monitor_mode
from gradwise.data import Dataset, load_dataset
from gradwise.errors import ConfigError
from gradwise.models import build_model
from gradwise.optim import GradientNoise, LRSchedule, build_optimizer
from gradwise.tasks import Task, build_task
from gradwise.train.batching import BatchPlan, EpochSampler
from gradwise.train.device import parameter_dtype, resolve_device, to_device
from gradwise.train.rng import seed_everything
from gradwise.train.stopping import EarlyStopping

# Offsets keep the sampler's and the noise's generators independent of the global seed stream.
SAMPLER_SEED_OFFSET = 1
NOISE_SEED_OFFSET = 2


@dataclass
class RunParts:
    """Everything one run is made of; the loop owns the counters, these own their state."""

    cfg: RunConfig
    device: torch.device
    data: Dataset
    model: nn.Module
    task: Task
    optimizer: torch.optim.Optimizer
    plan: BatchPlan
    schedule: LRSchedule
    sampler: EpochSampler
    noise: GradientNoise | None
    stopper: EarlyStopping
    monitor: str
    total_steps: int


def build_model_and_data(cfg: RunConfig) -> tuple[Dataset, nn.Module, Task, torch.device]:
    """Seed, load the data, build the model on its device and the task: what eval needs too."""
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed)
    model = build_model(cfg.model, data.info).to(device, dtype=parameter_dtype(cfg.precision))
    task = build_task(cfg.task, data.info)
    return data, model, task, device


def build_run(cfg: RunConfig) -> RunParts:
    """Build every component of a run from its config."""
    data, model, task, device = build_model_and_data(cfg)
    monitor = _resolve_monitor(cfg, task, model, data, device)
    mode = monitor_mode(monitor, cfg.stop.mode)
    optimizer = build_optimizer(model, cfg.optim, cfg.regularize.weight_decay)
    n_train = len(data.train.y)
    plan = BatchPlan(cfg.batch, n_train)
    total_steps = plan.total_steps(cfg.stop.epochs, cfg.stop.max_steps)
    noise = (
        GradientNoise(cfg.noise.eta, cfg.noise.gamma, seed=cfg.seed + NOISE_SEED_OFFSET) if cfg.noise.eta > 0 else None
    )
    return RunParts(
        cfg=cfg,
        device=device,
        data=data,
        model=model,
        task=task,
        optimizer=optimizer,
        plan=plan,
        schedule=LRSchedule(cfg.schedule, total_steps, mode),
        sampler=EpochSampler(n_train, seed=cfg.seed + SAMPLER_SEED_OFFSET),
        noise=noise,
        stopper=EarlyStopping(monitor, mode, cfg.stop.patience, cfg.stop.min_delta),
        monitor=monitor,
        total_steps=total_steps,
    )


@torch.no_grad()
def _resolve_monitor(cfg: RunConfig, task: Task, model: nn.Module, data: Dataset, device: torch.device) -> str:
    """The monitored metric name, checked against what the task really reports."""
    monitor = task.default_monitor if cfg.stop.monitor == "auto" else cfg.stop.monitor
    if len(data.val.y) == 0:
        raise ConfigError(
            f"data.val_fraction is 0, so there is no validation split for stop.monitor {monitor!r}; "
            "set data.val_fraction > 0"
        )
    meter = task.new_meter()
    was_training = model.training
    model.eval()
    dtype = parameter_dtype(cfg.precision)
    meter.update(model(to_device(data.val.x[:2], device, dtype)).float(), to_device(data.val.y[:2], device, dtype))
    model.train(was_training)
    available = [f"val_{name}" for name in meter.compute()]
    if monitor not in available:
        raise ConfigError(f"stop.monitor: got {monitor!r}; available: {', '.join(available)}")
    return monitor
