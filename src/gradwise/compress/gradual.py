"""Gradual magnitude pruning inside the training loop (Zhu & Gupta 2017).

The loop calls :meth:`GradualPruner.after_step` right after every
``optimizer.step()``. At a pruning point the pruner ranks the tracked weights
by magnitude and zeroes the smallest up to the scheduled sparsity; after every
other step it only puts the already-pruned weights back to exactly zero (the
optimizer's momentum and weight decay move them). The masks are explicit bool
tensors held here, not torch.nn.utils.prune's reparametrization: that one
renames ``weight`` to ``weight_orig`` in the state_dict and adds a forward
hook, and checkpoints must keep the plain model's keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradwise.compress.prune import prunable_weights, pruned_count, smallest_mask, zhu_gupta_sparsity
from gradwise.config import PruneConfig
from gradwise.train.hooks import Hook
from gradwise.train.strategies import RunStrategy


class GradualPruner(Hook):
    """Prunes ``model`` in place on the cubic schedule of ``cfg`` over a run of ``total_steps`` optimizer steps.

    Pruning points run from ``round(begin_fraction · total_steps)`` every
    ``every_steps`` steps to ``round(end_fraction · total_steps)``, where the
    sparsity reaches ``cfg.sparsity`` and stays. Masks only grow: a weight
    pruned once stays pruned.

    Args:
        model: The model being trained; its Parameter objects are modified in place.
        cfg: The ``prune`` section.
        total_steps: Optimizer steps in the whole run.

    References:
        Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for model compression".

    Raises:
        ConfigError: an include/exclude pattern matches no prunable weight.
    """

    def __init__(self, model: nn.Module, cfg: PruneConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.weights = prunable_weights(model, cfg.include, cfg.exclude)
        self.begin_step = round(cfg.begin_fraction * total_steps)
        # Rounding can bring a short run's end onto its begin: then it is one-shot pruning at that step.
        self.end_step = max(round(cfg.end_fraction * total_steps), self.begin_step)
        self.target = 0.0  # the sparsity the current masks were computed for
        self.masks: dict[str, torch.Tensor] = {
            name: torch.zeros_like(getattr(module, attr), dtype=torch.bool) for name, module, attr in self.weights
        }  # True where a weight is pruned
        self._keep: dict[str, torch.Tensor] = {}  # 1 where kept, 0 where pruned, in the weight's dtype

    def scheduled(self, step: int) -> float:
        """The sparsity the schedule asks for after ``step`` optimizer steps."""
        cfg = self.cfg
        return zhu_gupta_sparsity(
            step, cfg.initial_sparsity, cfg.sparsity, self.begin_step, self.end_step, cfg.every_steps
        )

    state_key = "pruner"

    def after_optimizer_step(self, steps: int) -> None:
        self.after_step(steps)

    def counts_evaluation(self, steps: int) -> bool:
        """While the sparsity still rises, a "best" would be a denser model than the one this run makes."""
        return steps >= self.end_step

    def after_step(self, step: int) -> None:
        """Re-prune if ``step`` (optimizer steps done, 1-based) reached a new scheduled sparsity; re-apply the masks."""
        target = self.scheduled(step)
        if target > self.target:  # the schedule never decreases, so a change is a new pruning point
            self._update_masks(target)
            self.target = target
        if self.target > 0:
            self._apply()

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        tensors = [getattr(module, attr) for _, module, attr in self.weights]
        # Weights pruned earlier rank below every live weight (−1 < |w|): the masks stay nested, and exactly
        # round(s·n) weights are pruned even when a live weight happens to be exactly zero (torch's
        # L1Unstructured ranks by |w| alone and would break such ties arbitrarily).
        scores = [
            t.detach().abs().masked_fill(self.masks[name], -1.0)
            for (name, _, _), t in zip(self.weights, tensors, strict=True)
        ]
        if self.cfg.scope == "global":
            flat = torch.cat([s.flatten() for s in scores])
            pruned = smallest_mask(flat, pruned_count(sparsity, flat.numel()))
            offset = 0
            for (name, _, _), s in zip(self.weights, scores, strict=True):
                self.masks[name] = pruned[offset : offset + s.numel()].view_as(s).clone()  # no shared storage
                offset += s.numel()
        else:
            for (name, _, _), s in zip(self.weights, scores, strict=True):
                self.masks[name] = smallest_mask(s, pruned_count(sparsity, s.numel()))
        self._keep = {}

    @torch.no_grad()
    def _apply(self) -> None:
        if not self._keep:
            # Multiplying by a 0/1 tensor is ~4x faster than masked_fill_ with the bool mask (every step counts).
            self._keep = {
                name: (~self.masks[name]).to(getattr(module, attr).dtype) for name, module, attr in self.weights
            }
        for name, module, attr in self.weights:
            getattr(module, attr).mul_(self._keep[name])

    @torch.no_grad()
    def sparsity(self) -> float:
        """The measured fraction of the tracked weights that are exactly zero."""
        tensors = [getattr(module, attr) for _, module, attr in self.weights]
        total = sum(t.numel() for t in tensors)
        zeros = sum(t.numel() - int(torch.count_nonzero(t)) for t in tensors)
        return zeros / total

    def state_dict(self) -> dict[str, Any]:
        """The scheduled sparsity of the current masks and the masks (bool, True = pruned) by parameter name."""
        return {"target": self.target, "masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output and zero the pruned weights.

        Raises:
            KeyError: the saved masks are for other weights.
            ValueError: a saved mask has another shape than its weight.
        """
        masks = state["masks"]
        names = [name for name, _, _ in self.weights]
        if sorted(masks) != sorted(names):
            missing, extra = sorted(set(names) - set(masks)), sorted(set(masks) - set(names))
            raise KeyError(f"pruning masks do not match the pruned weights (missing {missing[:4]}, extra {extra[:4]})")
        restored = {}
        for name, module, attr in self.weights:
            weight, mask = getattr(module, attr), masks[name]
            if mask.shape != weight.shape:
                raise ValueError(f"pruning mask of {name} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
            restored[name] = mask.to(device=weight.device, dtype=torch.bool)
        self.masks = restored
        self._keep = {}
        self.target = float(state["target"])
        self._apply()


# The `prune:` section of a training config, registered as a strategy (pyproject entry point).
PRUNE_STRATEGY = RunStrategy(
    section="prune", hooks=lambda model, cfg, total_steps: [GradualPruner(model, cfg.prune, total_steps)]
)
