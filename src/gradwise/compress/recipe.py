"""The schema of a compression recipe: named variants, each a chain of steps, and an accuracy budget.

A compression recipe is read against a trained run (``gradwise compress RUN_DIR
recipe.yaml``), so it holds no data or model of its own: each step starts from
the previous step's output (the run itself for the first step). Steps that
train (gradual pruning, recovery fine-tuning, quantization-aware training,
distillation) take ``train:`` overrides (``key.path: value``) on the source
run's config and go through the one training loop.

Example::

    budget: {max_drop: 0.01}
    variants:
      gradual-12x:
        - prune: {sparsity: 0.917, schedule: gradual}
          train: {stop.epochs: 20, optim.lr: 0.0005}
      distill-then-int8:
        - distill: {model: {hidden: [32]}, temperature: 4}
          train: {stop.epochs: 40}
        - quantize: {method: dynamic}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from gradwise.config import read_yaml
from gradwise.config.loading import describe_error
from gradwise.config.schema import Fraction, NonNegFloat, PositiveFloat, PositiveInt, Section
from gradwise.errors import ConfigError


class PruneStep(Section):
    """Magnitude pruning of weights (``sparsity``) or structured removal of units/channels (``structured``).

    ``schedule`` ``oneshot`` prunes once (then fine-tunes at that sparsity when
    the step has ``train`` overrides); ``gradual`` raises the sparsity while
    training on the Zhu & Gupta (2017) cubic schedule. ``structured`` is the
    fraction of every hidden layer's units or channels removed (Li et al. 2017,
    "Pruning Filters for Efficient ConvNets"), recovered by ``train`` when given.
    """

    sparsity: Fraction | None = None
    structured: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    scope: Literal["global", "layer"] = "global"
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    initial_sparsity: Fraction = 0.0
    every_steps: PositiveInt = 10
    begin_fraction: Fraction = 0.0
    end_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> PruneStep:
        if (self.sparsity is None) == (self.structured is None):
            raise ValueError("set exactly one of prune.sparsity (weights) and prune.structured (units/channels)")
        return self


class QuantizeStep(Section):
    """Post-training quantization (``dynamic``, ``weight_only``, ``static`` with calibration), or QAT first.

    ``none`` exports the fp32 model to ONNX Runtime unquantized: the reference that tells the
    runtime's own speed-up apart from what int8 adds.

    ``backend`` ``auto`` takes the backend measured fastest here for the method
    (see :data:`gradwise.compress.quantize.DEFAULT_BACKEND`); ``qat`` fine-tunes
    with fake quantization (the step's ``train`` overrides) before converting.
    """

    method: Literal["dynamic", "weight_only", "static", "none"] = "dynamic"
    bits: Literal[4, 8] = 8
    backend: Literal["auto", "torchao", "onnxruntime"] = "auto"
    group_size: PositiveInt = 32
    calibration_samples: PositiveInt = 256
    qat: bool = False

    @model_validator(mode="after")
    def _check(self) -> QuantizeStep:
        if self.method == "static" and self.bits != 8:
            raise ValueError("quantize.method 'static' is int8 only; set quantize.bits to 8")
        if self.method == "none" and (self.qat or self.backend == "torchao"):
            raise ValueError("quantize.method 'none' is an fp32 ONNX Runtime export: no qat, backend onnxruntime")
        if self.qat and self.method == "static":
            raise ValueError("quantize.qat fakes dynamic or weight-only quantization; use method dynamic/weight_only")
        return self


class DistillStep(Section):
    """Train a student (``model``: overrides on the teacher's model section) from the current model as teacher.

    Loss and temperature follow Hinton et al. 2015; see :class:`gradwise.config.DistillConfig`.
    """

    model: dict[str, Any]
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    temperature: PositiveFloat = 4.0
    feature_weight: NonNegFloat = 0.0


class Step(Section):
    """One link of a variant's chain: exactly one of ``prune``/``quantize``/``distill``/``finetune``."""

    prune: PruneStep | None = None
    quantize: QuantizeStep | None = None
    distill: DistillStep | None = None
    finetune: bool = False
    train: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Step:
        kinds = [k for k in ("prune", "quantize", "distill") if getattr(self, k) is not None]
        kinds += ["finetune"] if self.finetune else []
        if len(kinds) != 1:
            raise ValueError(
                f"a step is exactly one of prune, quantize, distill, finetune (got {', '.join(kinds) or 'none'})"
            )
        if self.trains and not self.train and self.kind != "finetune":
            raise ValueError(f"a {self.kind} step that trains needs train: overrides (at least stop.epochs)")
        return self

    @property
    def kind(self) -> str:
        for name in ("prune", "quantize", "distill"):
            if getattr(self, name) is not None:
                return name
        return "finetune"

    @property
    def trains(self) -> bool:
        """Whether this step runs the training loop."""
        if self.prune is not None:
            return self.prune.schedule == "gradual" or bool(self.train)
        if self.quantize is not None:
            return self.quantize.qat
        return True


class BudgetConfig(Section):
    """The largest allowed loss of quality against the source run, judged on the validation split.

    ``max_drop`` is absolute in the metric's units (0.01 = one accuracy point);
    ``metric`` ``auto`` is the source run's monitored metric. The validation
    split decides, so the reported test numbers stay an unbiased estimate.
    """

    max_drop: NonNegFloat = 0.01
    metric: str = "auto"


class MeasureConfig(Section):
    """How latency is measured: batch sizes, timed repeats after warm-up calls, torch threads."""

    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 64])
    repeats: PositiveInt = 30
    warmup: Annotated[int, Field(ge=0)] = 5
    threads: PositiveInt | None = None


class CompressRecipe(Section):
    """A whole compression recipe."""

    description: str = ""
    budget: BudgetConfig = BudgetConfig()
    measure: MeasureConfig = MeasureConfig()
    variants: dict[str, list[Step]]

    @model_validator(mode="after")
    def _check(self) -> CompressRecipe:
        if not self.variants:
            raise ValueError("variants: a compression recipe needs at least one variant")
        for name, steps in self.variants.items():
            if not steps:
                raise ValueError(f"variants.{name}: a variant needs at least one step")
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"variants.{name}: a variant name may hold letters, digits, '-' and '_' only")
            if any(step.quantize is not None for step in steps[:-1]):
                raise ValueError(f"variants.{name}: quantize must be the last step (later steps train fp32 weights)")
        return self


def load_compress_recipe(path: Path, overrides: list[str] | None = None) -> CompressRecipe:
    """Read and validate a compression recipe; ``key.path=value`` overrides apply first.

    Raises:
        ConfigError: the file is unreadable or a field is invalid (the message names the field).
    """
    from gradwise.config import apply_overrides

    raw = read_yaml(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        return CompressRecipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_error(exc, CompressRecipe)}") from None
