import copy

import pytest
import torch

from gradwise.optim.custom import AdaptiveLR, EMAMomentum

F64 = torch.float64

# Gradients for two parameters (a 2-vector and a scalar) over four steps.
GRADS = [
    ([0.5, -1.0], [2.0]),
    ([0.25, 0.5], [-1.0]),
    ([-1.0, 0.0], [0.5]),
    ([0.1, 0.3], [0.0]),
]


def _params() -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True),
        torch.tensor([-1.0], dtype=F64, requires_grad=True),
    )


def _set_grads(a: torch.Tensor, b: torch.Tensor, step: int) -> None:
    ga, gb = GRADS[step]
    a.grad = torch.tensor(ga, dtype=F64)
    b.grad = torch.tensor(gb, dtype=F64)


def test_ema_momentum_matches_hand_computed_steps():
    a, b = _params()
    lr, beta = 0.1, 0.8
    opt = EMAMomentum([a, b], lr=lr, beta=beta)
    theta = [1.0, 2.0, -1.0]
    v = [0.0, 0.0, 0.0]
    for step in range(len(GRADS)):
        _set_grads(a, b, step)
        opt.step()
        g = GRADS[step][0] + GRADS[step][1]
        v = [beta * vi + (1 - beta) * gi for vi, gi in zip(v, g, strict=True)]
        theta = [ti - lr * vi for ti, vi in zip(theta, v, strict=True)]
        got = a.detach().tolist() + b.detach().tolist()
        assert got == pytest.approx(theta, rel=1e-12, abs=1e-15)
        if step == 0:  # v₁ = (1 - 0.8) · 0.5 = 0.1, so θ = 1 - 0.1 · 0.1
            assert a[0].item() == pytest.approx(0.99, rel=1e-12)


def test_ema_momentum_differs_from_torch_sgd_dampening_on_the_first_step():
    a, _ = _params()
    opt = torch.optim.SGD([a], lr=0.1, momentum=0.8, dampening=0.8)
    a.grad = torch.tensor([0.5, -1.0], dtype=F64)
    opt.step()
    # torch starts the buffer at g (not (1-β)g): θ = 1 - 0.1 * 0.5 = 0.95, where EMAMomentum gives 0.99.
    assert a[0].item() == pytest.approx(0.95)


def test_adaptive_lr_matches_hand_computed_steps_with_two_groups():
    a, b = _params()
    beta = 0.5
    opt = AdaptiveLR([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 0.6}], lr=1.0, beta=beta)
    theta_a, theta_b = [1.0, 2.0], -1.0
    total = 0.0
    for step in range(len(GRADS)):
        _set_grads(a, b, step)
        opt.step()
        ga, gb = GRADS[step]
        total += ga[0] ** 2 + ga[1] ** 2 + gb[0] ** 2  # the global norm over both groups
        alpha_a = 0.2 / (1 + beta * total)
        alpha_b = 0.6 / (1 + beta * total)
        theta_a = [theta_a[0] - alpha_a * ga[0], theta_a[1] - alpha_a * ga[1]]
        theta_b = theta_b - alpha_b * gb[0]
        assert a.detach().tolist() == pytest.approx(theta_a, rel=1e-12)
        assert b.item() == pytest.approx(theta_b, rel=1e-12)
        assert opt.param_groups[0]["grad_sq_sum"] == pytest.approx(total, rel=1e-15)
        assert opt.param_groups[1]["grad_sq_sum"] == pytest.approx(total, rel=1e-15)
        if step == 0:  # ‖g‖² = 0.25 + 1 + 4 = 5.25, so α_a = 0.2 / (1 + 0.5 · 5.25) = 0.2 / 3.625
            assert a[0].item() == pytest.approx(1.0 - 0.2 / 3.625 * 0.5, rel=1e-12)


def test_params_without_grad_are_left_alone():
    a, b = _params()
    for opt in (EMAMomentum([a, b], lr=0.1, beta=0.9), AdaptiveLR([a, b], lr=0.1, beta=1.0)):
        a.grad, b.grad = torch.tensor([1.0, 1.0], dtype=F64), None
        before = b.detach().clone()
        opt.step()
        assert torch.equal(b.detach(), before)


@pytest.mark.parametrize(
    "make",
    [lambda ps: EMAMomentum(ps, lr=0.1, beta=0.7), lambda ps: AdaptiveLR(ps, lr=0.3, beta=0.4)],
    ids=["ema_momentum", "adaptive"],
)
def test_state_dict_round_trip_continues_identically(make):
    a, b = _params()
    opt = make([a, b])
    for step in range(2):
        _set_grads(a, b, step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    resumed = make([a2, b2])
    resumed.load_state_dict(saved)
    for step in range(2, 4):
        _set_grads(a, b, step)
        _set_grads(a2, b2, step)
        opt.step()
        resumed.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_adaptive_state_dict_holds_the_sum_as_a_float():
    a, b = _params()
    opt = AdaptiveLR([a, b], lr=0.1, beta=1.0)
    _set_grads(a, b, 0)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["grad_sq_sum"] == 5.25
