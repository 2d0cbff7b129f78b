"""Parameter groups: which parameters decay, and which get a learning-rate multiplier.

Every trainable parameter lands in exactly one group, keyed by (decays?, lr
multiplier). Each group carries both the torch options (``lr``,
``weight_decay``) and the bookkeeping the training loop reads:

- ``base_lr``: the group's lr before any schedule; the loop sets
  ``group["lr"] = group["base_lr"] * schedule_multiplier * batch_lr_scale``.
- ``decoupled_wd`` (:data:`DECOUPLED_WD_KEY`): the decoupled weight decay that
  :func:`gradwise.optim.weight_decay.apply_decoupled_weight_decay` applies for
  optimizers that have no decoupled decay of their own.
- ``penalize``: whether the loss penalties (l1/l2) apply to these parameters.
- ``group_name`` and ``param_names``: for logs and error messages.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from gradwise.config import OptimSection
from gradwise.errors import ConfigError

# Not "decoupled_weight_decay": torch.optim.Adam/AdamW/NAdam/RAdam read a group key of
# that name as a bool flag, so a 0.0 stored there would silently turn AdamW's decay coupled.
DECOUPLED_WD_KEY = "decoupled_wd"

# _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm*.
NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


def build_param_groups(
    model: nn.Module, cfg: OptimSection, weight_decay: float, *, native_decoupled: bool
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into optimizer parameter groups.

    Args:
        model: The model; only parameters with ``requires_grad`` are grouped.
        cfg: The optimizer section (``lr``, ``lr_multipliers``, ``no_decay_bias_norm``).
        weight_decay: Decoupled weight decay λ for the decaying groups.
        native_decoupled: True when the optimizer applies decoupled decay itself
            from ``group["weight_decay"]`` (AdamW, Adafactor, Muon); otherwise λ
            goes to ``group["decoupled_wd"]`` and torch's coupled
            ``weight_decay`` stays 0.

    Returns:
        Non-empty groups in order of first appearance in ``model.named_parameters()``.

    Raises:
        ConfigError: A pattern in ``optim.lr_multipliers`` matches no parameter.
    """
    named = list(model.named_parameters())
    all_names = [name for name, _ in named]
    _check_patterns(cfg.lr_multipliers, all_names)
    exempt = no_decay_names(model) if cfg.no_decay_bias_norm else set()

    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    patterns_used: dict[tuple[bool, float], list[str]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        decay = name not in exempt
        pattern, mult = _multiplier(name, cfg.lr_multipliers)
        key = (decay, mult)
        if key not in groups:
            lr = cfg.lr * mult
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": lr,
                "base_lr": lr,
                "weight_decay": weight_decay if (native_decoupled and decay) else 0.0,
                DECOUPLED_WD_KEY: weight_decay if (not native_decoupled and decay) else 0.0,
                "penalize": decay,
            }
            patterns_used[key] = []
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
        if pattern is not None and pattern not in patterns_used[key]:
            patterns_used[key].append(pattern)

    for key, group in groups.items():
        decay, mult = key
        label = "decay" if decay else "no_decay"
        if patterns_used[key]:
            label += f"*{mult:g} " + ",".join(patterns_used[key])
        group["group_name"] = label
    return list(groups.values())


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters exempt from decay: biases, 1-D tensors, normalization weights."""
    norm_ids = {id(p) for module in model.modules() if isinstance(module, NORM_MODULES) for p in module.parameters()}
    return {
        name
        for name, p in model.named_parameters()
        if p.ndim <= 1 or name.rsplit(".", 1)[-1] == "bias" or id(p) in norm_ids
    }


def _multiplier(name: str, patterns: dict[str, float]) -> tuple[str | None, float]:
    # First match in dict order wins, so a specific pattern listed first overrides a broad one.
    for pattern, factor in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            return pattern, float(factor)
    return None, 1.0


def _check_patterns(patterns: dict[str, float], names: list[str]) -> None:
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ConfigError(
                f"optim.lr_multipliers: pattern {pattern!r} matches no parameter (names look like: {sample})"
            )


def configured_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's configured hyperparameters: ``base_lr`` and the optimizer's declared ``defaults`` keys."""
    # A composite (Muon + AdamW) declares its hyperparameters in the torch optimizers it holds.
    inner = getattr(optimizer, "inner_optimizers", (optimizer,))
    declared = set().union(*(getattr(o, "defaults", {}) for o in (optimizer, *inner))) | {"base_lr"}
    declared -= set(getattr(optimizer, "stateful_group_keys", ()))
    return [{k: v for k, v in group.items() if k in declared} for group in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]]) -> None:
    """Put ``configured`` (taken before ``load_state_dict``) back over the loaded groups' values.

    ``load_state_dict`` restores the saved groups' lr, betas, momentum…; a run branched from a checkpoint
    with ``optim.lr=...`` must train with the new values. State an optimizer keeps in its groups (the
    adaptive rule's running sum, named in its ``stateful_group_keys``) stays as saved.
    """
    if len(configured) != len(optimizer.param_groups):
        return
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)
