"""Knowledge distillation: a trained run's outputs become extra training targets of a new run.

:func:`attach_teacher` runs the teacher once over the training split (eval
mode, no gradient) and widens each training target from a label to the row
``[label, teacher logits…, teacher features…]``; :class:`DistillationTask`
reads those rows. The loop, the sampler and checkpoints need no change: the
teacher never runs while training, and a resumed run recomputes the same
targets. Validation and test keep their plain labels, so every metric is the
base task's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradwise.compress.runs import load_run_model, read_data_info
from gradwise.config import DistillConfig, RunConfig
from gradwise.data.batches import take
from gradwise.data.types import DataInfo, Dataset, Split
from gradwise.errors import CheckpointError, ConfigError
from gradwise.tasks import MetricMeter, Task
from gradwise.train.device import autocast, parameter_dtype, to_device
from gradwise.train.rng import capture_rng, restore_rng
from gradwise.train.strategies import RunStrategy


class HeadInputs:
    """The latest input of a model's ``head`` (its penultimate features), kept by a forward pre-hook.

    The loop calls ``model(x)`` and then ``task.loss_sum`` on that output, so the
    features held here always belong to the outputs being scored.
    """

    def __init__(self, head: nn.Module) -> None:
        self.value: Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.value = args[0]

    def latest(self, rows: int) -> Tensor:
        """The features of the last forward pass, which must have had ``rows`` examples."""
        if self.value is None or self.value.shape[0] != rows:
            raise RuntimeError("the student's head features do not belong to these outputs (call model(x) first)")
        return self.value

    def remove(self) -> None:
        """Detach the hook from the head."""
        self._handle.remove()


class DistillationTask:
    """The base classification task's loss blended with the teacher's softened outputs.

    For a row ``[label, t₁…t_C, f₁…f_F]`` and student logits ``s`` the loss is
    ``(1 − α)·CE(label, s) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``, plus
    ``feature_weight · mean_j (g_j − f_j)²`` with ``g`` the student's head input
    when ``feature_weight`` > 0. T² keeps the soft term's gradient,
    ``T·(softmax(s/T) − softmax(t/T))``, on the scale of the hard term's as T
    changes. The CE term is the base task's own (label smoothing included).
    A 1-D target (plain labels, as in validation) is scored by the base task alone.

    Args:
        base: The run's classification task: its meter, count and monitor are kept.
        n_classes: Width of the logits (the teacher's and the student's).
        alpha: Weight α of the soft term.
        temperature: Softmax temperature T.
        feature_weight: Weight of the feature term (0: none).
        student_features: The student's head inputs; required when ``feature_weight`` > 0.

    References:
        Hinton et al. 2015, "Distilling the Knowledge in a Neural Network";
        Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (feature term).
    """

    def __init__(
        self,
        base: Task,
        n_classes: int,
        alpha: float,
        temperature: float,
        feature_weight: float = 0.0,
        student_features: HeadInputs | None = None,
    ) -> None:
        if feature_weight > 0 and student_features is None:
            raise ValueError("feature_weight > 0 needs the student's head inputs (student_features)")
        self.base = base
        self.kind = base.kind
        self.loss_name = base.loss_name
        self.default_monitor = base.default_monitor
        self.n_classes = n_classes
        self.alpha = alpha
        self.temperature = temperature
        self.feature_weight = feature_weight
        self.student_features = student_features

    def loss_sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed distillation loss over the batch; ``targets`` ``(N, 1 + C [+ F])`` or plain labels ``(N,)``."""
        if targets.ndim == 1:
            return self.base.loss_sum(outputs, targets)
        c = self.n_classes
        if targets.shape[1] < 1 + c:
            raise ValueError(f"distillation targets need 1 + {c} columns (label, teacher logits), got {targets.shape}")
        # Labels travel as floats beside the logits; class indices are exact in float32.
        labels = targets[:, 0].round().long()
        total = outputs.new_zeros(())
        # Terms with weight 0 are skipped, so α = 0 reproduces the base task's loss bit for bit.
        if self.alpha < 1:
            total = total + (1 - self.alpha) * self.base.loss_sum(outputs, labels)
        if self.alpha > 0:
            t = self.temperature
            student = F.log_softmax(outputs / t, dim=1)
            teacher = F.log_softmax(targets[:, 1 : 1 + c].to(outputs.dtype) / t, dim=1)
            kl = F.kl_div(student, teacher, reduction="sum", log_target=True)
            total = total + self.alpha * t * t * kl
        if self.feature_weight > 0:
            assert self.student_features is not None
            mine = self.student_features.latest(outputs.shape[0]).to(outputs.dtype)
            theirs = targets[:, 1 + c :].to(outputs.dtype)
            total = total + self.feature_weight * (mine - theirs).pow(2).mean(dim=1).sum()
        return total

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean distillation loss over the batch."""
        return self.loss_sum(outputs, targets) / self.count(targets)

    def count(self, targets: Tensor) -> int:
        """One loss term per example, as in the base task."""
        return self.base.count(targets)

    def new_meter(self) -> MetricMeter:
        """The base task's meter: evaluation scores plain labels only."""
        return self.base.new_meter()


def attach_teacher(
    cfg: RunConfig, task: Task, data: Dataset, model: nn.Module, device: torch.device
) -> tuple[DistillationTask, Dataset]:
    """Load ``cfg.distill.teacher``, append its outputs on the training split to the labels, wrap the task.

    The teacher runs once, in eval mode under ``torch.no_grad``, over the
    training inputs mapped into its own feature scaling (the two runs may have
    standardized with different statistics). The global random generators are
    left as they were, so a distilled run draws the same dropout masks as the
    run it is compared with.

    Args:
        cfg: This (the student's) run config; ``cfg.distill`` must be set.
        task: The student's classification task.
        data: The student's data; only ``train.y`` changes.
        model: The student (for the feature term, its ``head`` input is captured).
        device: Where the teacher runs.

    Returns:
        The :class:`DistillationTask` and the data whose ``train.y`` is float32 ``(N, 1 + C [+ F])``.

    Raises:
        CheckpointError: the teacher directory or checkpoint is missing or corrupt.
        ConfigError: the teacher does not fit this run (task kind, classes, inputs or feature widths).
    """
    distill = cfg.distill
    if distill is None:
        raise ValueError("attach_teacher needs cfg.distill")
    if task.kind != "classification":
        raise ConfigError(f"distill needs a classification run; this run's task is {task.kind}")
    teacher_cfg, teacher, teacher_task, teacher_info = _load_teacher(distill)
    info = data.info
    _check_fits(distill.teacher, teacher_task, teacher_info, info)
    student_features = None
    teacher_head = None
    if distill.feature_weight > 0:
        student_head = _head(model, "this run's model")
        teacher_head = _head(teacher, f"the teacher {distill.teacher}")
        if student_head.in_features != teacher_head.in_features:
            raise ConfigError(
                f"distill.feature_weight: the student's head reads {student_head.in_features} features but the "
                f"teacher's reads {teacher_head.in_features}; the feature term needs equal widths (or set it to 0)"
            )
        student_features = HeadInputs(student_head)
    x = _to_teacher_scale(data.train.x, info, teacher_info)
    teacher = teacher.to(device)
    logits, features = teacher_outputs(
        teacher,
        Split(x=x, y=data.train.y, lengths=data.train.lengths),
        cfg.eval.batch_size,
        device,
        teacher_cfg.precision,
        teacher_head,
    )
    columns = [data.train.y.to(torch.float32).unsqueeze(1), logits]
    if features is not None:
        columns.append(features)
    train = dataclasses.replace(data.train, y=torch.cat(columns, dim=1))
    distilled = DistillationTask(
        task, info.n_outputs, distill.alpha, distill.temperature, distill.feature_weight, student_features
    )
    return distilled, dataclasses.replace(data, train=train)


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module,
    split: Split,
    batch_size: int,
    device: torch.device,
    precision: str,
    head: nn.Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The teacher's logits on every row of ``split`` (float32, CPU) and, with ``head``, that head's inputs.

    The teacher is put in eval mode (no dropout, BatchNorm running statistics) and runs without gradients.
    """
    teacher.eval()
    features = HeadInputs(head) if head is not None else None
    dtype = parameter_dtype(precision)
    logits: list[Tensor] = []
    kept: list[Tensor] = []
    try:
        for start in range(0, len(split), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(split)))
            x = to_device(take(split, rows)[0], device, dtype)  # floating inputs in the weights' dtype
            with autocast(device, precision):
                out = teacher(x)
            logits.append(out.float().cpu())
            if features is not None:
                kept.append(features.latest(len(rows)).float().cpu())
    finally:
        if features is not None:
            features.remove()
    return torch.cat(logits), (torch.cat(kept) if features is not None else None)


# --------------------------------------------------------------------------- helpers


def _load_teacher(distill: DistillConfig) -> tuple[RunConfig, nn.Module, Task, DataInfo]:
    """The teacher run's config, model (eval mode), task and DataInfo; the global RNGs are left untouched."""
    with _rng_untouched():
        try:
            teacher_cfg, teacher_data, teacher, teacher_task, _ = load_run_model(
                Path(distill.teacher), distill.checkpoint, with_data=False
            )
        except CheckpointError as exc:
            raise CheckpointError(f"distill.teacher: {exc}") from None
    info = read_data_info(Path(distill.teacher))
    if info is None:  # a run from before data_info.json was recorded: load_run_model rebuilt its data
        assert teacher_data is not None
        info = teacher_data.info
    return teacher_cfg, teacher, teacher_task, info


@contextmanager
def _rng_untouched() -> Iterator[None]:
    # Building the teacher initialises a model (and, for old runs, reseeds everything): without this a
    # distilled run would draw other dropout masks and batches than the plain run it is compared with.
    state = capture_rng()
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        restore_rng(state)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


def _check_fits(teacher_dir: Path, teacher_task: Task, teacher: DataInfo, student: DataInfo) -> None:
    where = f"distill.teacher: {teacher_dir}"
    if teacher_task.kind != "classification" or teacher.kind != "classification":
        raise ConfigError(f"{where} is a {teacher.kind} run; distillation needs a classification teacher")
    if teacher.n_outputs != student.n_outputs:
        raise ConfigError(
            f"{where} predicts {teacher.n_outputs} classes but this run has {student.n_outputs}; "
            "the teacher must be trained on the same classes"
        )
    if (
        teacher.class_names is not None
        and student.class_names is not None
        and teacher.class_names != student.class_names
    ):
        raise ConfigError(
            f"{where} has classes {_short(teacher.class_names)} but this run has {_short(student.class_names)}; "
            "the teacher must be trained on the same classes in the same order"
        )
    teacher_text, student_text = teacher.pad_token_id is not None, student.pad_token_id is not None
    if teacher_text != student_text:
        kinds = {True: "token ids", False: "numeric features"}
        raise ConfigError(f"{where} reads {kinds[teacher_text]} but this run's inputs are {kinds[student_text]}")
    if teacher_text:
        if (teacher.vocab_size, teacher.pad_token_id) != (student.vocab_size, student.pad_token_id):
            raise ConfigError(
                f"{where} was trained with another tokenizer (vocabulary {teacher.vocab_size}, pad id "
                f"{teacher.pad_token_id}; this run: {student.vocab_size}, {student.pad_token_id})"
            )
    elif teacher.n_features != student.n_features:
        raise ConfigError(f"{where} reads {teacher.n_features} features but this run's data has {student.n_features}")


def _to_teacher_scale(x: Tensor, student: DataInfo, teacher: DataInfo) -> Tensor:
    """Numeric inputs standardized with the student's statistics, re-standardized with the teacher's."""
    if student.pad_token_id is not None or (student.feature_mean, student.feature_std) == (
        teacher.feature_mean,
        teacher.feature_std,
    ):
        return x
    raw = x.double()
    if student.feature_mean is not None and student.feature_std is not None:
        raw = raw * torch.tensor(student.feature_std, dtype=torch.float64) + torch.tensor(
            student.feature_mean, dtype=torch.float64
        )
    if teacher.feature_mean is not None and teacher.feature_std is not None:
        raw = (raw - torch.tensor(teacher.feature_mean, dtype=torch.float64)) / torch.tensor(
            teacher.feature_std, dtype=torch.float64
        )
    return raw.to(x.dtype)


def _head(model: nn.Module, what: str) -> nn.Linear:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"distill.feature_weight: {what} has no Linear 'head' whose input could be matched")
    return head


def _short(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', …' if len(names) > limit else ''}]"


# The `distill:` section of a training config, registered as a strategy (pyproject entry point).
DISTILL_STRATEGY = RunStrategy(section="distill", attach_data=attach_teacher)
