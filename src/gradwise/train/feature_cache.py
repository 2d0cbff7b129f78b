"""Frozen-feature caching: a probe's frozen body runs once per split, not once per batch of every epoch.

When everything below a model's head is frozen and deterministic (``finetune.head_only``, whose frozen
body runs in eval mode), the body's output for a row is the same at every step. Computing it once per
split and training the head on the cached vectors gives the run the uncached one would have (the same
batches in the same order, the same dropout draws before the head; the features differ only by the
rounding of other padding widths, well within 1e-5), at the cost of the head alone per step.

A model offers the split by two methods: ``features(inputs)`` (everything under the head) and
``head_forward(features)``. The cache is kept in memory on the host, beside the split it replaces
(a sentence vector is a few hundred floats per row); each batch moves to the device when used, as
any split's does. The weights, the checkpoints and evaluation of the full model are unchanged: the
module the loop's forward goes through is a view of the same model.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from gradwise.config import RunConfig
from gradwise.data import Dataset, Split
from gradwise.data.batches import take
from gradwise.train.device import autocast, parameter_dtype, to_device
from gradwise.train.hooks import Hook


class HeadOverFeatures(nn.Module):
    """The model's head (with what ``head_forward`` adds, e.g. dropout) over cached features.

    Holds the whole model as its child so that ``train()``/``eval()`` reach the head's dropout; only the
    head's parameters receive gradients.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The model's outputs for rows whose ``features`` were cached."""
        return self.model.head_forward(features)


def why_not_cached(cfg: RunConfig, model: nn.Module, hooks: list[Hook], *, fully_shard: bool) -> str | None:
    """None when the run may train its head on cached features; otherwise why not (for tests and logs)."""
    ft = cfg.finetune
    if not (ft.head_only and ft.cache_features):
        return "only finetune.head_only runs cache features (finetune.cache_features)"
    if not (callable(getattr(model, "features", None)) and callable(getattr(model, "head_forward", None))):
        return f"{type(model).__name__} does not split its forward into features and head_forward"
    if hooks or ft.neftune_alpha > 0:
        return "a strategy acts inside the steps (its hooks or NEFTune noise change what the body computes)"
    if any(section is not None for section in (cfg.distill, cfg.prune, cfg.qat)):
        return "compression strategies need the whole forward"
    if fully_shard:
        return "a fully sharded body gathers its weights inside every forward"
    head = {id(p) for p in model.head.parameters()}
    if any(p.requires_grad for p in model.parameters() if id(p) not in head):
        return "parameters outside the head train"
    return None


@torch.no_grad()
def cache_features(model: nn.Module, data: Dataset, cfg: RunConfig, device: torch.device) -> Dataset:
    """``data`` with every split's inputs replaced by the model's features of them (float32, on the host).

    The rows keep their order and targets. The splits lose their token lengths, collate and draw (they
    shaped token batches); the caller builds the sampler from the original lengths, so that length
    buckets draw the same batches as without the cache.
    """
    was_training = model.training
    model.eval()
    dtype = parameter_dtype(cfg.precision)
    splits = {}
    for name in ("train", "val", "test"):
        split: Split = getattr(data, name)
        parts = []
        for start in range(0, len(split), cfg.eval.batch_size):
            rows = torch.arange(start, min(start + cfg.eval.batch_size, len(split)))
            inputs, _ = to_device(take(split, rows), device, dtype)
            with autocast(device, cfg.precision):
                parts.append(model.features(inputs).to("cpu", dtype))
        width = parts[0].shape[1] if parts else 0
        x = torch.cat(parts) if parts else torch.empty(0, width, dtype=dtype)
        splits[name] = replace(split, x=x, lengths=None, collate=None, draw=None)
    model.train(was_training)
    return replace(data, **splits)
