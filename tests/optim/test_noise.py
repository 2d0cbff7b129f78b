import math

import pytest
import torch

from gradwise.optim.noise import GradientNoise, noise_std

N = 400_000


def _param(n: int = N, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    p = torch.zeros(n, dtype=dtype, requires_grad=True)
    p.grad = torch.zeros(n, dtype=dtype)
    return p


def test_noise_std_is_the_square_root_of_the_variance():
    # variance 0.3 / 4^0.55 at step 3
    assert noise_std(3, 0.3, 0.55) == pytest.approx(math.sqrt(0.3 / 4**0.55), rel=1e-15)
    assert noise_std(0, 0.25, 0.55) == pytest.approx(0.5)


@pytest.mark.parametrize("step", [0, 99])
def test_empirical_variance_is_eta_over_one_plus_t_to_the_gamma(step):
    eta, gamma = 0.3, 0.55
    p = _param()
    GradientNoise(eta, gamma, seed=0).add_([p], step)
    variance = eta / (1 + step) ** gamma  # 0.3 at step 0, about 0.0238 at step 99
    assert p.grad.var().item() == pytest.approx(variance, rel=0.02)
    assert abs(p.grad.mean().item()) < 5 * math.sqrt(variance / N)
    # The bug class uses the variance as the std, giving variance² (0.09, 0.00057).
    assert abs(p.grad.var().item() - variance**2) > 0.5 * variance**2


def test_noise_is_added_to_the_existing_gradient_and_none_is_skipped():
    p, q = _param(1000), torch.zeros(3, requires_grad=True)
    p.grad.fill_(5.0)
    GradientNoise(0.01, 0.55, seed=1).add_([p, q], step=0)
    assert q.grad is None
    assert abs(p.grad.mean().item() - 5.0) < 0.02
    assert not torch.equal(p.grad, torch.full_like(p.grad, 5.0))


def test_same_seed_gives_the_same_noise_and_another_seed_does_not():
    a, b, c = _param(100), _param(100), _param(100)
    GradientNoise(1.0, 0.55, seed=7).add_([a], 3)
    GradientNoise(1.0, 0.55, seed=7).add_([b], 3)
    GradientNoise(1.0, 0.55, seed=8).add_([c], 3)
    assert torch.equal(a.grad, b.grad)
    assert not torch.equal(a.grad, c.grad)


def test_state_dict_resume_gives_identical_next_draws():
    noise = GradientNoise(1.0, 0.55, seed=3)
    noise.add_([_param(10)], 0)
    state = noise.state_dict()
    assert state["generator"].dtype == torch.uint8
    expected = _param(10, torch.float32)
    noise.add_([expected], 1)

    resumed = GradientNoise(1.0, 0.55, seed=999)
    resumed.load_state_dict({"generator": state["generator"].clone()})
    got = _param(10, torch.float32)
    resumed.add_([got], 1)
    assert got.grad.dtype == torch.float32
    assert torch.equal(got.grad, expected.grad)


def test_zero_eta_adds_nothing():
    p = _param(10)
    GradientNoise(0.0, 0.55, seed=0).add_([p], 0)
    assert torch.equal(p.grad, torch.zeros(10, dtype=torch.float64))
