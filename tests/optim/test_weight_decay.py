import copy

import torch
from torch import nn

from gradwise.config import OptimConfig
from gradwise.optim.param_groups import DECOUPLED_WD_KEY, build_param_groups
from gradwise.optim.weight_decay import apply_decoupled_weight_decay

STEPS = 20


def _grads(params: list[torch.Tensor], steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(steps)]


def test_adam_plus_decoupled_decay_equals_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ref_model = copy.deepcopy(model)
    lam, lr = 0.1, 0.05
    groups = build_param_groups(model, OptimConfig(lr=lr), lam, native_decoupled=False)
    ours = torch.optim.Adam(groups, lr=lr)
    ref = torch.optim.AdamW(
        [
            {"params": [ref_model[0].weight, ref_model[2].weight], "weight_decay": lam},
            {"params": [ref_model[0].bias, ref_model[2].bias], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    for grads in _grads(params, STEPS):
        for p, q, g in zip(params, ref_params, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        apply_decoupled_weight_decay(ours)
        ours.step()
        ref.step()
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=0)


def test_sgd_plus_decoupled_decay_is_sgdw_with_the_current_lr():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    lam = 0.2
    opt = torch.optim.SGD(
        [
            {"params": [w], "lr": 0.1, DECOUPLED_WD_KEY: lam},
            {"params": [b], "lr": 0.1, DECOUPLED_WD_KEY: 0.0},
        ]
    )
    grads = [(0.3, -0.1, 0.2), (-0.5, 0.4, -0.3), (0.1, 0.0, 0.6)]
    lrs = [0.1, 0.05, 0.2]  # as a schedule would set them
    ew, eb = [1.0, -2.0], 0.5
    for (g0, g1, gb), lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad = torch.tensor([g0, g1], dtype=torch.float64)
        b.grad = torch.tensor([gb], dtype=torch.float64)
        apply_decoupled_weight_decay(opt)
        opt.step()
        ew = [ew[0] * (1 - lr * lam) - lr * g0, ew[1] * (1 - lr * lam) - lr * g1]
        eb = eb - lr * gb
    torch.testing.assert_close(w.detach(), torch.tensor(ew, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(b.detach(), torch.tensor([eb], dtype=torch.float64), rtol=1e-12, atol=0)


def test_params_without_grad_are_not_decayed():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    v = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w, v], "lr": 0.5, DECOUPLED_WD_KEY: 0.1}])
    w.grad = torch.zeros(3, dtype=torch.float64)
    apply_decoupled_weight_decay(opt)
    assert torch.equal(w.detach(), torch.full((3,), 0.95, dtype=torch.float64))
    assert torch.equal(v.detach(), torch.ones(3, dtype=torch.float64))
