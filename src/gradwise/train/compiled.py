"""The two halves of an optimizer step, eager or compiled: a micro-batch's loss and backward, and the update.

``model.compile: step`` compiles both with ``torch.compile``:

- the micro-batch loss (forward, the task's loss, the model's batch penalty) is one graph, and
  AOTAutograd traces its backward from it, so ``loss.backward()`` runs a compiled backward too;
- the optimizer's update is a second graph (torch's compiled optimizer), for the optimizers of
  ``torch.optim`` that compile (their LR becomes a 0-d tensor filled in place, so a schedule does not
  recompile the update every step). A fused optimizer (gradwise's default Adam/AdamW) is already one
  kernel per parameter list and stays as it is; gradwise's own optimizers run eagerly.

Between the two, the gradient chain (penalties, clipping, noise, decoupled decay) and the hooks run
eagerly, in the same order as without compilation. Parameter names, checkpoints and resume are
unchanged: the model itself is never replaced. If the first compiled call fails (no C++ compiler for
inductor, an operation dynamo cannot trace), the run goes on eagerly after one warning that names why.

CUDA graphs (``mode="reduce-overhead"``) are not used: the loop hands the compiled function new input
tensors every step, which CUDA graphs would copy into static buffers, and that path has never run here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from gradwise.errors import GradwiseWarning, TrainingError

LossSum = Callable[[Any, Any], torch.Tensor]


class StepFunctions:
    """What ``_train_step`` calls for a micro-batch (:meth:`backward`) and for the update (:meth:`update`).

    Args:
        net: The module the forward goes through (the model, or its DDP wrapper): gradient sync is its.
        loss_sum: ``loss_sum(inputs, targets)``, the micro-batch's summed loss (forward through ``net``).
        optimizer: The run's optimizer.
        compile_step: Compile both halves (``model.compile: step``); otherwise both run eagerly.
        distributed: The gradients are synchronized by DDP/FSDP hooks during backward. A failed first
            compiled backward may have left them half-run, so there is no eager retry: the run stops.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        loss_sum: LossSum,
        optimizer: torch.optim.Optimizer,
        *,
        compile_step: bool,
        distributed: bool = False,
    ) -> None:
        self.net = net
        self.optimizer = optimizer
        self._distributed = distributed
        self._eager_loss = loss_sum
        # dynamic=True: one graph for every batch shape. A graph specialized to the first shape and recompiled
        # at the first short batch would make the kernels a run uses depend on where it was resumed.
        self._loss: LossSum | None = torch.compile(loss_sum, dynamic=True) if compile_step else None
        self._loss_ran = False
        self._update: Callable[[], Any] | None = None
        self._update_ran = False
        if compile_step and _compiles_update(optimizer):
            _tensor_lrs(optimizer)
            self._update = torch.compile(optimizer.step)

    @property
    def compiled(self) -> dict[str, bool]:
        """Which halves run compiled now (for the summary)."""
        return {"loss_and_backward": self._loss is not None, "update": self._update is not None}

    def backward(self, inputs: Any, targets: Any, terms: int, scale: int) -> torch.Tensor:
        """Forward, loss ÷ the step's loss terms (× ``scale`` ranks), backward; returns the detached loss."""
        if self._loss is None:
            return _backward(self._eager_loss(inputs, targets), terms, scale)
        if self._loss_ran:
            try:
                return _backward(self._loss(inputs, targets), terms, scale)
            except Exception as exc:
                if not _is_compile_failure(exc):
                    raise
                # A recompile for a new kind of shape (a rank's empty share, one row) failed mid-run.
                raise _compile_error("the loss and its backward", exc) from None
        try:
            loss = _backward(self._loss(inputs, targets), terms, scale)
        except Exception as exc:  # dynamo and inductor raise many types; only the first call may fall back
            if self._distributed:
                raise _compile_error("the loss and its backward", exc) from None
            _warn_fallback("the loss and its backward", exc)
            self._loss, self._update = None, None
            _float_lrs(self.optimizer)
            # The first micro-batch of the first step: nothing but this failed attempt has touched the gradients.
            self.optimizer.zero_grad(set_to_none=True)
            return _backward(self._eager_loss(inputs, targets), terms, scale)
        self._loss_ran = True
        return loss

    def update(self) -> None:
        """``optimizer.step()``, compiled when it can be."""
        if self._update is None or self._loss is None:  # a loss that fell back to eager takes the update with it
            self.optimizer.step()
            return
        try:
            self._update()
        except Exception as exc:
            if self._update_ran and not _is_compile_failure(exc):
                raise
            # Unlike the loss, a failed update cannot simply be redone: some parameters may already have
            # moved. The run stops here, before anything of this step is written.
            raise _compile_error(f"the {type(self.optimizer).__name__} update", exc) from None
        self._update_ran = True


def set_lr(group: dict[str, Any], value: float) -> None:
    """Set a param group's LR, in place when it is a tensor (a compiled update reads it without recompiling)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr.fill_(value)
    else:
        group["lr"] = value


def _backward(loss: torch.Tensor, terms: int, scale: int) -> torch.Tensor:
    # Sum over the micro-batch ÷ the whole step's count of loss terms: accumulated micro-batches give the
    # large-batch gradient even when they are uneven. DDP averages over ranks; × world size undoes that.
    loss = loss / terms
    if scale != 1:
        loss = loss * scale
    loss.backward()
    return loss.detach()


def _compiles_update(optimizer: torch.optim.Optimizer) -> bool:
    """torch.optim's own optimizers, unfused, that take their LR as a tensor."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        return False  # gradwise's own rules (custom.py) and wrappers: eager
    if any(group.get("fused") for group in optimizer.param_groups):
        return False  # already one kernel per parameter list
    # torch refuses a tensor LR for an explicit foreach=True unless the optimizer is capturable.
    return not any(group.get("foreach") and not group.get("capturable") for group in optimizer.param_groups)


def _tensor_lrs(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):  # a resumed compiled run's state already holds one
            group["lr"] = torch.tensor(float(group["lr"]))


def _is_compile_failure(exc: Exception) -> bool:
    # Imported here: importing dynamo costs ~2 s, and only a run that called torch.compile gets this far.
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def _float_lrs(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])


def _compile_error(what: str, exc: Exception) -> TrainingError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return TrainingError(
        f"model.compile=step: torch.compile could not compile {what} ({type(exc).__name__}: {first[:200]}); "
        "use model.compile=model (the forward only) or false"
    )


def _warn_fallback(what: str, exc: Exception) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    warnings.warn(
        f"model.compile=step: torch.compile could not compile {what} ({type(exc).__name__}: {first[:200]}); "
        "training eagerly instead",
        GradwiseWarning,
        stacklevel=3,
    )
