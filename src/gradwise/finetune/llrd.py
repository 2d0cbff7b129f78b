"""Layer-wise learning-rate decay: lower layers of a pretrained body move less than the top.

With ``L`` blocks numbered ``l = 1..L`` from the bottom, the factor on ``optim.lr`` is

- head (and anything above the blocks, such as a final norm): ``1``
- block ``l``: ``decay^(L − l + 1)`` (the top block gets ``decay``)
- embeddings: ``decay^(L + 1)``

i.e. depth ``d`` below the head gets ``decay^d``, counting the head as depth 0,
the top block as 1 and the embeddings as ``L + 1``: the convention of BEiT/timm
and of the BERT fine-tuning literature. (ELECTRA's released code counts one
more level, so every body factor there carries an extra ``decay``.)

The result is an ``optim.lr_multipliers`` mapping of glob patterns to factors,
so the optimizer builder applies it like any user-given multiplier.
"""

from __future__ import annotations

from torch import nn

from gradwise.errors import ConfigError
from gradwise.finetune.freezing import model_parts


def layer_lr_multipliers(model: nn.Module, decay: float) -> dict[str, float]:
    """Glob pattern → LR factor for every block and the embeddings of a :class:`TransformerModel`.

    A block's pattern is its module prefix (``body.encoder.layer.3.*``); the
    embeddings get their common module prefix (``body.embeddings.*``) when they
    share one that nothing else has, else one pattern per parameter name. The
    head gets ``head.*`` → 1. Every pattern matches at least one parameter and no
    two patterns match the same one, so the order does not matter.

    Args:
        model: The model (its parameter names are the ones the optimizer sees).
        decay: The per-layer factor in (0, 1] (``finetune.layer_lr_decay``).

    Raises:
        ConfigError: ``decay`` is out of range or the model is not a transformer.

    References:
        Clark et al. 2020, "ELECTRA" (layer-wise LR decay); Sun et al. 2019,
        "How to Fine-Tune BERT for Text Classification".
    """
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"finetune.layer_lr_decay: got {decay}; expected a factor in (0, 1]")
    parts = model_parts(model)
    every = [name for name, _ in model.named_parameters()]
    n_blocks = len(parts.blocks)
    multipliers: dict[str, float] = {}
    if parts.embeddings:
        for pattern in _patterns(parts.embeddings, every):
            multipliers[pattern] = decay ** (n_blocks + 1)
    for layer, names in enumerate(parts.blocks, start=1):
        for pattern in _patterns(names, every):
            multipliers[pattern] = decay ** (n_blocks - layer + 1)
    for pattern in _patterns(parts.head, every):
        multipliers[pattern] = 1.0
    return multipliers


def _patterns(names: list[str], every: list[str]) -> list[str]:
    """``prefix.*`` for the longest dotted prefix all ``names`` share and no other name has, else the names."""
    if not names:
        return []
    shared = names[0].split(".")[:-1]
    for name in names[1:]:
        parts = name.split(".")[:-1]
        n = 0
        while n < min(len(shared), len(parts)) and shared[n] == parts[n]:
            n += 1
        shared = shared[:n]
    own = set(names)
    prefix = ".".join(shared) + "."
    # A shorter prefix than the longest shared one can only catch more names, so only this one is tried.
    if shared and all(name in own for name in every if name.startswith(prefix)):
        return [prefix + "*"]
    return list(names)
