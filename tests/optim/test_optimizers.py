import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradwise.config import OPTIMIZER_NAMES
from gradwise.config import OPTIMIZERS as OPTIMIZER_COMPONENTS
from gradwise.errors import ConfigError
from gradwise.optim import apply_decoupled_weight_decay, build_optimizer, list_optimizers
from gradwise.optim.custom import AdaptiveLR, EMAMomentum, MuonWithAdamW, muon_hidden_weights
from gradwise.optim.optimizers import OPTIMIZERS
from gradwise.optim.param_groups import DECOUPLED_WD_KEY

STEPS = 20
# Non-default values, so a registry entry that drops one of them fails the comparison.


def OptimConfig(name: str = "adam", **fields):
    """The section of optimizer ``name`` with those of ``fields`` it reads (CFG sets every optimizer's)."""
    section = OPTIMIZER_COMPONENTS.get(name).section
    return section(name=name, **{k: v for k, v in fields.items() if k in section.model_fields})


CFG = {"lr": 0.01, "momentum": 0.7, "betas": (0.8, 0.99), "eps": 1e-6, "alpha": 0.95, "adaptive_beta": 0.3}
OUR_GROUP_KEYS = {"base_lr", DECOUPLED_WD_KEY, "penalize", "group_name", "use_muon", "param_names"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)
    ).double()


def _grad_sequence(model: nn.Module, steps: int = STEPS) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()] for _ in range(steps)
    ]


def _run(opt: torch.optim.Optimizer, model: nn.Module, grads: list[list[torch.Tensor]]) -> None:
    """What the loop does each step: gradients in, decoupled decay, step."""
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        apply_decoupled_weight_decay(opt)
        opt.step()


def _assert_same(model: nn.Module, ref: nn.Module, rtol: float = 1e-7) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-12, msg=name)


def test_names_equal_the_config_literal():
    assert sorted(OPTIMIZERS) == sorted(OPTIMIZER_NAMES)
    assert sorted(s.name for s in list_optimizers()) == sorted(OPTIMIZER_NAMES)
    assert all(s.description for s in list_optimizers())


c = CFG
TORCH_REFERENCES: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "gd": lambda ps: torch.optim.SGD(ps, lr=c["lr"]),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=c["lr"]),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=c["lr"], momentum=c["momentum"]),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=c["lr"], momentum=c["momentum"], nesterov=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=c["lr"], eps=c["eps"]),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=c["lr"], alpha=c["alpha"], eps=c["eps"]),
    "adam": lambda ps: torch.optim.Adam(ps, lr=c["lr"], betas=c["betas"], eps=c["eps"]),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=c["lr"], betas=c["betas"], eps=c["eps"], weight_decay=0.0),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=c["lr"], betas=c["betas"], eps=c["eps"]),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=c["lr"], betas=c["betas"], eps=c["eps"]),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=c["lr"], betas=c["betas"], eps=c["eps"]),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=c["lr"], eps=c["eps"]),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=c["lr"], weight_decay=0.0),
}


@pytest.mark.parametrize("name", list(TORCH_REFERENCES))
def test_registry_matches_the_torch_class_built_by_hand(name):
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, OptimConfig(name=name, **CFG), weight_decay=0.0)
    ref = TORCH_REFERENCES[name](list(ref_model.parameters()))
    assert type(opt) is type(ref)
    grads = _grad_sequence(model)
    _run(opt, model, grads)
    _run(ref, ref_model, grads)
    _assert_same(model, ref_model)
    assert not torch.equal(model[0].weight, _model()[0].weight)  # it moved


def _closed_form(name: str, theta: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """SGD and momentum written out: b₁ = g₁, b_t = μ b_{t-1} + g_t; θ -= η b_t (or η (g_t + μ b_t))."""
    lr, mu = CFG["lr"], CFG["momentum"]
    theta = [t.detach().clone() for t in theta]
    buf: list[torch.Tensor | None] = [None] * len(theta)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            if name in ("sgd", "gd"):
                theta[i] = theta[i] - lr * g
                continue
            buf[i] = g.clone() if buf[i] is None else mu * buf[i] + g
            direction = g + mu * buf[i] if name == "nesterov" else buf[i]
            theta[i] = theta[i] - lr * direction
    return theta


@pytest.mark.parametrize("name", ["gd", "sgd", "momentum", "nesterov"])
def test_sgd_family_matches_the_closed_form(name):
    model = _model()
    expected = _closed_form(name, list(model.parameters()), _grad_sequence(model))
    opt = build_optimizer(model, OptimConfig(name=name, **CFG), weight_decay=0.0)
    _run(opt, model, _grad_sequence(model))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-7, atol=1e-12)


def test_momentum_ema_form_and_adaptive_use_our_classes():
    ema = build_optimizer(_model(), OptimConfig(name="momentum", momentum_form="ema", **CFG), 0.0)
    assert isinstance(ema, EMAMomentum)
    assert ema.param_groups[0]["beta"] == CFG["momentum"]
    adaptive = build_optimizer(_model(), OptimConfig(name="adaptive", **CFG), 0.0)
    assert isinstance(adaptive, AdaptiveLR)
    assert adaptive.param_groups[0]["beta"] == CFG["adaptive_beta"]


def _decay_groups(model: nn.Module, lam: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": lam}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_weight_decay_is_adamw_on_decay_groups_only_and_never_twice(name):
    lam = 0.3
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = build_optimizer(model, OptimConfig(name=name, **CFG), weight_decay=lam)
    ref = torch.optim.AdamW(_decay_groups(ref_model, lam), lr=CFG["lr"], betas=CFG["betas"], eps=CFG["eps"])
    grads = _grad_sequence(model)
    _run(opt, model, grads)
    _run(ref, ref_model, grads)
    _assert_same(model, ref_model)


def test_our_group_keys_never_shadow_torch_options():
    for spec in list_optimizers():
        opt = build_optimizer(_model(), OptimConfig(name=spec.name), 0.1)
        inner = [opt.muon, opt.adamw] if isinstance(opt, MuonWithAdamW) else [opt]
        for o in inner:
            assert not OUR_GROUP_KEYS & set(o.defaults), spec.name


def test_lr_multiplier_reaches_the_torch_group():
    opt = build_optimizer(_model(), OptimConfig(name="sgd", lr=0.1, lr_multipliers={"5.*": 0.0}), 0.0)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    assert lrs["5.weight"] == 0.0 and lrs["0.weight"] == 0.1


# --------------------------------------------------------------------------- extra


def test_extra_reaches_the_torch_class():
    opt = build_optimizer(_model(), OptimConfig(name="adam", extra={"amsgrad": True}), 0.0)
    assert all(g["amsgrad"] is True for g in opt.param_groups)


def test_unknown_extra_names_the_class_and_the_allowed_arguments():
    with pytest.raises(ConfigError) as info:
        build_optimizer(_model(), OptimConfig(name="adam", extra={"foo": 1}), 0.0)
    message = str(info.value)
    assert message.startswith("optim.extra.foo: not an argument of torch.optim.Adam; allowed: ")
    assert "amsgrad" in message and "betas" not in message and "lr" not in message.split("allowed:")[1].split(", ")


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        ("adam", {"betas": (0.5, 0.5)}, "optim.extra.betas: set optim.betas instead"),
        ("sgd", {"lr": 1.0}, "optim.extra.lr: set optim.lr instead"),
        ("adamw", {"weight_decay": 0.1}, "optim.extra.weight_decay: set regularize.weight_decay instead"),
        ("nesterov", {"nesterov": False}, "optim.extra.nesterov: fixed at True by this optim.name; remove it"),
        ("adaptive", {"beta": 2.0}, "optim.extra.beta: set optim.adaptive_beta instead"),
        ("muon", {"momentum": 0.5}, "optim.extra.momentum: set optim.momentum instead"),
    ],
)
def test_extra_with_its_own_config_field_is_refused(name, extra, expected):
    with pytest.raises(ConfigError, match="^" + expected.replace(".", r"\.") + "$"):
        build_optimizer(_model(), OptimConfig(name=name, extra=extra), 0.0)


def test_extra_value_torch_rejects_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^optim\.extra: torch\.optim\.RMSprop rejected"):
        build_optimizer(_model(), OptimConfig(name="rmsprop", extra={"momentum": -1.0}), 0.0)


def test_nothing_trainable_is_a_config_error():
    model = _model().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig(), 0.0)


# --------------------------------------------------------------------------- state dicts

_ALLOWED_LEAVES = (torch.Tensor, int, float, bool, str, type(None))


def _leaves_ok(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, int | str) and _leaves_ok(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return all(_leaves_ok(v) for v in obj)
    return isinstance(obj, _ALLOWED_LEAVES)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_is_plain_data_and_resumes_identically(name):
    cfg = OptimConfig(name=name, **CFG, lr_multipliers={"5.*": 2.0})
    grads = _grad_sequence(_model(), 10)
    straight = _model()
    opt = build_optimizer(straight, cfg, weight_decay=0.1)
    _run(opt, straight, grads)

    first = _model()
    opt1 = build_optimizer(first, cfg, weight_decay=0.1)
    _run(opt1, first, grads[:5])
    saved = copy.deepcopy(opt1.state_dict())
    assert _leaves_ok(saved)
    resumed = copy.deepcopy(first)
    opt2 = build_optimizer(resumed, cfg, weight_decay=0.1)
    opt2.load_state_dict(saved)
    _run(opt2, resumed, grads[5:])
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["nadam", "adam", "muon"])
def test_float32_state_dict_resumes_identically(name):
    cfg = OptimConfig(name=name, **CFG)
    grads = [[g.float() for g in step] for step in _grad_sequence(_model(), 6)]
    straight, first = _model().float(), _model().float()
    _run(build_optimizer(straight, cfg, 0.1), straight, grads)
    opt1 = build_optimizer(first, cfg, 0.1)
    _run(opt1, first, grads[:3])
    resumed = copy.deepcopy(first)
    opt2 = build_optimizer(resumed, cfg, 0.1)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    _run(opt2, resumed, grads[3:])
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters(), strict=True))


# --------------------------------------------------------------------------- muon


def test_muon_takes_only_hidden_matrices():
    model = _model()
    assert muon_hidden_weights(model) == {id(model[3].weight)}
    opt = build_optimizer(model, OptimConfig(name="muon"), 0.1)
    assert isinstance(opt, MuonWithAdamW)
    muon_names = [n for g in opt.muon.param_groups for n in g["param_names"]]
    assert muon_names == ["3.weight"]
    adamw_names = {n for g in opt.adamw.param_groups for n in g["param_names"]}
    assert adamw_names == {n for n, _ in model.named_parameters()} - {"3.weight"}


def test_muon_matches_torch_muon_plus_adamw_built_by_hand():
    model = _model()
    ref_model = copy.deepcopy(model)
    lam = 0.1
    opt = build_optimizer(model, OptimConfig(name="muon", **CFG), weight_decay=lam)
    hidden = ref_model[3].weight
    muon = torch.optim.Muon(
        [hidden], lr=CFG["lr"], weight_decay=lam, momentum=CFG["momentum"], adjust_lr_fn="match_rms_adamw"
    )
    decay = [ref_model[0].weight, ref_model[5].weight]
    rest = [p for p in ref_model.parameters() if p.ndim < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": lam}, {"params": rest, "weight_decay": 0.0}],
        lr=CFG["lr"],
        betas=CFG["betas"],
        eps=CFG["eps"],
    )
    grads = _grad_sequence(model)
    _run(opt, model, grads)
    for step_grads in grads:
        for p, g in zip(ref_model.parameters(), step_grads, strict=True):
            p.grad = g.clone()
        muon.step()
        adamw.step()
    _assert_same(model, ref_model)


def test_muon_param_groups_are_the_inner_group_dicts_even_after_loading():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon"), 0.1)
    inner = opt.muon.param_groups + opt.adamw.param_groups

    def same_objects() -> bool:
        return len(opt.param_groups) == len(inner) and all(a is b for a, b in zip(opt.param_groups, inner, strict=True))

    assert same_objects()
    for group in opt.param_groups:
        group["lr"] = 0.123
    assert opt.muon.param_groups[0]["lr"] == 0.123 and opt.adamw.param_groups[-1]["lr"] == 0.123

    _run(opt, model, _grad_sequence(model, 2))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    inner = opt.muon.param_groups + opt.adamw.param_groups
    assert same_objects()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- smoke


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_lowers_a_regression_loss(name):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    lr = {"adadelta": 1.0, "gd": 0.05, "sgd": 0.05, "adaptive": 0.05}.get(name, 0.02)
    cfg = OptimConfig(name=name, lr=lr, adaptive_beta=1e-3, eps=1e-6 if name == "adadelta" else 1e-8)
    opt = build_optimizer(model, cfg, weight_decay=1e-4)
    losses = []
    for _ in range(60):
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        apply_decoupled_weight_decay(opt)
        opt.step()
    assert losses[-1] < 0.7 * losses[0]


def test_settings_torch_rejects_are_config_errors():

    with pytest.raises(ConfigError, match=r"optim: torch\.optim\.SGD rejected"):
        build_optimizer(nn.Linear(3, 2), OptimConfig(name="nesterov", momentum=0.0), 0.0)


def test_muon_without_hidden_matrices_is_refused():

    with pytest.raises(ConfigError, match="no hidden 2-D weight matrices"):
        build_optimizer(nn.Linear(3, 2), OptimConfig(name="muon"), 0.0)
