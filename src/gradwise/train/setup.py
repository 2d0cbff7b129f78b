"""From a validated RunConfig to the objects the training loop composes."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwise.config import RunConfig, monitor_mode
from gradwise.data import Dataset, load_dataset
from gradwise.data.batches import take
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError, GradwiseWarning
from gradwise.models import build_model
from gradwise.optim import GradientNoise, LRSchedule, build_optimizer
from gradwise.optim.schedules import warmup_length
from gradwise.optim.transforms import GradientChain, gradient_chain
from gradwise.tasks import Task, build_task
from gradwise.train.adapt import adapt_structure, model_dir, prepare_for_training
from gradwise.train.batching import BatchPlan, EpochSampler
from gradwise.train.device import autocast, parameter_dtype, resolve_device, to_device
from gradwise.train.feature_cache import HeadOverFeatures, cache_features, why_not_cached
from gradwise.train.hooks import Hook
from gradwise.train.rng import seed_everything
from gradwise.train.stopping import EarlyStopping
from gradwise.train.strategies import active_strategies

# Offsets keep the sampler's and the noise's generators independent of the global seed stream.
SAMPLER_SEED_OFFSET = 1
NOISE_SEED_OFFSET = 2
# Length bucketing sorts chunks of this many batches (Hugging Face's group_by_length uses 50).
LENGTH_BUCKET_BATCHES = 50
# Loaded datasets kept for later runs in the same process (see _load_data).
DATA_CACHE_SIZE = 2
_DATA_CACHE: OrderedDict[tuple[Any, ...], Dataset] = OrderedDict()


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
    gradients: GradientChain  # penalties → clipping → noise → decoupled weight decay
    stopper: EarlyStopping
    monitor: str
    total_steps: int
    hooks: list[Hook] = field(default_factory=list)  # strategies acting inside the step (unfreezing, pruning, …)
    # A model's own penalty on what a batch uses, summed over its rows (``model.batch_penalty_sum(inputs)``).
    batch_penalty: Callable[[Any], torch.Tensor | None] | None = None
    # What training and evaluation run forward when it is not the model itself: the head over cached features
    # (``data`` then holds the features). Checkpoints are always the model's.
    forward_module: nn.Module | None = None

    @property
    def net(self) -> nn.Module:
        """The module the loop's forward passes go through."""
        return self.forward_module if self.forward_module is not None else self.model

    def stateful(self) -> list[Any]:
        """The hooks, gradient transforms and task whose state a checkpoint keeps by ``state_key``."""
        task = [self.task] if getattr(self.task, "state_key", None) else []  # preference tuning's reference table
        return [*self.hooks, *self.gradients.transforms, *task]


def build_model_and_data(cfg: RunConfig, *, training: bool = False) -> tuple[Dataset, nn.Module, Task, torch.device]:
    """Seed, load the data, build the model on its device and the task: what eval needs too."""
    seed_everything(cfg.seed, cfg.deterministic)
    data = _load_data(cfg)
    model, task, device = build_model_for(cfg, data.info, training=training)
    bind = getattr(task, "bind", None)
    if bind is not None:  # a task scored against the whole data (ranking excludes each user's training items)
        bind(data.extras)
    prepare = getattr(task, "prepare", None)
    if prepare is not None:  # a task scored against the model as loaded (preference tuning's reference model)
        prepare(model, data, device, lambda: autocast(device, cfg.precision))
    return data, model, task, device


def _load_data(cfg: RunConfig) -> Dataset:
    """The run's data, shared with the previous runs of this process that asked for the same data.

    Sweep trials, the seeds of a compare and the variants of a recipe train many runs in one process on
    the same data; loading, coding, splitting and standardizing it again each time was most of a short
    trial's fixed cost. Loading touches no global RNG (so sharing changes nothing downstream) and no run
    writes into the loaded tensors; a data file is keyed by its size and modification time as well.
    """
    source = getattr(cfg.data, "path", None)  # only a file source has one
    stamp = (source.stat().st_size, source.stat().st_mtime_ns) if source is not None and source.is_file() else None
    tokenizer_dir = model_dir(cfg)
    key = (cfg.data.model_dump_json(), cfg.task.kind, cfg.seed, str(tokenizer_dir), stamp)
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed, tokenizer_dir=tokenizer_dir)
    _DATA_CACHE[key] = data
    while len(_DATA_CACHE) > DATA_CACHE_SIZE:
        _DATA_CACHE.popitem(last=False)
    return data


def build_model_for(cfg: RunConfig, info: DataInfo, *, training: bool = False) -> tuple[nn.Module, Task, torch.device]:
    """The model (with its adapters) on its device and the task, sized by ``info``: no data needed."""
    device = resolve_device(cfg.device)
    model = adapt_structure(cfg, build_model(cfg.model, info), training=training)
    if getattr(cfg.model, "load_in_4bit", False):
        pass  # bitsandbytes placed the quantized base on its GPU; its 4-bit weights take no dtype
    elif getattr(cfg.model, "dtype", "float32") != "float32":
        model = model.to(device)  # the weights keep the dtype they were loaded in (a bf16 frozen base)
    else:
        model = model.to(device, dtype=parameter_dtype(cfg.precision))
    return model, build_task(cfg.task, info), device


def build_run(cfg: RunConfig, *, fully_shard: bool = False) -> RunParts:
    """Build every component of a run from its config.

    Args:
        cfg: The validated run config.
        fully_shard: Shard the model over the ranks of the current process group with FSDP2 before the
            optimizer is built (the optimizer must see the sharded parameters).
    """
    data, model, task, device = build_model_and_data(cfg, training=True)
    monitor = _resolve_monitor(cfg, task, model, data, device)
    strategies = active_strategies(cfg)  # compress/ plugs in by section: distill, prune, qat
    for strategy in strategies:
        if strategy.attach_data is not None:
            # Distillation: the teacher's outputs join the training targets once; evaluation keeps the labels.
            task, data = strategy.attach_data(cfg, task, data, model, device)
    mode = monitor_mode(monitor, cfg.stop.mode)
    adaptation = prepare_for_training(cfg, model)
    low = sorted(
        {
            str(p.dtype).removeprefix("torch.")
            for p in model.parameters()
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
        }
    )
    if low:
        warnings.warn(
            f"the trainable weights are {', '.join(low)}: updates smaller than their resolution are lost; "
            "train fp32 weights (model.dtype=float32 with precision=bf16 autocast) or adapters (finetune.lora)",
            GradwiseWarning,
            stacklevel=2,
        )
    if fully_shard:
        from gradwise.train.sharding import fully_shard_model

        model = fully_shard_model(model, cfg.distributed, device)
    optimizer = build_optimizer(model, adaptation.optim, cfg.regularize.weight_decay)
    lengths = data.train.lengths  # of the tokens: length buckets draw the same batches with cached features
    forward_module = None
    if why_not_cached(cfg, model, adaptation.hooks, fully_shard=fully_shard) is None:
        data = cache_features(model, data, cfg, device)
        forward_module = HeadOverFeatures(model)
    n_train = len(data.train.y)
    plan = BatchPlan(cfg.batch, n_train)
    total_steps = plan.total_steps(cfg.stop.epochs, cfg.stop.max_steps)
    _check_plan(cfg, model, plan, total_steps)
    hooks = list(adaptation.hooks)
    for strategy in strategies:
        if strategy.hooks is not None:
            hooks.extend(strategy.hooks(model, cfg, total_steps))
    noise = (
        GradientNoise(cfg.noise.eta, cfg.noise.gamma, seed=cfg.seed + NOISE_SEED_OFFSET) if cfg.noise.eta > 0 else None
    )
    reg = cfg.regularize
    return RunParts(
        cfg=cfg,
        device=device,
        data=data,
        model=model,
        task=task,
        optimizer=optimizer,
        plan=plan,
        schedule=LRSchedule(cfg.schedule, total_steps, mode),
        sampler=EpochSampler(
            n_train,
            seed=cfg.seed + SAMPLER_SEED_OFFSET,
            lengths=lengths,
            bucket=LENGTH_BUCKET_BATCHES * plan.reference if getattr(cfg.data, "bucket_by_length", False) else None,
        ),
        gradients=gradient_chain(reg.l1, reg.l2, reg.clip_grad_norm, noise),
        stopper=EarlyStopping(monitor, mode, cfg.stop.patience, cfg.stop.min_delta),
        monitor=monitor,
        total_steps=total_steps,
        hooks=hooks,
        batch_penalty=getattr(model, "batch_penalty_sum", None),
        forward_module=forward_module,
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
    rows = torch.arange(min(2, len(data.val)))
    inputs, targets = to_device(take(data.val, rows), device, dtype)
    meter.update(model(inputs).float(), targets)
    model.train(was_training)
    available = [f"val_{name}" for name in meter.compute()]
    if monitor not in available:
        raise ConfigError(f"stop.monitor: got {monitor!r}; available: {', '.join(available)}")
    return monitor


def _check_plan(cfg: RunConfig, model: nn.Module, plan: BatchPlan, total_steps: int) -> None:
    """Refuse settings that would crash mid-run or silently do nothing over this run's length."""
    sched = cfg.schedule
    warmup = warmup_length(sched, total_steps)
    if warmup >= total_steps:
        asked = f"{sched.warmup_fraction} ({warmup} steps)" if sched.warmup_fraction else str(warmup)
        setting = "warmup_fraction" if sched.warmup_fraction else "warmup_steps"
        raise ConfigError(f"schedule.{setting}: got {asked}, but the run has only {total_steps} optimizer steps")
    after_warmup = total_steps - warmup
    # A decay that never fires is likely a shortened run (e.g. stop.epochs=1 for a smoke test): warn, don't refuse.
    if sched.name == "multistep" and sched.milestones[0] >= after_warmup:
        warnings.warn(
            f"schedule.milestones: {sched.milestones[0]} is beyond the run's {after_warmup} steps after warmup; "
            "the LR will never decay",
            GradwiseWarning,
            stacklevel=2,
        )
    if sched.name == "step" and sched.step_size is not None and sched.step_size >= after_warmup:
        warnings.warn(
            f"schedule.step_size: {sched.step_size} is not below the run's {after_warmup} steps after warmup; "
            "the LR will never decay",
            GradwiseWarning,
            stacklevel=2,
        )
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if batch_norm:
        # BatchNorm's variance is undefined for one example: every micro-batch on every rank needs two.
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        plan.require_micro_batches_of(2, world)
        ranks = f" on each of {world} ranks" if world > 1 else ""
        smallest = plan.smallest_step(total_steps)
        if smallest < plan.min_take:
            # A size below the minimum is too small itself; one at it cannot lend an epoch's short last step any.
            need = plan.min_take if smallest == cfg.batch.size else 2 * plan.min_take - 1
            raise ConfigError(
                f"model.norm 'batch' needs at least 2 examples per micro-batch{ranks}, i.e. steps of at least "
                f"{plan.min_take} examples, but batch.size={cfg.batch.size} with batch.accumulate="
                f"{cfg.batch.accumulate} over {plan.n_train} training examples makes one of {smallest}; "
                f"raise batch.size to {need} or more (or lower batch.accumulate), or use model.norm=layer"
            )
        for short, lent in sorted(plan.lent_to_last_steps(total_steps)):
            warnings.warn(
                f"model.norm 'batch' needs at least 2 examples per micro-batch{ranks}: the last step of an epoch "
                f"would hold {short} of the {plan.n_train} training examples (batch.size={cfg.batch.size}), so the "
                f"step before it leaves it {lent} more; no example is dropped and the steps per epoch are unchanged",
                GradwiseWarning,
                stacklevel=2,
            )
        if cfg.batch.accumulate > 1:
            warnings.warn(
                "batch.accumulate with model.norm=batch: BatchNorm statistics are per micro-batch, so an "
                "accumulated step is close to, not equal to, the large-batch step",
                GradwiseWarning,
                stacklevel=2,
            )
