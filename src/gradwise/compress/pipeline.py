"""Running a compression recipe against a trained run: every variant's chain of steps, then one measurement.

Each step reads the previous step's run directory (the source run for the first
step) and writes its own; training steps call the one loop (``fit``) with the
source config plus the step's ``train`` overrides. A variant whose step loses
more than the budget on the validation metric is stopped there and marked
rejected — it is still measured and shown, never silently kept.

Layout::

    RUN/compressed/<variant>/            the variant (its last step): a run directory
    RUN/compressed/<variant>/steps/NN-*  earlier steps of a chain, and a step's own intermediates
                                         (NN-prune-structured before its recovery, NN-quantize-qat)
    RUN/compressed/comparison.{md,json}, pareto.png
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.compress.recipe import CompressRecipe, Step
from gradwise.compress.runs import load_run_model
from gradwise.compress.variant import finish_model_run, start_model_run
from gradwise.config import RunConfig, deep_copy, monitor_mode, set_path, validate
from gradwise.data.batches import gather, take
from gradwise.errors import CheckpointError, ConfigError
from gradwise.report.hooks import plotting_hooks
from gradwise.store.records import read_compression, write_compression
from gradwise.store.rundir import CONFIG_FILE, read_summary
from gradwise.train.device import to_device
from gradwise.train.loop import fit

COMPRESSED_DIR = "compressed"


@dataclass
class Budget:
    """The source run's validation value of ``metric`` and how much worse a variant may be."""

    metric: str
    mode: str
    baseline: float
    max_drop: float

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the baseline (negative when better)."""
        return self.baseline - value if self.mode == "max" else value - self.baseline

    def allows(self, value: float) -> bool:
        return self.drop(value) <= self.max_drop + 1e-12


@dataclass
class VariantResult:
    """What happened to one variant: its directory, status and the per-step record."""

    name: str
    directory: Path
    status: str  # accepted | rejected
    reason: str
    steps: list[dict[str, Any]] = field(default_factory=list)


def compress_run(
    run_dir: Path, recipe: CompressRecipe, *, only: list[str] | None = None, force: bool = False
) -> list[VariantResult]:
    """Make every variant of ``recipe`` (or those in ``only``) under ``run_dir/compressed``.

    A variant already made by the same steps is reused unless ``force``.

    Raises:
        CheckpointError: ``run_dir`` is not a finished run.
        ConfigError: an unknown variant in ``only``; a step that does not fit the model.
    """
    _refuse_interactions(run_dir)
    budget = source_budget(run_dir, recipe)
    _consolidate_source(run_dir)
    names = list(recipe.variants)
    if only:
        unknown = [n for n in only if n not in recipe.variants]
        if unknown:
            raise ConfigError(f"--only: no variant {', '.join(unknown)} in the recipe (variants: {', '.join(names)})")
    results = []
    for name in names:
        if only and name not in only:
            # Not asked for now, but made before by the same steps: it stays in the comparison.
            made = _finished(run_dir / COMPRESSED_DIR / name, recipe.variants[name])
            if made is not None:
                results.append(made)
            continue
        results.append(run_variant(run_dir, name, recipe.variants[name], budget, force=force))
    return results


def _refuse_interactions(run_dir: Path) -> None:
    """Compression measures and exports models that read feature rows or tokens; a recommender reads id columns."""
    from gradwise.config import read_saved_config, validate
    from gradwise.store.rundir import CONFIG_FILE

    if not (run_dir / CONFIG_FILE).is_file():
        return  # source_budget says what is missing
    cfg = validate(read_saved_config(run_dir / CONFIG_FILE), source=str(run_dir / CONFIG_FILE))
    if cfg.data.batch_format() == "interactions":
        raise ConfigError(
            f"compress: {run_dir} is a recommender run (model.name {cfg.model.name!r} on id columns); pruning, "
            "quantization and distillation here take models of feature rows or tokens"
        )


def _consolidate_source(run_dir: Path) -> None:
    """Give a source trained with FSDP its single best weights file, which is measured as the model on disk."""
    from gradwise.store.checkpoint import MODEL_FILE, resolve_checkpoint
    from gradwise.store.sharded import consolidate, is_sharded

    best = resolve_checkpoint(run_dir, "best")
    if is_sharded(best) and not (best / MODEL_FILE).exists():
        consolidate(best)


def _finished(target: Path, steps: list[Step]) -> VariantResult | None:
    """The variant in ``target`` if it was made, to the end, by exactly ``steps``."""
    plan = [step.model_dump(mode="json", exclude_defaults=True) for step in steps]
    done = read_compression(target) if (target / CONFIG_FILE).exists() else {}
    if done.get("plan") == plan and done.get("status") in ("accepted", "rejected"):
        return VariantResult(target.name, target, done["status"], done.get("reason", ""), done.get("steps", []))
    return None


def source_budget(run_dir: Path, recipe: CompressRecipe) -> Budget:
    """The budget against ``run_dir``'s final validation metrics (its best weights)."""
    if not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    summary = read_summary(run_dir)
    metric = summary.get("monitor", "val_loss") if recipe.budget.metric == "auto" else recipe.budget.metric
    final = summary.get("final", {})
    if metric not in final:
        available = ", ".join(k for k in final if k.startswith("val_")) or "none"
        raise ConfigError(f"budget.metric: {metric!r} is not among {run_dir}'s final metrics ({available})")
    return Budget(metric, monitor_mode(metric, "auto"), float(final[metric]), recipe.budget.max_drop)


def run_variant(run_dir: Path, name: str, steps: list[Step], budget: Budget, *, force: bool = False) -> VariantResult:
    """Run the chain of ``steps`` from ``run_dir`` into ``run_dir/compressed/<name>``."""
    target = run_dir / COMPRESSED_DIR / name
    plan = [step.model_dump(mode="json", exclude_defaults=True) for step in steps]
    made = None if force else _finished(target, steps)
    if made is not None:
        return made
    if target.exists():
        shutil.rmtree(target)
    (target / "steps").mkdir(parents=True)
    source, record_steps = run_dir, []
    status, reason = "accepted", ""
    for index, step in enumerate(steps, start=1):
        last = index == len(steps)
        out = target / "steps" / f"{index:02d}-{step.kind}"
        extra = run_step(step, source, out, name=f"{name}/{index:02d}-{step.kind}", monitor=budget.metric)
        value = float(read_summary(out)["final"][budget.metric])
        entry = {"step": index, "kind": step.kind, budget.metric: value, "drop": round(budget.drop(value), 6), **extra}
        record_steps.append(entry)
        source = out
        if not budget.allows(value):
            status = "rejected"
            reason = (
                f"step {index} ({step.kind}): {budget.metric} {value:.4f} is {budget.drop(value):.4f} worse than "
                f"the source run's {budget.baseline:.4f} (budget {budget.max_drop})"
            )
            break
        if last:
            break
    _promote(source, target)
    record = read_compression(target)
    record.update(
        {
            "variant": name,
            "source": str(run_dir),
            "plan": plan,
            "steps": record_steps,
            "status": status,
            "reason": reason,
        }
    )
    write_compression(target, record)
    return VariantResult(name, target, status, reason, record_steps)


def _promote(step_dir: Path, target: Path) -> None:
    """Move the variant's final step up into the variant directory itself (later steps never reference it)."""
    for entry in list(step_dir.iterdir()):
        shutil.move(str(entry), str(target / entry.name))
    step_dir.rmdir()
    steps = target / "steps"
    if steps.is_dir() and not any(steps.iterdir()):
        steps.rmdir()


# --------------------------------------------------------------------------- one step


def run_step(step: Step, source: Path, out: Path, *, name: str, monitor: str) -> dict[str, Any]:
    """Make ``out`` from ``source`` by one step; return what the step record should say about it."""
    if step.prune is not None:
        return _prune_step(step, source, out, name, monitor)
    if step.quantize is not None:
        return _quantize_step(step, source, out, name, monitor)
    if step.distill is not None:
        d = step.distill
        raw = _source_raw(source)
        student = deep_copy(d.model)
        if student.get("name", raw["model"].get("name")) != raw["model"].get("name"):
            raw["model"] = student  # another architecture: none of the teacher's own model settings apply
        raw["model"] = {**raw["model"], "init_from": None, **student}
        raw["distill"] = {
            "teacher": str(source),
            "alpha": d.alpha,
            "temperature": d.temperature,
            "feature_weight": d.feature_weight,
        }
        _train(raw, step, out, name, init_from=None)
        return {"student": d.model}
    _train(_source_raw(source), step, out, name, init_from=source)  # finetune
    return {}


def _prune_step(step: Step, source: Path, out: Path, name: str, monitor: str) -> dict[str, Any]:
    p = step.prune
    assert p is not None
    if p.structured is not None:
        from gradwise.compress.structured import prune_structured

        cfg, data, model, task, device = load_run_model(source, "best")
        rows = torch.arange(min(2, len(data.train.y)))
        example = to_device(take(data.train, rows)[0], device, next(model.parameters()).dtype)
        model, model_cfg = prune_structured(model, cfg.model, p.structured, example)
        pruned_cfg = cfg.model_copy(update={"model": model_cfg.model_copy(update={"init_from": None})})
        pruned = _beside(out, "structured") if step.train else out
        start_model_run(pruned, pruned_cfg, model.state_dict(), data, source)
        record = {"source": str(source), "structured": p.structured, "model": model_cfg.model_dump(mode="json")}
        finish_model_run(pruned, pruned_cfg, model, task, data, device, monitor=monitor, record=record)
        if step.train:
            _train(_source_raw(pruned), step, out, name, init_from=pruned)
        widths = {f"model_{key}": getattr(model_cfg, key) for key in ("hidden", "channels") if hasattr(model_cfg, key)}
        return {"structured": p.structured, **widths}
    assert p.sparsity is not None
    if p.schedule == "gradual" or step.train:
        raw = _source_raw(source)
        oneshot = p.schedule == "oneshot"
        raw["prune"] = {
            "sparsity": p.sparsity,
            # One-shot with recovery: prune to the target at the first step, then keep the mask while training.
            "initial_sparsity": p.sparsity if oneshot else p.initial_sparsity,
            "scope": p.scope,
            "begin_fraction": 0.0 if oneshot else p.begin_fraction,
            "end_fraction": p.end_fraction,
            "every_steps": p.every_steps,
            "include": p.include,
            "exclude": p.exclude,
        }
        _train(raw, step, out, name, init_from=source)
        return {"sparsity": p.sparsity, "scope": p.scope, "schedule": p.schedule}
    from gradwise.compress.prune import magnitude_prune

    cfg, data, model, task, device = load_run_model(source, "best")
    magnitude_prune(model, p.sparsity, p.scope, p.include, p.exclude)
    start_model_run(out, cfg, model.state_dict(), data, source)
    record = {"source": str(source), "sparsity": p.sparsity, "scope": p.scope}
    finish_model_run(out, cfg, model, task, data, device, monitor=monitor, record=record)
    return {"sparsity": p.sparsity, "scope": p.scope, "schedule": "oneshot"}


def _quantize_step(step: Step, source: Path, out: Path, name: str, monitor: str) -> dict[str, Any]:
    from gradwise.compress.quantize import DEFAULT_BACKEND, QuantizeSpec, restore_quantized, write_quantized

    q = step.quantize
    assert q is not None
    if q.qat:
        raw = _source_raw(source)
        raw["qat"] = {"method": q.method, "bits": q.bits, "group_size": q.group_size}
        trained = _beside(out, "qat")
        _train(raw, step, trained, name + "-qat", init_from=source)
        source = trained
    backend = DEFAULT_BACKEND[q.method] if q.backend == "auto" else q.backend
    spec = QuantizeSpec(
        method=q.method,
        bits=q.bits,
        backend=backend,
        group_size=q.group_size,
        calibration_samples=q.calibration_samples,
    )
    cfg, data, model, task, device = load_run_model(source, "best")
    fp32_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start_model_run(out, cfg, fp32_state, data, source)
    rows = torch.arange(min(q.calibration_samples, len(data.train.y)))
    work = out / ".onnx-work"  # the fp32 export and the quantized graph before it is written in place
    quantized = _quantize(model, spec, data, rows, device, work)
    quantization = write_quantized(out, quantized, spec)
    shutil.rmtree(work, ignore_errors=True)
    quantized = restore_quantized(out, model, quantization)  # evaluate exactly what was written
    record = {"source": str(source), "quantization": quantization}
    finish_model_run(out, cfg, quantized, task, data, device, monitor=monitor, record=record)
    return {"method": q.method, "bits": q.bits, "backend": backend, "qat": q.qat}


def _quantize(
    model: nn.Module, spec: Any, data: Any, rows: torch.Tensor, device: torch.device, work: Path
) -> nn.Module:
    """The quantized model: torchao in PyTorch, or an ONNX Runtime graph (exported, then quantized)."""
    from gradwise.compress.quantize import CALIBRATION_BATCH, quantize_model

    chunks = [rows[i : i + CALIBRATION_BATCH] for i in range(0, len(rows), CALIBRATION_BATCH)]
    if spec.backend == "torchao":
        calibration = to_device(take(data.train, rows)[0], device, next(model.parameters()).dtype)
        return quantize_model(model, spec, calibration if spec.method == "static" else None)
    from gradwise.compress.onnx_runtime import OnnxModule, export_onnx, quantize_onnx

    if isinstance(data.train.x, Mapping):  # a table's embedded categoricals: features and ids
        raise ConfigError(
            f"quantize.backend 'onnxruntime' exports a model of one input tensor; this one reads "
            f"{', '.join(data.train.x)} (a table with categorical embeddings): use quantize.backend torchao, "
            "or train with a data.one_hot_max above the largest category count"
        )

    batches = [gather(data.train.x, data.train.lengths, chunk).cpu().numpy() for chunk in chunks]
    work.mkdir(parents=True, exist_ok=True)
    example = gather(data.train.x, data.train.lengths, chunks[0][:2]).to(device)
    fp32 = export_onnx(model, example, work / "fp32.onnx")
    int8 = quantize_onnx(fp32, work / "int8.onnx", spec, batches if spec.method == "static" else None)
    return OnnxModule(int8)


def _beside(out: Path, what: str) -> Path:
    """A step's intermediate run (e.g. the structurally pruned model before recovery), next to the step.

    Not inside it: the last step is moved up into the variant directory, and the run that follows
    the intermediate names it in ``model.init_from``, which must stay valid.
    """
    return out.parent / f"{out.name}-{what}"


# --------------------------------------------------------------------------- training steps


def _source_raw(source: Path) -> dict[str, Any]:
    """The config that built ``source``, as a raw dict to edit (the finished run's own training settings)."""
    from gradwise.config import read_saved_config

    raw = read_saved_config(source / CONFIG_FILE)
    # Compression steps train in one process: an FSDP source's `distributed` settings do not carry over.
    for key in ("prune", "distill", "qat", "variants", "resume", "distributed"):
        raw.pop(key, None)
    # The source's weights arrive through model.init_from (LoRA folded in): the step trains the whole model.
    raw.pop("finetune", None)
    return raw


def _train(raw: dict[str, Any], step: Step, out: Path, name: str, *, init_from: Path | None) -> RunConfig:
    """Apply the step's ``train`` overrides and run the one loop into ``out``."""
    raw = deep_copy(raw)
    if init_from is not None:
        raw.setdefault("model", {})["init_from"] = str(init_from)
    for path, value in step.train.items():
        set_path(raw, str(path), value)
    raw["name"] = name
    raw["out_dir"] = str(out.parent)
    cfg = validate(raw, source=f"compress step {name} (train: overrides)")
    out.mkdir(parents=True, exist_ok=True)
    fit(cfg, out, hooks=plotting_hooks(cfg.log.plots))
    return cfg
