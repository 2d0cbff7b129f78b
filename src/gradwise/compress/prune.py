"""Unstructured magnitude pruning: which weights are prunable, one-shot pruning, sparsity counts, the schedule.

A *prunable weight* is a parameter with two or more dimensions (Linear and
Conv weights, attention projections): biases and normalization scales are
never pruned, they are few and pruning them hurts most. Embedding tables
(parameters of an ``nn.Embedding``, including an output layer tied to one)
are left out unless an include pattern other than the bare ``"*"`` names
them: in a pretrained transformer they are half the weights, and global
magnitude ranking would strip rare tokens' rows first.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from gradwise.errors import ConfigError

Scope = Literal["global", "layer"]
CATCH_ALL = "*"
# How many available names an error message lists.
_SHOWN_NAMES = 6


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, str, bool]]:
    """Every parameter with ≥ 2 dims once (a shared tensor keeps its first name), with whether it is an embedding."""
    seen: dict[int, int] = {}
    found: list[tuple[str, nn.Module, str, bool]] = []
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                continue
            is_embedding = isinstance(module, nn.Embedding)
            if id(param) in seen:
                # A tied output layer shares the embedding's tensor: an embedding table whichever owner comes first.
                index = seen[id(param)]
                name, owner, owner_attr, flag = found[index]
                found[index] = (name, owner, owner_attr, flag or is_embedding)
                continue
            seen[id(param)] = len(found)
            found.append((f"{module_name}.{attr}" if module_name else attr, module, attr, is_embedding))
    return found


def _available(names: Sequence[str]) -> str:
    if not names:
        return "none"
    more = f", … ({len(names)} in all)" if len(names) > _SHOWN_NAMES else ""
    return ", ".join(names[:_SHOWN_NAMES]) + more


def prunable_weights(
    model: nn.Module, include: Sequence[str] = (CATCH_ALL,), exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module, str]]:
    """The weights pruning acts on, as (parameter name, owning module, attribute name), in ``named_parameters`` order.

    A weight is selected when its name matches an ``include`` glob (fnmatch) and
    no ``exclude`` glob. Embedding tables are selected only by an include
    pattern other than ``"*"`` (see the module docstring).

    Raises:
        ConfigError: a pattern matches no prunable weight (the message lists some
            that exist), or nothing is left to prune.
    """
    candidates = _candidates(model)
    names = [name for name, *_ in candidates]
    for field, patterns in (("prune.include", include), ("prune.exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ConfigError(
                    f"{field}: pattern {pattern!r} matches no prunable weight (parameters with 2+ dimensions); "
                    f"available: {_available(names)}"
                )
    selected = []
    for name, module, attr, is_embedding in candidates:
        wanted = [p for p in include if fnmatch.fnmatchcase(name, p) and not (is_embedding and p == CATCH_ALL)]
        if wanted and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            selected.append((name, module, attr))
    if not selected:
        raise ConfigError(
            f"prune.include {list(include)} / prune.exclude {list(exclude)} leave no weight to prune; "
            f"prunable weights: {_available(names)} (embedding tables only when named by a pattern other than '*')"
        )
    return selected


def check_sparsity(sparsity: float, field: str = "prune.sparsity") -> None:
    """Raise ConfigError unless 0 ≤ ``sparsity`` < 1 (pruning every weight leaves no model)."""
    if not (isinstance(sparsity, int | float) and 0.0 <= sparsity < 1.0):
        raise ConfigError(f"{field}: got {sparsity!r}; a fraction of weights to zero, 0 <= sparsity < 1")


def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    scope: Scope = "global",
    include: Sequence[str] = (CATCH_ALL,),
    exclude: Sequence[str] = (),
) -> None:
    """Zero the smallest-magnitude weights in place, once, so that ``round(sparsity · n)`` of them are zero.

    ``global`` ranks all selected weights together (layers end up with
    different sparsities); ``layer`` prunes each tensor to ``sparsity``. The
    masks are made permanent (``prune.remove``), so parameter names, the
    state_dict keys and the Parameter objects an optimizer holds do not change.

    References:
        Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks".

    Raises:
        ConfigError: ``sparsity`` outside [0, 1), an unknown ``scope``, or a pattern matching nothing.
    """
    check_sparsity(sparsity)
    if scope not in ("global", "layer"):
        raise ConfigError(f"prune.scope: got {scope!r}; expected 'global' or 'layer'")
    weights = prunable_weights(model, include, exclude)
    targets = [(module, attr) for _, module, attr in weights]
    orders = {id(module): (module, list(module._parameters)) for module, _ in targets}
    with torch.no_grad():
        if scope == "global":
            torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
        else:
            for module, attr in targets:
                torch_prune.l1_unstructured(module, attr, amount=sparsity)
        for module, attr in targets:
            torch_prune.remove(
                module, attr
            )  # bake the mask into the weight; drops weight_orig/weight_mask and the hook
    # prune.remove registers the weight again after the bias; put the keys back in their order (state_dict, files).
    for module, order in orders.values():
        for key in order:
            module._parameters[key] = module._parameters.pop(key)


def sparsity_report(
    model: nn.Module, include: Sequence[str] = (CATCH_ALL,), exclude: Sequence[str] = ()
) -> dict[str, Any]:
    """True zero counts of the selected weights, read from the tensors (not from masks).

    Returns:
        ``{"weights": {name: {"numel", "nonzeros", "sparsity"}}, "numel", "nonzeros", "sparsity"}``;
        sparsity is the fraction of entries that are exactly zero.
    """
    per_weight: dict[str, dict[str, float | int]] = {}
    for name, module, attr in prunable_weights(model, include, exclude):
        tensor = getattr(module, attr).detach()
        numel, nonzeros = tensor.numel(), int(torch.count_nonzero(tensor))
        per_weight[name] = {"numel": numel, "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / numel}
    numel = sum(int(w["numel"]) for w in per_weight.values())
    nonzeros = sum(int(w["nonzeros"]) for w in per_weight.values())
    return {"weights": per_weight, "numel": numel, "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / numel}


def zhu_gupta_sparsity(
    step: int, initial: float, final: float, begin_step: int, end_step: int, every_steps: int
) -> float:
    """The scheduled sparsity after ``step`` optimizer steps: the cubic ramp at the last pruning point ≤ ``step``.

    Pruning points are ``begin_step + j · every_steps`` below ``end_step``, and
    ``end_step`` itself; at point t the sparsity is
    s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(t₁ − t₀))³. Before ``begin_step`` nothing
    is pruned (0); from ``end_step`` on it is ``final``.

    References:
        Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for model compression".

    Raises:
        ConfigError: ``every_steps`` < 1 or ``end_step`` < ``begin_step``.
    """
    if every_steps < 1:
        raise ConfigError(f"prune.every_steps: got {every_steps}; must be at least 1")
    if end_step < begin_step:
        raise ConfigError(f"prune: the end step ({end_step}) must not come before the begin step ({begin_step})")
    if step < begin_step:
        return 0.0
    if step >= end_step:  # also covers begin_step == end_step: one-shot pruning to the final sparsity
        return float(final)
    point = begin_step + (step - begin_step) // every_steps * every_steps
    remaining = 1.0 - (point - begin_step) / (end_step - begin_step)
    return float(final + (initial - final) * remaining**3)


def smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool tensor shaped like ``scores``, True at exactly ``k`` of its smallest entries.

    Ties at the k-th value go to the lowest flat indices, so the result is deterministic.
    """
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    # kthvalue is ~3x faster than topk(k) on CPU for the millions of weights of a transformer.
    threshold = torch.kthvalue(flat, k).values
    pruned = flat < threshold
    ties = torch.nonzero(flat == threshold).flatten()
    pruned[ties[: k - int(pruned.sum())]] = True
    return pruned.view_as(scores)


def pruned_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a sparsity zeroes: ``round(sparsity · numel)``, torch.nn.utils.prune's rounding."""
    return round(sparsity * numel)
