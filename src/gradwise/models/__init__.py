"""Models: each one a registered component that owns its config section (see gradwise.config.registry).

The built-in ones (``linear``, ``mlp``, ``cnn``, ``hf_encoder``, ``gpt``, the recommenders) are listed
under the entry-point group ``gradwise.models`` in pyproject.toml; a new model is one module with a
section, a builder and a :class:`~gradwise.config.registry.Component`.
"""

from __future__ import annotations

import torch
from torch import nn

from gradwise.config.kinds import MODELS, ModelSection
from gradwise.data.types import DataInfo
from gradwise.models.cnn import CNN
from gradwise.models.linear import LinearModel
from gradwise.models.mlp import MLP, make_activation

__all__ = ["CNN", "MLP", "LinearModel", "build_model", "count_parameters", "make_activation", "weight_sparsity"]


def build_model(cfg: ModelSection, info: DataInfo) -> nn.Module:
    """The model ``cfg.name`` with inputs and outputs sized from ``info`` (its component's builder).

    For a standardized regression target (``info.target_scale``) the model's outputs are mapped back
    to the target's units (see :func:`unstandardize_outputs`).

    Raises:
        ConfigError: the model cannot be built for this data (e.g. ``cnn`` on data without an image shape).
    """
    model = MODELS.get(cfg.name).builder()(cfg, info)
    if info.target_scale is not None and info.target_mean is not None:
        unstandardize_outputs(model, info.target_mean, info.target_scale)
    return model


def unstandardize_outputs(model: nn.Module, mean: float, scale: float) -> None:
    """Make ``model`` predict ``out · scale + mean``: it learns the standardized target, callers see its units.

    A forward hook, not a wrapper module: parameter names (checkpoints, LoRA targets, pruning groups)
    stay as the model defines them, and ``torch.export`` (hence ONNX) traces the hook with the model.
    The constants are buffers that are not saved (``data_info.json`` records them).
    """
    model.register_buffer("target_mean", torch.tensor(float(mean)), persistent=False)
    model.register_buffer("target_scale", torch.tensor(float(scale)), persistent=False)
    model.register_forward_hook(_unstandardize)


def _unstandardize(module: nn.Module, inputs: object, outputs: torch.Tensor) -> torch.Tensor:
    return outputs * module.target_scale.to(outputs.dtype) + module.target_mean.to(outputs.dtype)


def count_parameters(model: nn.Module) -> int:
    """Every parameter's element count, trainable or frozen (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def weight_sparsity(model: nn.Module) -> float | None:
    """The fraction of entries that are exactly zero over the model's weight matrices; None when it has none.

    Weight matrices are the parameters with two or more dimensions (Linear and Conv weights, attention
    projections), each shared tensor counted once, embedding tables (an ``nn.Embedding``'s weight, and an
    output layer tied to it) left out: the weights :mod:`gradwise.compress.prune` prunes by default, so a
    run pruned to ``prune.sparsity=s`` reports ``s`` (up to rounding). Biases and norm scales are not
    counted. A torchao-quantized weight is counted on its dequantized values.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    total = zeros = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() < 2 or id(param) in seen or id(param) in embeddings:
                continue
            seen.add(id(param))
            tensor = param.detach()
            if type(tensor) is not torch.Tensor and hasattr(tensor, "dequantize"):
                tensor = tensor.dequantize()
            total += tensor.numel()
            zeros += tensor.numel() - int(torch.count_nonzero(tensor))
    return zeros / total if total else None
