"""Structured pruning: physically remove hidden units and channels, giving a smaller dense model.

Unlike magnitude pruning, which leaves zeros in tensors of the same shape,
this shrinks the tensors, so the model is faster on any hardware. Torch-Pruning
traces the model's dependency graph, so removing a hidden unit also removes
the matching input column of the next layer and the entries of its
normalization layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradwise.config import ModelSection
from gradwise.errors import ConfigError
from gradwise.models.cnn import CNN
from gradwise.models.mlp import MLP
from gradwise.train.device import to_device

# Group L1 magnitude of each unit's weights (Li et al. 2017 rank conv filters by their L1 norm).
_NORM_P = 1


def prune_structured(
    model: nn.Module, model_cfg: ModelSection, amount: float, example_input: torch.Tensor
) -> tuple[nn.Module, ModelSection]:
    """Remove ``amount`` of every hidden layer's units (MLP widths; CNN channels and hidden fc) by magnitude.

    Each layer keeps ``int(width · (1 − amount))`` units, those whose weights
    (together with the next layer's weights that read them) have the largest
    L1 norm. The input is never pruned, nor the out-features of ``head``.
    ``model`` is left unchanged; the pruned copy is returned with the
    ModelSection that describes it, so ``build_model(new_cfg, info)`` builds the
    same architecture and loads the copy's state_dict strictly.

    Args:
        model: A built ``mlp`` or ``cnn`` (:class:`~gradwise.models.mlp.MLP`, :class:`~gradwise.models.cnn.CNN`).
        model_cfg: The config that built it.
        amount: Fraction of units to remove from each hidden layer, 0 < amount < 1.
        example_input: A batch of inputs (e.g. two training rows) for tracing the graph.

    Returns:
        The smaller model (in the input model's train/eval mode) and its ModelSection.

    References:
        Fang et al. 2023, "DepGraph: Towards Any Structural Pruning"; Li et al. 2017, "Pruning Filters for
        Efficient ConvNets".

    Raises:
        ConfigError: another model kind, or ``amount`` outside (0, 1) or so large that a layer would have no unit.
    """
    if model_cfg.name not in ("mlp", "cnn") or not isinstance(model, MLP | CNN):
        raise ConfigError(
            f"structured pruning supports model.name mlp and cnn; got {model_cfg.name!r} ({type(model).__name__})"
        )
    if not 0.0 < amount < 1.0:
        raise ConfigError(f"structured pruning amount: got {amount!r}; the fraction of units to remove, 0 < amount < 1")
    widths = _hidden_widths(model)
    if not widths:
        raise ConfigError(
            f"structured pruning: this {model_cfg.name} has no hidden layer to shrink (model.hidden is [])"
        )
    if any(int(w * (1 - amount)) < 1 for w in widths):
        raise ConfigError(f"structured pruning amount {amount} would leave no unit in a layer of widths {widths}")
    import torch_pruning as tp  # slow to import; only this step needs it

    pruned = copy.deepcopy(model)
    was_training = pruned.training
    # Trace in eval mode: a training-mode forward would update BatchNorm statistics and draw dropout noise.
    pruned.eval()
    device = next(pruned.parameters()).device
    # A table's categorical embeddings come in a mapping: wrapped in a tuple, torch-pruning passes it whole
    # (a bare dict would be spread as keyword arguments); the embedding tables are inputs, never pruned.
    example = to_device(example_input, device, next(pruned.parameters()).dtype)
    embeddings = list(getattr(pruned, "embeddings", []))
    pruner = tp.pruner.BasePruner(
        pruned,
        (example,) if isinstance(example, dict) else example,
        importance=tp.importance.MagnitudeImportance(p=_NORM_P),
        pruning_ratio=amount,
        global_pruning=False,  # every layer loses the same fraction, so the result is a plain config
        ignored_layers=[pruned.head, *embeddings],
    )
    pruner.step()
    pruned.train(was_training)
    return pruned, _describe(pruned, model_cfg)


def _hidden_widths(model: MLP | CNN) -> list[int]:
    if isinstance(model, MLP):
        return [block.linear.out_features for block in model.body]
    widths = [block.conv.out_channels for block in model.features]
    if hasattr(model.hidden, "linear"):
        widths.append(model.hidden.linear.out_features)
    return widths


def _describe(model: MLP | CNN, cfg: ModelSection) -> ModelSection:
    """The ModelSection whose ``hidden``/``channels`` build ``model``'s architecture."""
    widths = _hidden_widths(model)
    if isinstance(model, MLP):
        return cfg.model_copy(update={"hidden": widths})
    n_conv = len(model.features)
    update: dict[str, list[int]] = {"channels": widths[:n_conv]}
    if len(widths) > n_conv:  # the CNN reads only hidden[0] (its fc width); later entries stay as they were
        update["hidden"] = [widths[n_conv], *cfg.hidden[1:]]
    return cfg.model_copy(update=update)
