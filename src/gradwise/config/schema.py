"""The typed schema of a run: one pydantic section per concern.

Every section forbids unknown keys; validators check what a single field
cannot (a schedule's required parameter, full-batch GD's batch size).
Loading, overrides and error messages live in :mod:`gradwise.config.loading`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, TypeAdapter, model_validator

from gradwise.config.base import Fraction, NonNegFloat, PositiveFloat, PositiveInt, Section
from gradwise.config.kinds import DATA, MODELS, OPTIMIZERS
from gradwise.config.registry import Registry

ScheduleName = Literal[
    "constant",
    "exponential",
    "step",
    "multistep",
    "linear",
    "cosine",
    "polynomial",
    "wsd",
    "plateau",
    "onecycle",
]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)


class TaskConfig(Section):
    """What is predicted and how it is scored; ``auto`` follows the data.

    ``ranking`` learns from implicit feedback (BPR, Rendle et al. 2009) and is scored by HR@``k`` and
    NDCG@``k`` over every item the user has not rated; interactions data with ``kind: auto`` is rating
    regression (RMSE, MAE). ``preference`` tunes a causal LM on chosen/rejected pairs: ``loss`` ``dpo``
    (Rafailov et al. 2023) or ``ipo`` (Azar et al. 2023), with ``beta`` the strength of the pull
    towards the reference model (the model as loaded).
    """

    kind: Literal["auto", "classification", "regression", "language_modeling", "ranking", "preference"] = "auto"
    loss: Literal["auto", "cross_entropy", "mse", "mae", "huber", "bpr", "dpo", "ipo"] = "auto"
    label_smoothing: Fraction = 0.0
    huber_delta: PositiveFloat = 1.0
    k: PositiveInt = 10
    beta: PositiveFloat = 0.1

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.kind == "ranking" and self.loss not in ("auto", "bpr"):
            raise ValueError(f"task.loss {self.loss!r} does not apply to ranking (bpr)")
        if self.loss == "bpr" and self.kind != "ranking":
            raise ValueError("task.loss 'bpr' needs task.kind 'ranking'")
        if self.loss in ("dpo", "ipo") and self.kind not in ("auto", "preference"):
            raise ValueError(f"task.loss {self.loss!r} needs task.kind 'preference' (chosen/rejected pairs)")
        if self.kind == "preference" and self.loss not in ("auto", "dpo", "ipo"):
            raise ValueError(f"task.loss {self.loss!r} does not apply to preference tuning (dpo or ipo)")
        if self.beta != 0.1 and self.kind not in ("auto", "preference"):
            raise ValueError("task.beta is the DPO/IPO temperature; it needs task.kind 'preference'")
        if self.k != 10 and self.kind != "ranking":
            raise ValueError("task.k is the cutoff of ranking metrics (HR@k, NDCG@k); it needs task.kind 'ranking'")
        if self.kind == "language_modeling" and self.loss not in ("auto", "cross_entropy"):
            raise ValueError(f"task.loss {self.loss!r} does not apply to language modeling (cross-entropy)")
        if self.kind == "regression" and self.loss == "cross_entropy":
            raise ValueError("task.loss 'cross_entropy' needs task.kind 'classification'")
        if self.kind == "classification" and self.loss in ("mse", "mae", "huber"):
            raise ValueError(f"task.loss {self.loss!r} needs task.kind 'regression'")
        return self


class ScheduleConfig(Section):
    """Learning-rate schedule as a multiplier on ``optim.lr`` per optimizer step.

    ``warmup_steps`` puts a linear warmup in front of any schedule; ``warmup_fraction`` sizes it as a
    fraction of the run's optimizer steps instead (rounded, at least one step when above 0), so a recipe
    keeps its shape on a table of any size or a shortened run.
    """

    name: ScheduleName = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    warmup_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    gamma: PositiveFloat | None = None  # > 1 grows the LR (exponential): the LR range test does
    step_size: PositiveInt | None = None
    milestones: list[PositiveInt] = []
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    power: PositiveFloat = 1.0
    decay_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    patience: Annotated[int, Field(ge=0)] = 5
    threshold: NonNegFloat = 1e-4
    cooldown: Annotated[int, Field(ge=0)] = 0
    pct_start: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3
    div_factor: PositiveFloat = 25.0
    final_div_factor: PositiveFloat = 1e4

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError("schedule.warmup_steps and schedule.warmup_fraction both size the warmup; set one")
        if self.name == "exponential" and self.gamma is None:
            raise ValueError("schedule.gamma is required for 'exponential' (the per-step factor, e.g. 0.999)")
        if self.name == "step" and self.step_size is None:
            raise ValueError("schedule.step_size is required for 'step' (optimizer steps between decays)")
        if self.name == "multistep" and not self.milestones:
            raise ValueError("schedule.milestones is required for 'multistep' (a list of optimizer steps)")
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"schedule.milestones must be increasing, got {self.milestones}")
        return self


class LoraConfig(Section):
    """Low-rank adapters through PEFT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.05
    # None: PEFT's defaults for the architecture (query/value for BERT, q_proj/v_proj for Llama and Qwen2, c_attn
    # for GPT-2).
    target_modules: list[str] | None = None


class FinetuneConfig(Section):
    """How a pretrained body is adapted.

    ``head_only`` trains only the new head (a linear probe on frozen
    features); ``freeze_embeddings`` / ``freeze_layers`` / ``freeze`` (glob
    patterns over parameter names) freeze parts of the body; with
    ``unfreeze_every_epochs`` the body starts frozen and one more layer, from
    the top, becomes trainable every that many epochs (Howard & Ruder 2018,
    ULMFiT); ``layer_lr_decay`` gives block l of L (1 = bottom) the LR
    lr·decay^(L−l+1) and the embeddings lr·decay^(L+1), the head lr
    (Clark et al. 2020, ELECTRA); ``lora`` trains low-rank adapters only;
    ``neftune_alpha`` adds uniform noise to embeddings while training (Jain et
    al. 2023, NEFTune). Under ``head_only`` the frozen body runs as at
    inference (eval mode: no dropout), so its features are the same every
    epoch; with ``cache_features`` (the default) a model that can split its
    forward (``features`` / ``head_forward``) computes them once per split and
    the head trains on the cache.
    """

    head_only: bool = False
    freeze_embeddings: bool = False
    freeze_layers: Annotated[int, Field(ge=0)] = 0
    freeze: list[str] = []
    unfreeze_every_epochs: PositiveInt | None = None
    layer_lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    lora: LoraConfig | None = None
    neftune_alpha: NonNegFloat = 0.0
    cache_features: bool = True

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.lora is not None and (self.head_only or self.unfreeze_every_epochs):
            raise ValueError("finetune.lora trains adapters only; it cannot be combined with head_only or unfreezing")
        if self.head_only and self.unfreeze_every_epochs:
            raise ValueError("finetune.head_only and finetune.unfreeze_every_epochs contradict each other")
        return self


class BatchRamp(Section):
    """Linear batch-size ramp from ``start`` up to ``batch.size`` over ``steps`` optimizer steps."""

    start: PositiveInt
    steps: PositiveInt


class BatchConfig(Section):
    """Examples per optimizer step and how they get there.

    ``size`` is the effective batch per optimizer step (``full`` = the whole
    training set) and the batch ``optim.lr`` is tuned for; ``accumulate`` splits
    it into that many micro-batches without changing the optimization. A
    ``ramp`` or ``at_epochs`` makes the batch size change during training, and
    ``lr_scaling`` rescales the LR by (b / size) or its square root when it does.
    """

    size: PositiveInt | Literal["full"] = 32
    accumulate: PositiveInt = 1
    ramp: BatchRamp | None = None
    at_epochs: dict[Annotated[int, Field(ge=0)], PositiveInt] | None = None
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"

    @model_validator(mode="after")
    def _check(self) -> BatchConfig:
        if self.ramp is not None and self.at_epochs is not None:
            raise ValueError("batch.ramp and batch.at_epochs cannot both be set; pick one batch-size schedule")
        if self.size == "full" and (self.ramp is not None or self.at_epochs is not None):
            raise ValueError("batch.size 'full' cannot be combined with a batch-size schedule")
        return self


class PruneConfig(Section):
    """Gradual magnitude pruning while training (Zhu & Gupta 2017, "To prune, or not to prune").

    The sparsity of the pruned weights rises from ``initial_sparsity`` to
    ``sparsity`` on the cubic schedule s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(t₁ − t₀))³,
    re-pruning by magnitude every ``every_steps`` optimizer steps between
    ``begin_fraction`` and ``end_fraction`` of the run; the rest of the run
    recovers at the final sparsity. ``scope`` ``global`` ranks all pruned
    weights together, ``layer`` prunes each tensor to the same sparsity.
    ``include``/``exclude`` are glob patterns over parameter names; only
    weights with two or more dimensions are ever pruned.
    """

    sparsity: Fraction
    initial_sparsity: Fraction = 0.0
    scope: Literal["global", "layer"] = "global"
    begin_fraction: Fraction = 0.0
    end_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.75
    every_steps: PositiveInt = 10
    include: list[str] = ["*"]
    exclude: list[str] = []

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.initial_sparsity > self.sparsity:
            raise ValueError(
                f"prune.initial_sparsity ({self.initial_sparsity}) must not exceed prune.sparsity ({self.sparsity})"
            )
        if self.begin_fraction >= self.end_fraction:
            raise ValueError(
                f"prune.begin_fraction ({self.begin_fraction}) must be below prune.end_fraction ({self.end_fraction})"
            )
        return self


class DistillConfig(Section):
    """Knowledge distillation from a trained run (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    The loss is (1 − α)·CE(y, s) + α·T²·KL(softmax(t/T) ‖ softmax(s/T)) with the
    teacher ``teacher`` (a run directory, its ``checkpoint``) in eval mode under
    no_grad; ``feature_weight`` > 0 adds the mean squared error between the
    student's and the teacher's penultimate features (the input of ``head``;
    Romero et al. 2015, "FitNets"), which needs equal widths.
    """

    teacher: Path
    checkpoint: str = "best"
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    temperature: PositiveFloat = 4.0
    feature_weight: NonNegFloat = 0.0


class QATConfig(Section):
    """Quantization-aware training: fake quantization in the forward pass while training.

    (Jacob et al. 2018, "Quantization and Training of Neural Networks for
    Efficient Integer-Arithmetic-Only Inference".) ``method`` ``dynamic`` fakes
    int8 per-token activations and int8 (or int4) weights; ``weight_only`` fakes
    the weights only. ``group_size`` applies to 4-bit weights.
    """

    method: Literal["dynamic", "weight_only"] = "dynamic"
    bits: Literal[4, 8] = 8
    group_size: PositiveInt = 32


class RegularizeConfig(Section):
    """Penalties and gradient clipping.

    ``l1``/``l2`` are added to the loss (``l2`` as (λ/2)·‖w‖², coupled with the
    gradient); ``weight_decay`` is decoupled (Loshchilov & Hutter 2019):
    θ ← θ − η·λ·θ beside the optimizer update. Biases and norm weights are
    exempt when ``optim.no_decay_bias_norm`` is true.
    """

    l1: NonNegFloat = 0.0
    l2: NonNegFloat = 0.0
    weight_decay: NonNegFloat = 0.0
    clip_grad_norm: PositiveFloat | None = None


class NoiseConfig(Section):
    """Annealed Gaussian gradient noise, variance eta / (1 + t)^gamma (Neelakantan et al. 2015)."""

    eta: NonNegFloat = 0.0
    gamma: NonNegFloat = 0.55


class StopConfig(Section):
    """When training ends: a budget of epochs/steps and optional early stopping.

    ``monitor`` is a logged evaluation metric such as ``val_loss`` or
    ``val_accuracy`` (``auto``: accuracy for classification, loss for
    regression); ``mode`` ``auto`` minimises losses and errors and maximises
    the rest. Early stopping is on when ``patience`` is set; the best
    checkpoint is chosen by the same metric.
    """

    epochs: PositiveInt | None = 10
    max_steps: PositiveInt | None = None
    monitor: str = "auto"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: Annotated[int, Field(ge=0)] | None = None
    min_delta: NonNegFloat = 0.0
    restore_best: bool = True

    @model_validator(mode="after")
    def _check(self) -> StopConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set stop.epochs or stop.max_steps so training has an end")
        return self


def monitor_mode(monitor: str, mode: Literal["auto", "min", "max"]) -> Literal["min", "max"]:
    """Whether a smaller or a larger ``monitor`` value is better."""
    if mode != "auto":
        return mode
    lowered = monitor.lower()
    return "min" if any(k in lowered for k in ("loss", "mse", "mae", "error", "perplexity")) else "max"


class EvalConfig(Section):
    """How often the validation split is evaluated (None = at the end of every epoch).

    ``samples`` > 0 (chat and instruct data): at each evaluation the model also answers the first
    that many validation prompts, greedily and up to ``sample_tokens`` new tokens, into
    ``samples.jsonl`` beside the reference replies, so a run shows how its answers change.
    """

    every_steps: PositiveInt | None = None
    batch_size: PositiveInt = 1024
    samples: Annotated[int, Field(ge=0, le=64)] = 0
    sample_tokens: PositiveInt = 48


class CheckpointConfig(Section):
    """Checkpoints: ``last`` for resuming, ``best`` (by ``stop.monitor``) for evaluation.

    ``last`` is written at an evaluation when ``min_interval_s`` seconds have
    passed since the previous write (0 = at every evaluation), every
    ``every_steps`` steps when set, and always when the run ends or is
    interrupted.
    """

    every_steps: PositiveInt | None = None
    min_interval_s: NonNegFloat = 30.0
    keep_best: bool = True


class LogConfig(Section):
    """Console progress, the plots written at the end of a run, and experiment trackers.

    ``tensorboard`` writes TensorBoard event files to ``RUN/tensorboard/``;
    ``mlflow`` is an MLflow tracking URI (``local`` = an SQLite store,
    ``<out_dir>/mlruns.db``; MLflow 3 refuses plain file stores) that gets the
    config as params, every logged metric and the run's summary, plots and
    config as artifacts.
    """

    progress: bool = True
    plots: bool = True
    tensorboard: bool = False
    mlflow: str | None = None


class DistributedConfig(Section):
    """How the processes of a torch.distributed job share a run (ignored by a single process).

    ``ddp`` replicates the model and averages gradients (DistributedDataParallel);
    ``fsdp`` shards parameters, gradients and optimizer state over the ranks
    with FSDP2's ``fully_shard`` on every block and at the root, so each rank
    holds about 1/N of the training state (Zhao et al. 2023, "PyTorch FSDP";
    Rajbhandari et al. 2020, "ZeRO"). ``mixed_precision: bf16`` is FSDP's
    parameter/all-gather dtype (gradient reductions stay fp32);
    ``reshard_after_forward: false`` keeps gathered blocks until backward
    (more memory, fewer all-gathers); ``cpu_offload`` keeps the shards in CPU
    memory between uses (CUDA only). A rank that waits ``timeout_s`` seconds in
    a collective gives up, so a dead peer ends the job instead of hanging it.
    """

    strategy: Literal["ddp", "fsdp"] = "ddp"
    # No fp16: it needs loss scaling (a GradScaler) that FSDP's reduce-scatter path does not get here.
    mixed_precision: Literal["bf16"] | None = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    timeout_s: PositiveInt = 300

    @model_validator(mode="after")
    def _check(self) -> DistributedConfig:
        if self.strategy != "fsdp":
            for name in ("mixed_precision", "cpu_offload"):
                if getattr(self, name) not in (None, False):
                    raise ValueError(f"distributed.{name} is an FSDP setting; set distributed.strategy=fsdp")
            if not self.reshard_after_forward:
                raise ValueError("distributed.reshard_after_forward is an FSDP setting; set distributed.strategy=fsdp")
        return self


class RunConfig(Section):
    """A whole run. ``variants`` trains the same recipe once per named set of overrides."""

    name: str | None = None
    description: str = ""
    seed: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["fp32", "bf16", "fp64"] = "fp32"
    deterministic: bool = False
    out_dir: Path = Path("runs")
    resume: Path | None = None
    data: DATA.field() = DATA.default_section()  # type: ignore[valid-type]
    model: MODELS.field() = MODELS.default_section()  # type: ignore[valid-type]
    task: TaskConfig = TaskConfig()
    optim: OPTIMIZERS.field() = OPTIMIZERS.default_section()  # type: ignore[valid-type]
    schedule: ScheduleConfig = ScheduleConfig()
    batch: BatchConfig = BatchConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    regularize: RegularizeConfig = RegularizeConfig()
    noise: NoiseConfig = NoiseConfig()
    stop: StopConfig = StopConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    distributed: DistributedConfig = DistributedConfig()
    prune: PruneConfig | None = None
    distill: DistillConfig | None = None
    qat: QATConfig | None = None
    variants: dict[str, dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.optim.name == "gd" and self.batch.size != "full":
            raise ValueError(
                f"optim.name 'gd' is full-batch gradient descent; set batch.size=full (got {self.batch.size})"
            )
        if self.finetune.lora is not None and self.model.name not in ("hf_encoder", "hf_causal_lm"):
            raise ValueError(
                f"finetune.lora supports model.name 'hf_encoder' and 'hf_causal_lm' only (got {self.model.name!r})"
            )
        if self.eval.samples and (self.data.name not in ("chat", "instruct") or self.model.name != "hf_causal_lm"):
            raise ValueError(
                "eval.samples generates replies to chat prompts: it needs data.name chat or instruct "
                "and model.name hf_causal_lm"
            )
        if self.eval.samples and self.distributed.strategy == "fsdp":
            raise ValueError("eval.samples cannot generate from an FSDP-sharded model; use ddp or leave it at 0")
        if self.task.kind == "preference" and self.model.init_from is not None:
            raise ValueError(
                "task.kind preference scores against the model as loaded from model.path; instead of model.init_from, "
                "export that run (gradwise export RUN --format hf) and set model.path to the export"
            )
        if getattr(self.model, "load_in_4bit", False) and self.finetune.lora is None:
            raise ValueError(
                "model.load_in_4bit freezes the base in 4-bit (QLoRA): set finetune.lora to train adapters"
            )
        if self.finetune != FinetuneConfig() and not self.model.body and self.model.init_from is None:
            bodies = ", ".join(c.name for c in MODELS if c.section.body)
            raise ValueError(
                f"finetune.* needs a transformer body (model.name {bodies}) or model.init_from; "
                f"model.name is {self.model.name!r}"
            )
        made = self.data.batch_format()
        if made not in self.model.takes:
            readers = ", ".join(c.name for c in MODELS if made in c.section.takes) or "none"
            raise ValueError(
                f"model.name {self.model.name!r} does not fit data.name {self.data.name!r}: the data makes "
                f"{made} batches, the model reads {' or '.join(self.model.takes)} (models that read {made}: {readers})"
            )
        _check_recommender_settings(self)
        if self.distill is not None and self.task.kind in ("regression", "language_modeling", "ranking", "preference"):
            raise ValueError(f"distill needs a classification task (task.kind is {self.task.kind!r})")
        if self.distributed.strategy == "fsdp":
            # Each of these holds references to whole parameters that fully_shard replaces with shards.
            refused = {
                "finetune.lora": self.finetune.lora is not None,
                "finetune.unfreeze_every_epochs": self.finetune.unfreeze_every_epochs is not None,
                "prune": self.prune is not None,
                "qat": self.qat is not None,
            }
            for name, used in refused.items():
                if used:
                    raise ValueError(f"{name} cannot be combined with distributed.strategy=fsdp; use ddp")
            if self.optim.name == "adafactor":
                # torch.optim.Adafactor updates its row/column statistics in place, which sharded tensors refuse.
                raise ValueError("optim.name adafactor cannot run on FSDP-sharded parameters; use ddp or another one")
        if self.distributed.strategy == "fsdp" and "interactions" in self.model.takes:
            # Embedding lookups of the model's own penalty run outside the sharded forward; sparse gradients
            # cannot be reduce-scattered.
            raise ValueError(
                f"model.name {self.model.name!r} cannot be sharded with distributed.strategy=fsdp; use ddp"
            )
        if self.schedule.name == "onecycle" and (self.schedule.warmup_steps or self.schedule.warmup_fraction):
            raise ValueError(
                "schedule 'onecycle' has its own warmup (pct_start); leave schedule.warmup_steps and "
                "schedule.warmup_fraction at 0"
            )
        return self


def _check_recommender_settings(cfg: RunConfig) -> None:
    """What sparse-gradient embeddings and id tables rule out, in one line each."""
    sparse = bool(getattr(cfg.model, "sparse", False))
    if cfg.optim.sparse != "sparse_adam" and not sparse:
        raise ValueError(
            f"optim.sparse is the optimizer of sparse-gradient embeddings; model.name {cfg.model.name!r} has none "
            "(set model.sparse=true on a recommender, or leave optim.sparse unset)"
        )
    if "interactions" in cfg.model.takes and cfg.noise.eta > 0:
        raise ValueError(
            "noise.eta would move row 0 of every embedding table (the user or item unseen in training, kept at "
            "zero for the bias-only prediction); gradient noise is not available for recommenders"
        )
    if sparse:
        reg = cfg.regularize
        dense_only = {
            "regularize.l1": reg.l1 > 0,
            "regularize.l2": reg.l2 > 0,
            "regularize.clip_grad_norm": reg.clip_grad_norm is not None,
        }
        for name, used in dense_only.items():
            if used:
                raise ValueError(
                    f"{name} acts on every row of every table, which sparse gradients cannot hold; with "
                    "model.sparse=true use the model's own per-row L2 (model.l2, model.row_l2) or dense tables"
                )


def _factory(registry: Registry[Any]) -> Any:
    """``ModelConfig(name=..., **fields)``-style construction of a component's section, validated."""
    adapter = TypeAdapter(registry.field())

    def make(**fields: Any) -> Any:
        return adapter.validate_python(fields)

    make.__doc__ = f"The {registry.path} section of the component ``name`` (default {registry.default!r})."
    return make


# The sections of registered components, built by name: ModelConfig(name="gpt", n_layer=2).
ModelConfig = _factory(MODELS)
DataConfig = _factory(DATA)
OptimConfig = _factory(OPTIMIZERS)
