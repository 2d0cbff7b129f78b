"""Decoupled weight decay for optimizers that lack their own.

torch.optim.AdamW shrinks the weights by ``1 - lr·λ`` just before the Adam
update; this applies the same shrink to any optimizer, so ``adam`` + weight
decay is AdamW, ``sgd`` + weight decay is SGDW, and so on.
"""

from __future__ import annotations

import torch

from gradwise.optim.param_groups import DECOUPLED_WD_KEY


@torch.no_grad()
def apply_decoupled_weight_decay(optimizer: torch.optim.Optimizer) -> None:
    """Shrink each decaying parameter by ``1 - group["lr"] * λ``; call right before ``optimizer.step()``.

    Only groups whose ``decoupled_wd`` λ is positive are touched, and only
    parameters that have a gradient (as torch's optimizers skip the others).
    Groups built for natively decoupled optimizers carry λ = 0 here, so calling
    this for every optimizer never decays twice.

    Args:
        optimizer: An optimizer whose groups came from
            :func:`gradwise.optim.param_groups.build_param_groups`.

    References:
        Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (ICLR).
    """
    for group in optimizer.param_groups:
        lam = float(group.get(DECOUPLED_WD_KEY, 0.0))
        if lam <= 0.0:
            continue
        shrink = 1.0 - float(group["lr"]) * lam
        for p in group["params"]:
            if p.grad is not None:
                p.mul_(shrink)
