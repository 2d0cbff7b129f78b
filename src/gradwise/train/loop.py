"""The one training loop.

Every strategy is an object this loop composes — the optimizer, the LR
schedule, the batch plan, loss penalties, gradient noise, clipping, decoupled
weight decay, the early stopper — never a second loop. Read ``fit`` top to
bottom: build, maybe resume, then step / evaluate / checkpoint until the
budget or the stopper ends it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.config import RunConfig
from gradwise.data.batches import take
from gradwise.data.corpus import unigram_perplexity
from gradwise.errors import CheckpointError, GradwiseWarning, StorageError, TrainingError
from gradwise.models import count_parameters, weight_sparsity
from gradwise.optim.param_groups import configured_hyperparameters, reapply_hyperparameters
from gradwise.store.branch import branched_at
from gradwise.store.checkpoint import (
    committed_step,
    load_model_state,
    load_training_state,
    load_weights_into,
    resolve_checkpoint,
)
from gradwise.store.ownership import writing_run
from gradwise.store.records import write_data_record
from gradwise.store.rundir import (
    MetricsLog,
    read_metrics,
    write_config,
    write_summary,
)
from gradwise.store.sharded import (
    ShardedCheckpointFiles,
    is_sharded,
    load_full_checkpoint_into_sharded,
    load_full_weights_into_sharded,
    load_sharded_checkpoint,
    optimizer_state_dict,
)
from gradwise.train import distributed
from gradwise.train.compiled import StepFunctions, set_lr
from gradwise.train.device import autocast, parameter_dtype, to_device
from gradwise.train.evaluate import Evaluation, evaluate
from gradwise.train.hooks import hook_states, load_hook_states
from gradwise.train.keeper import CheckpointKeeper
from gradwise.train.ledger import LossLedger, NonFiniteLoss
from gradwise.train.progress import ProgressReporter
from gradwise.train.rng import capture_rng, restore_rng
from gradwise.train.setup import RunParts, build_run
from gradwise.train.sharding import gradient_sync, is_fully_sharded, state_bytes, wrap_for_ranks
from gradwise.train.strategies import active_strategies

# Where eval.samples writes the model's replies to validation prompts.
SAMPLES_FILE = "samples.jsonl"
# How many steps' losses wait before they are read (settled), at most; under torch.distributed also how
# often the ranks agree on a stop request (Ctrl-C, SIGTERM, stop_requested).
STOP_CHECK_STEPS = 16
# One process also settles once this long has passed since it last did, so that slow steps log and show
# progress as they go (ranks cannot: they settle together, at the same steps).
SETTLE_EVERY_S = 1.0


@dataclass
class Counters:
    """What the loop counts; saved in every checkpoint."""

    step: int = 0
    examples: int = 0
    elapsed_s: float = 0.0
    loss_terms: int = 0  # what the loss averaged over: examples, target tokens (language models) or pairs


@dataclass(frozen=True)
class FitHooks:
    """Outside observers of a run; each may end it by returning a reason (None = go on).

    ``after_step(step, loss)`` runs after every optimizer step (the LR finder stops
    a diverging range test); ``after_eval(step, val_metrics)`` after every
    evaluation, and its reason stops the run through the early stopper, like
    patience would (a sweep's pruner ends a weak trial). ``finished(run_dir)`` runs on rank 0
    once the summary is written and before the trackers close, so what it draws (the report
    layer's plots) reaches them too.
    """

    after_step: Callable[[int, float], str | None] | None = None
    after_eval: Callable[[int, dict[str, float]], str | None] | None = None
    finished: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor  # this rank's share of the step's loss (the whole loss in one process); see LossLedger
    lr: float
    batch_size: int
    grad_norm: torch.Tensor | None  # read, like the loss, when the ledger settles


def fit(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    stop_requested: Callable[[], bool] | None = None,
    hooks: FitHooks | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (resuming from its ``last`` checkpoint) and return the summary.

    Args:
        cfg: The validated run config.
        run_dir: The run directory (created if missing).
        resume: Continue from ``run_dir/checkpoints/last``.
        stop_requested: Polled after every step; when it returns True the loop
            saves a checkpoint and ends the run as ``interrupted``. Ctrl-C and
            SIGTERM do the same.
        hooks: Outside observers that may end the run (see :class:`FitHooks`).

    Raises:
        CheckpointError: another process is writing ``run_dir`` (one writer per run), or it holds links
            gradwise did not make; a run that fails before its first step leaves no directory behind.
    """
    ctx = distributed.current(cfg.distributed.timeout_s)
    counters = Counters()
    # Rank 0 holds the run directory for the whole job.
    owning = writing_run(run_dir, resume=resume, started=lambda: counters.step > 0) if ctx.is_main else nullcontext()
    with owning:
        return _fit(cfg, run_dir, ctx, counters, resume=resume, stop_requested=stop_requested, hooks=hooks)


def _fit(
    cfg: RunConfig,
    run_dir: Path,
    ctx: distributed.Distributed,
    counters: Counters,
    *,
    resume: bool,
    stop_requested: Callable[[], bool] | None,
    hooks: FitHooks | None,
) -> dict[str, Any]:
    # FSDP runs keep sharded checkpoints whatever the process count, so any count can resume them.
    sharded = cfg.distributed.strategy == "fsdp"
    parts = build_run(cfg, fully_shard=sharded and ctx.active)
    if resume:
        _restore(parts, counters, run_dir, ctx)
    elif ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
        write_data_record(run_dir, asdict(parts.data.info))
    # Under torch.distributed only rank 0 writes logs; the other ranks log to nowhere. Checkpoints are
    # rank 0's too, except FSDP's sharded ones, which every rank writes together.
    trackers = _open_trackers(cfg, run_dir, resume) if ctx.is_main else []
    log: MetricsLog | _Silent = (
        MetricsLog(run_dir, resume_step=counters.step if resume else None, listeners=[t.log for t in trackers])
        if ctx.is_main
        else _Silent()
    )
    samples = (
        MetricsLog(run_dir, resume_step=counters.step if resume else None, file=SAMPLES_FILE)
        if ctx.is_main and cfg.eval.samples
        else None
    )
    keeper: CheckpointKeeper | _Silent = (
        CheckpointKeeper(
            run_dir / "checkpoints",
            cfg.checkpoint,
            parts.model,
            training_state=lambda: _training_state(parts, counters, sharded=sharded),
            # Lines of the committed steps survive a crash (samples too: resume does not write them again).
            before_write=(lambda: (log.sync(), samples.sync())) if samples is not None else log.sync,
            writer=ShardedCheckpointFiles(run_dir / "checkpoints", ctx) if sharded else None,
            # All ranks write sharded checkpoints together, so they must agree when; rank 0 alone needs no one.
            agree=ctx.any if sharded else lambda decision: decision,
        )
        if ctx.is_main or sharded
        else _Silent()
    )
    net = wrap_for_ranks(parts.net, ctx, gradual_unfreezing=any(h.changes_trainable for h in parts.hooks))
    steps = StepFunctions(
        net,
        _loss_function(parts, net),
        parts.optimizer,
        compile_step=cfg.model.compile == "step",
        distributed=ctx.active,
    )
    keeper.saved_step = counters.step if resume else -1
    name = cfg.name or run_dir.name
    reporter = ProgressReporter(name, parts.total_steps, counters.step, cfg.log.progress and ctx.is_main)
    if not resume and parts.data.info.preprocessing is not None:
        from gradwise.data.tabular import describe  # a table's columns, as fitted: what each one became

        reporter.note(f"columns of {parts.data.info.name}:\n{describe(parts.data.info)}")
    stop_reason, status = "budget reached", "completed"
    if parts.stopper.should_stop:  # resuming a run that had already stopped early
        stop_reason, status = parts.stopper.stop_reason or "", "early_stopped"
    started = time.perf_counter() - counters.elapsed_s

    parts.net.train()  # evaluation restores the mode it found
    ledger = LossLedger(ctx, log.write, reporter.step)
    settled_at = time.perf_counter()
    loss: float | None = None  # the last settled loss
    last_eval: tuple[int, Evaluation] | None = None  # (step, validation) of the latest evaluation
    with reporter, _interrupt_flag() as interrupted:
        try:
            while counters.step < parts.total_steps and not parts.stopper.should_stop:
                result, epoch_ended, terms = _train_step(parts, counters.step, steps, ctx)
                counters.step += 1
                counters.examples += result.batch_size
                counters.loss_terms += terms
                step = counters.step
                record = {"kind": "train", "step": step, "epoch": round(parts.sampler.progress, 6)}
                record.update(examples=counters.examples, **vars(result))
                ledger.add(record | {"time": round(time.perf_counter() - started, 4)}, result.loss)
                eval_due = _eval_due(cfg, epoch_ended, step, parts.total_steps)
                # The losses are read (settled) only where they must be: before anything is evaluated or
                # written, at an epoch end, every STOP_CHECK_STEPS steps, and for an after_step observer. Ranks
                # settle with one all-reduce of the window's losses and stop requests; one process polls its
                # stop flags every step (they live on the host) and settles when one is set.
                asked = False if ctx.active else interrupted() or (stop_requested is not None and stop_requested())
                settle = (
                    asked
                    or (hooks is not None and hooks.after_step is not None)
                    or epoch_ended
                    or eval_due
                    or step % STOP_CHECK_STEPS == 0
                    or step == parts.total_steps
                    or bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0)
                    or (not ctx.active and time.perf_counter() - settled_at >= SETTLE_EVERY_S)
                )
                if settle:
                    if ctx.active:
                        asked = interrupted() or (stop_requested is not None and stop_requested())
                    loss, asked = ledger.settle(asked)
                    settled_at = time.perf_counter()

                counters.elapsed_s = time.perf_counter() - started
                if eval_due:
                    improved, evaluation = _evaluate(parts, counters, log, reporter, ctx)
                    last_eval = (counters.step, evaluation)
                    metrics = evaluation.metrics
                    if samples is not None:
                        _write_samples(parts, counters.step, samples)
                    judged = hooks.after_eval(step, metrics) if hooks and hooks.after_eval else None
                    if judged:
                        parts.stopper.stop(judged)
                    keeper.after_eval(step, improved)
                keeper.after_step(step)
                if parts.stopper.should_stop:
                    stop_reason, status = parts.stopper.stop_reason or "", "early_stopped"
                    break
                halted = hooks.after_step(step, loss) if hooks and hooks.after_step and loss is not None else None
                if halted:
                    stop_reason, status = halted, "stopped"
                    break
                # Agreed by every rank at settling: a rank that stopped alone would leave the others waiting.
                if asked:
                    stop_reason, status = f"interrupted at step {step}; resume to continue", "interrupted"
                    break
            ledger.settle(False)  # nothing is pending at any exit above; this keeps it so if one is added
            keeper.save(counters.step)
        except RuntimeError as exc:
            if not (ctx.active and distributed.lost_a_peer(exc)):
                raise
            # A peer died or stopped answering: this rank cannot go on, and has nothing to save that `last` lacks.
            log.sync()
            if keeper.saved_step >= 0:
                kept = f"checkpoint 'last' (step {keeper.saved_step}) is kept"
            elif ctx.is_main:
                kept = "no checkpoint had been written yet"
            else:
                kept = "rank 0's last checkpoint is kept"
            raise TrainingError(distributed.peer_failure_message(exc, ctx.rank, counters.step + 1, kept)) from None
        except TrainingError as exc:
            log.sync()
            kept = (
                f"checkpoint 'last' (step {keeper.saved_step}) is kept"
                if keeper.saved_step >= 0
                else "no checkpoint had been written yet"
            )
            if keeper.saved_step >= 0:
                advice = (
                    f" — continue from it with a changed optimization in a new run: gradwise resume {run_dir} "
                    "--from-checkpoint last optim.lr=<lower> (or regularize.clip_grad_norm=1.0)"
                )
            else:
                advice = " — lower optim.lr or set regularize.clip_grad_norm and train again"
            message = f"{exc}; {kept}{advice}"
            # A loss read at settling names its own step; the steps after it in the window do not count.
            done = exc.step if isinstance(exc, NonFiniteLoss) else counters.step
            failed = {"name": name, "status": "failed", "stop_reason": message, "steps": done}
            if ctx.is_main:
                write_summary(run_dir, failed)
            for tracker in trackers:
                tracker.finish(failed, run_dir)
            raise TrainingError(message) from None
        except StorageError as exc:  # a full disk, a permission lost mid-run: nothing written is lost
            kept = (
                f"checkpoint 'last' (step {keeper.saved_step}) is kept; resume when the cause is fixed"
                if keeper.saved_step >= 0
                else "no checkpoint had been written yet"
            )
            raise StorageError(f"{exc}; {kept}") from None
        finally:
            ledger.keep_what_is_known()  # the steps an exception caught between two settlings (one process)
            log.close()
            if samples is not None:
                samples.close()
        reporter.finish(counters.step)

    counters.elapsed_s = time.perf_counter() - started
    summary = _finish(parts, counters, run_dir, name, status, stop_reason, ctx, last_eval, steps.compiled)
    if ctx.is_main and hooks is not None and hooks.finished is not None:
        hooks.finished(run_dir)
    for tracker in trackers:
        tracker.finish(summary, run_dir)
    reporter.note(_final_line(summary))
    return summary


def _open_trackers(cfg: RunConfig, run_dir: Path, resume: bool) -> list[Any]:
    """TensorBoard / MLflow trackers asked for in ``log`` (their libraries load only then)."""
    if not (cfg.log.tensorboard or cfg.log.mlflow):
        return []
    from gradwise.train.tracking import open_trackers  # their libraries load only when asked for

    return open_trackers(cfg, run_dir, resume=resume)


# --------------------------------------------------------------------------- one optimizer step


def _train_step(
    parts: RunParts, step: int, steps: StepFunctions, ctx: distributed.Distributed
) -> tuple[StepResult, bool, int]:
    """Take the next batch, accumulate its gradient over micro-batches, and update the weights.

    ``steps`` runs a micro-batch's forward, loss and backward and the optimizer's update (eager, or
    compiled with ``model.compile: step``). Its forward goes through the model itself or its
    DistributedDataParallel wrapper, in which case this rank computes its stride of the global batch and
    DDP averages gradients. The training split stays on the host; each micro-batch moves to the device
    when it is used.
    """
    cfg, optimizer = parts.cfg, parts.optimizer
    epoch = parts.sampler.epoch
    for hook in parts.hooks:
        hook.before_step(step, epoch)
    planned = parts.plan.size(step, epoch)
    indices, epoch_ended = parts.sampler.take(planned)
    n = len(indices)  # fewer than planned at the end of an epoch
    # Scaled by the planned size: the short last batch of an epoch is not a batch-size change.
    lr_factor = parts.schedule.multiplier(step) * parts.plan.lr_scale(planned)
    for group in optimizer.param_groups:
        set_lr(group, group["base_lr"] * lr_factor)

    optimizer.zero_grad(set_to_none=True)
    dtype = parameter_dtype(cfg.precision)
    loss_sum = torch.zeros((), device=parts.device, dtype=dtype)
    train = parts.data.train
    # Sum over each micro-batch divided by the whole step's count of loss terms (examples, or
    # tokens for language models): the accumulated gradient equals the large-batch gradient
    # even when micro-batches are uneven.
    terms = parts.task.count(train.y[indices])
    # DDP averages gradients over ranks; each rank's share of the global sum is scaled back up by the world size.
    scale = ctx.world
    local = ctx.shard(indices)
    # Every rank runs as many micro-batches as the rank with the most rows: under FSDP every forward and
    # backward is a collective. A rank that runs short (or has no rows at all) joins with empty ones.
    count = min(cfg.batch.accumulate, math.ceil(n / ctx.world)) if ctx.active else None
    chunks = parts.plan.micro_batches(local, count)
    # Every micro-batch of the step is sent now: on CUDA the later copies overlap the earlier ones' compute.
    batches = [to_device(take(train, chunk, epoch), parts.device, dtype) for chunk in chunks]
    for i, (inputs, targets) in enumerate(batches):
        # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) once per optimizer step, with the last micro-batch.
        with gradient_sync(steps.net, enabled=not ctx.active or i == len(chunks) - 1):
            loss_sum += steps.backward(inputs, targets, terms, scale)

    # Penalty gradients, clipping, noise (at this 0-based step), decoupled weight decay: in that order.
    applied = parts.gradients.apply(optimizer, step)
    steps.update()
    for hook in parts.hooks:
        hook.after_optimizer_step(step + 1)  # e.g. pruned weights back to exactly zero; re-prune on schedule
    # The LR of optim.lr after schedule and batch scaling; groups with lr_multipliers use a multiple of it.
    grad_norm = applied.get("grad_norm")
    result = StepResult(loss=loss_sum / scale, lr=cfg.optim.lr * lr_factor, batch_size=n, grad_norm=grad_norm)
    return result, epoch_ended, terms


def _loss_function(parts: RunParts, net: nn.Module) -> Callable[[Any, Any], torch.Tensor]:
    """A micro-batch's summed loss, forward included: what ``model.compile: step`` compiles as one graph.

    It closes over plain locals, not ``parts``, so that a compiled graph guards on nothing else.
    """
    task, penalty, device, precision = parts.task, parts.batch_penalty, parts.device, parts.cfg.precision
    dtype = parameter_dtype(precision)

    def loss_sum(inputs: Any, targets: Any) -> torch.Tensor:
        with autocast(device, precision):
            outputs = net(inputs)
        # Losses are computed in the weights' dtype even when bf16 autocast ran the forward.
        loss = task.loss_sum(outputs.to(dtype), targets)
        if penalty is not None:  # the model's own per-batch term (L2 of the rows a batch looks up)
            term = penalty(inputs)
            loss = loss if term is None else loss + term.to(dtype)
        return loss

    return loss_sum


class _Silent:
    """What ranks other than 0 have instead of a metrics log and a checkpoint keeper: nothing is written."""

    saved_step = -1

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _eval_due(cfg: RunConfig, epoch_ended: bool, step: int, total_steps: int) -> bool:
    if step == total_steps:
        return True
    if cfg.eval.every_steps is not None:
        return step % cfg.eval.every_steps == 0
    return epoch_ended


# --------------------------------------------------------------------------- evaluation and checkpoints


def _evaluate(
    parts: RunParts,
    counters: Counters,
    log: MetricsLog | _Silent,
    reporter: ProgressReporter,
    ctx: distributed.Distributed,
) -> tuple[bool, Evaluation]:
    """Evaluate on the validation split, log it, feed the schedule and the stopper; (new best?, the evaluation)."""
    result = _evaluate_split(parts, "val", ctx)
    value = result.metrics[parts.monitor]
    log.write(
        {
            "kind": "eval",
            "step": counters.step,
            "epoch": round(parts.sampler.progress, 6),
            "split": "val",
            **result.metrics,
        }
    )
    log.flush()
    if not math.isfinite(value):
        raise TrainingError(
            f"{parts.monitor} is {value} at step {counters.step} "
            f"(epoch {parts.sampler.progress:.2f}): training diverged"
        )
    parts.schedule.on_eval(value)
    # While gradual pruning is still raising the sparsity, a "best" would be a denser model than the
    # one this run makes: only evaluations at the final sparsity may become best or count for patience.
    settled = all(hook.counts_evaluation(counters.step) for hook in parts.hooks)
    improved = parts.stopper.update(value, counters.step) if settled else False
    shown = "  ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    reporter.note(f"step {counters.step:>6}  epoch {parts.sampler.progress:6.2f}  {shown}{'  *' if improved else ''}")
    return improved, result


def _write_samples(parts: RunParts, step: int, samples: MetricsLog) -> None:
    """Greedy replies of the model to the first ``eval.samples`` validation prompts, one JSON line each."""
    prompts = parts.data.extras.get("sample_prompts")
    complete = getattr(parts.model, "complete", None)
    if prompts is None or complete is None:
        return
    n = min(parts.cfg.eval.samples, len(prompts.prompts))
    for i in range(n):
        reply = complete(prompts.prompts[i], parts.cfg.eval.sample_tokens, prompts.stop_ids)
        samples.write(
            {
                "step": step,
                "prompt": prompts.texts[i],
                "reply": prompts.decode(reply, skip_special_tokens=True),
                "reference": prompts.references[i],
            }
        )
    samples.flush()


def _evaluate_split(parts: RunParts, split: str, ctx: distributed.Distributed) -> Evaluation:
    data = getattr(parts.data, split)
    cfg = parts.cfg
    return evaluate(parts.net, parts.task, data, split, cfg.eval.batch_size, parts.device, cfg.precision, ctx=ctx)


def _training_state(parts: RunParts, counters: Counters, *, sharded: bool) -> dict[str, Any]:
    if sharded:
        # Keyed by parameter name: a sharded checkpoint must load into another process count's layout.
        optimizer_state = optimizer_state_dict(parts.model, parts.optimizer)
    else:
        optimizer_state = parts.optimizer.state_dict()
    return {
        "counters": asdict(counters),
        "optimizer": optimizer_state,
        "schedule": parts.schedule.state_dict(),
        "sampler": parts.sampler.state_dict(),
        "stopper": parts.stopper.state_dict(),
        **hook_states(parts.stateful()),  # each hook's and transform's state by its key ("noise", "pruner", …)
        "rng": capture_rng(),
    }


def _restore(parts: RunParts, counters: Counters, run_dir: Path, ctx: distributed.Distributed) -> None:
    """Load every piece of state from ``last`` so the run continues bit-for-bit."""
    ckpt = resolve_checkpoint(run_dir, "last")
    configured = configured_hyperparameters(parts.optimizer)
    if is_sharded(ckpt):
        # Weights and optimizer state come from the shards, into this run's layout (any process count).
        state = load_sharded_checkpoint(ckpt, parts.model, parts.optimizer, ctx=ctx)
    elif is_fully_sharded(parts.model):
        # A run saved without FSDP that continues with it: every rank keeps its shards of the full files.
        state = load_full_checkpoint_into_sharded(ckpt, parts.model, parts.optimizer, ctx=ctx)
    else:
        load_weights_into(parts.model, load_model_state(ckpt), ckpt)
        state = load_training_state(ckpt)
    branch = branched_at(run_dir)
    at_branch_point = branch is not None and branch[0] == int(state.get("counters", {}).get("step", -1))
    if at_branch_point and "optim.name" in branch[1]:
        # Another optimizer: the parent's moments mean nothing to it; it starts from the weights alone.
        warnings.warn(
            f"{run_dir}: optim.name changed in this branch; the optimizer state starts fresh",
            GradwiseWarning,
            stacklevel=2,
        )
        state = {k: v for k, v in state.items() if k != "optimizer"}
    try:
        _load_state(parts, counters, state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: training state does not match this run ({type(exc).__name__}: {exc})") from None
    if at_branch_point:  # the first steps of a branch: its new optimization applies
        reapply_hyperparameters(parts.optimizer, configured)


def _load_state(parts: RunParts, counters: Counters, state: dict[str, Any]) -> None:
    if "optimizer" in state:  # a sharded checkpoint's optimizer state is loaded with its weights
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.schedule.load_state_dict(state["schedule"])
    parts.sampler.load_state_dict(state["sampler"])
    parts.stopper.load_state_dict(state["stopper"])
    load_hook_states(parts.stateful(), state)
    restore_rng(state["rng"])
    for key, value in state["counters"].items():
        setattr(counters, key, value)


# --------------------------------------------------------------------------- the end of a run


def _finish(
    parts: RunParts,
    counters: Counters,
    run_dir: Path,
    name: str,
    status: str,
    stop_reason: str,
    ctx: distributed.Distributed,
    last_eval: tuple[int, Evaluation] | None = None,
    compiled: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """Final evaluation (of the best weights when asked) and the summary; plots are the caller's (``report``).

    The validation split is scored again only when its latest evaluation is not of the final weights
    (best weights restored, or the run stopped between evaluations): the same weights in eval mode
    give the same metrics, and a second pass would cost a whole validation run.
    """
    cfg = parts.cfg
    best_step = parts.stopper.best_step
    weights = "last"
    ctx.barrier()  # rank 0 has written the best checkpoint that every rank loads next
    if cfg.stop.restore_best and cfg.checkpoint.keep_best and best_step is not None and best_step != counters.step:
        best = resolve_checkpoint(run_dir, "best")
        committed = committed_step(run_dir, "best")
        if committed is not None and committed != best_step:
            # Never restore (and report) other weights than the best the stopper found.
            raise CheckpointError(
                f"{run_dir / 'checkpoints'}: 'best' is the checkpoint of step {committed}, but the run's best "
                f"evaluation was at step {best_step}; the checkpoints are damaged"
            )
        if is_sharded(best):
            load_sharded_checkpoint(best, parts.model, None, ctx=ctx)
        elif is_fully_sharded(parts.model):  # a best from before the run continued with FSDP
            load_full_weights_into_sharded(best, parts.model)
        else:
            load_weights_into(parts.model, load_model_state(best), best)
        weights = "best"
    if weights == "last" and last_eval is not None and last_eval[0] == counters.step:
        val, test = last_eval[1], None
    else:
        val, test = _evaluate_split(parts, "val", ctx), None
    final = dict(val.metrics)
    if len(parts.data.test.y):
        test = _evaluate_split(parts, "test", ctx)
        final.update(test.metrics)
    info = parts.data.info
    summary: dict[str, Any] = {
        "name": name,
        "status": status,
        "stop_reason": stop_reason,
        "task": info.kind,
        "loss": parts.task.loss_name,
        "data": info.source,
        "monitor": parts.monitor,
        "mode": parts.stopper.mode,
        "best": {"step": best_step, "value": parts.stopper.best, **_eval_line_at(run_dir, best_step)},
        "final": final,
        "final_weights": weights,
        "steps": counters.step,
        "total_steps": parts.total_steps,
        "epochs": round(parts.sampler.progress, 4),
        "examples": counters.examples,
        "wall_time_s": round(counters.elapsed_s, 3),
        "examples_per_s": round(counters.examples / max(counters.elapsed_s, 1e-9), 1),
        "parameters": count_parameters(parts.model),
        "trainable_parameters": sum(p.numel() for p in parts.model.parameters() if p.requires_grad),
        # What one process holds of the training state (the largest over ranks): FSDP divides it by the world.
        "state_mb_per_process": _state_mb_per_process(parts, ctx),
        "processes": ctx.world,
        "strategy": cfg.distributed.strategy if ctx.active else "single",
        "device": str(parts.device),
        "optimizer": cfg.optim.name,
        "schedule": cfg.schedule.name,
    }
    # Zeros among the weight matrices (what pruning prunes; models.weight_sparsity); FSDP's shards are not counted.
    sparsity = None if is_fully_sharded(parts.model) else weight_sparsity(parts.model)
    if sparsity is not None:
        summary["sparsity"] = round(sparsity, 6)
    if cfg.model.compile == "step" and compiled is not None:  # which halves of the step ran compiled in the end
        summary["compiled"] = compiled
    if parts.forward_module is not None:  # the head trained on features computed once (train.feature_cache)
        summary["features_cached"] = True
    if info.kind == "language_modeling":
        scored = "test" if test is not None else "val"
        if info.vocab_size:  # the baseline any context must beat: training-token frequencies, add-one smoothed
            baseline = unigram_perplexity(parts.data.train, getattr(parts.data, scored), info.vocab_size)
            if math.isfinite(baseline):
                summary["unigram_perplexity"] = {"split": scored, "value": round(baseline, 4)}
        summary["target_tokens"] = counters.loss_terms
        summary["target_tokens_per_s"] = round(counters.loss_terms / max(counters.elapsed_s, 1e-9), 1)
    if info.text_stats is not None:  # what tokenizing kept, cut and dropped; rows and padding of the layout
        summary["data_stats"] = info.text_stats
    confusion = (test or val).confusion
    if confusion is not None:
        summary["confusion_matrix"] = {
            "split": "test" if test else "val",
            "labels": info.class_names,
            "matrix": confusion,
        }
    if not ctx.is_main:
        return summary
    write_summary(run_dir, summary)
    for strategy in active_strategies(cfg):
        if strategy.finished is not None:
            strategy.finished(cfg, parts.model, run_dir)  # e.g. the (best) LoRA adapter alone, a few hundred KB
    return summary


def _state_mb_per_process(parts: RunParts, ctx: distributed.Distributed) -> dict[str, float]:
    held = state_bytes(parts.model, parts.optimizer)
    largest = ctx.max(torch.tensor([held["parameters"], held["optimizer"]], dtype=torch.float64))
    return {"parameters": round(float(largest[0]) / 2**20, 4), "optimizer": round(float(largest[1]) / 2**20, 4)}


def _eval_line_at(run_dir: Path, step: int | None) -> dict[str, float]:
    """The validation metrics logged at ``step`` (the run directory is the record)."""
    _, evals = read_metrics(run_dir)
    line = next((e for e in evals if e["step"] == step and e.get("split") == "val"), {})
    return {k: v for k, v in line.items() if k.startswith("val_")}


def _final_line(summary: dict[str, Any]) -> str:
    shown = "  ".join(f"{k} {v:.4g}" for k, v in summary["final"].items() if k.startswith("test_"))
    size = f"{summary['parameters']:,} parameters ({summary['trainable_parameters']:,} trainable)"
    if summary.get("sparsity"):  # only a model with zeros in its weight matrices (pruned) says so
        size += f", sparsity {summary['sparsity']:.4f}"
    return f"done: {summary['status']} ({summary['stop_reason']}); {shown or ''}; {size}"


@contextmanager
def _interrupt_flag() -> Iterator[Callable[[], bool]]:
    """First Ctrl-C/SIGTERM asks the loop to checkpoint and stop at the next step; a second one aborts."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
