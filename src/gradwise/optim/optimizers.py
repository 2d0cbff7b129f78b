"""The optimizer registry: each ``optim.name`` mapped to a torch.optim class and its arguments.

Every entry is torch's own implementation except ``adaptive`` and the EMA form
of ``momentum`` (see :mod:`gradwise.optim.custom`) and ``muon``, which pairs
torch.optim.Muon on hidden weight matrices with torch.optim.AdamW on the rest.
``cfg.extra`` passes further keyword arguments to the class; arguments that
have their own config field (``lr``, ``betas``, ...) must be set there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwise.config import OptimConfig
from gradwise.errors import ConfigError
from gradwise.optim.custom import AdaptiveLR, EMAMomentum
from gradwise.optim.param_groups import build_param_groups

Groups = list[dict[str, Any]]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    Attributes:
        name: The ``optim.name`` value.
        description: One line for ``list_optimizers()`` and the docs.
        native_decoupled_decay: True when the optimizer applies decoupled weight
            decay from ``group["weight_decay"]`` itself; otherwise the loop's
            :func:`~gradwise.optim.weight_decay.apply_decoupled_weight_decay` does.
        build: Makes the optimizer from parameter groups and the config.
        prepare: Optional hook that re-splits the groups with the model in view
            before ``build`` (used by ``muon`` to find the hidden weight matrices).
    """

    name: str
    description: str
    native_decoupled_decay: bool
    build: Callable[[Groups, OptimConfig], torch.optim.Optimizer]
    prepare: Callable[[nn.Module, Groups], Groups] | None = field(default=None, compare=False)


# --------------------------------------------------------------------------- extra arguments

# Arguments every optimizer takes from the config or the param groups, never from optim.extra.
_ALWAYS_HOME = {"lr": "optim.lr", "weight_decay": "regularize.weight_decay"}


def _class_path(cls: type) -> str:
    if cls.__module__.startswith("torch.optim"):
        return f"torch.optim.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _merge_extra(
    cls: type,
    kwargs: Mapping[str, Any],
    extra: Mapping[str, Any],
    *,
    homes: Mapping[str, str] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check ``optim.extra`` against ``cls``'s signature and return the merged keyword arguments.

    Args:
        cls: The optimizer class the arguments go to.
        kwargs: Arguments set by gradwise; ``extra`` may override those without a home.
        extra: ``optim.extra``.
        homes: {argument: config field} for arguments set from their own config field.
        fixed: Arguments implied by ``optim.name`` (e.g. ``nesterov=True``).

    Raises:
        ConfigError: An extra key is unknown to ``cls``, has its own config field, or is fixed.
    """
    homes = {**_ALWAYS_HOME, **(homes or {})}
    fixed = fixed or {}
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params")]
    for key in extra:
        if key in homes:
            raise ConfigError(f"optim.extra.{key}: set {homes[key]} instead")
        if key in fixed:
            raise ConfigError(f"optim.extra.{key}: fixed at {fixed[key]!r} by this optim.name; remove it")
        if key not in accepted:
            allowed = ", ".join(n for n in accepted if n not in homes and n not in fixed) or "(none)"
            raise ConfigError(f"optim.extra.{key}: not an argument of {_class_path(cls)}; allowed: {allowed}")
    return {**kwargs, **fixed, **extra}


def _construct(
    cls: type[torch.optim.Optimizer], groups: Groups, kwargs: dict[str, Any], extra: Mapping[str, Any]
) -> torch.optim.Optimizer:
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        if not extra:
            raise
        raise ConfigError(f"optim.extra: {_class_path(cls)} rejected {dict(extra)}: {exc}") from None


def _torch(
    cls: type[torch.optim.Optimizer],
    from_cfg: Mapping[str, str] | None = None,
    fixed: Mapping[str, Any] | None = None,
) -> Callable[[Groups, OptimConfig], torch.optim.Optimizer]:
    """A build function for ``cls`` taking ``lr`` and the ``from_cfg`` fields {argument: OptimConfig attribute}."""
    from_cfg = dict(from_cfg or {})

    def build(groups: Groups, cfg: OptimConfig) -> torch.optim.Optimizer:
        kwargs = {"lr": cfg.lr, **{arg: getattr(cfg, attr) for arg, attr in from_cfg.items()}}
        homes = {arg: f"optim.{attr}" for arg, attr in from_cfg.items()}
        kwargs = _merge_extra(cls, kwargs, cfg.extra, homes=homes, fixed=fixed)
        return _construct(cls, groups, kwargs, cfg.extra)

    return build


def _custom(
    cls: type[torch.optim.Optimizer], arg: str, attr: str
) -> Callable[[Groups, OptimConfig], torch.optim.Optimizer]:
    """A build function for one of our optimizers taking ``lr`` and ``arg`` = ``cfg.<attr>``."""

    def build(groups: Groups, cfg: OptimConfig) -> torch.optim.Optimizer:
        kwargs = {"lr": cfg.lr, arg: getattr(cfg, attr)}
        kwargs = _merge_extra(cls, kwargs, cfg.extra, homes={arg: f"optim.{attr}"})
        return _construct(cls, groups, kwargs, cfg.extra)

    return build


def _build_momentum(groups: Groups, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.momentum_form == "ema":
        return _custom(EMAMomentum, "beta", "momentum")(groups, cfg)
    return _torch(torch.optim.SGD, {"momentum": "momentum"}, {"nesterov": False})(groups, cfg)


# --------------------------------------------------------------------------- muon


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on hidden weight matrices and torch.optim.AdamW on every other parameter.

    torch's Muon accepts only 2-D parameters and its docs (like the Muon authors)
    say the rest — biases, gains, embeddings, the classifier head — belong to
    AdamW. ``param_groups`` is one list holding the two inner optimizers' group
    dicts themselves, so setting ``group["lr"]`` reaches the optimizer that
    owns the group. ``state`` on this object is empty; the state lives in the
    inner optimizers and in :meth:`state_dict`.

    Args:
        groups: Parameter groups, each with ``use_muon`` True (all params
            exactly 2-D) or False.
        lr: Learning rate of both parts.
        muon_kwargs: Further arguments of torch.optim.Muon.
        adamw_kwargs: Further arguments of torch.optim.AdamW.

    References:
        Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
        Liu et al. 2025, "Muon is Scalable for LLM Training" (arXiv:2502.16982).
    """

    def __init__(self, groups: Groups, lr: float, muon_kwargs: dict[str, Any], adamw_kwargs: dict[str, Any]) -> None:
        muon_groups = [g for g in groups if g["use_muon"]]
        adamw_groups = [g for g in groups if not g["use_muon"]]
        self.muon = torch.optim.Muon(muon_groups, lr=lr, **muon_kwargs) if muon_groups else None
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, **adamw_kwargs) if adamw_groups else None
        super().__init__(self._inner_groups(), {})

    def _inner_groups(self) -> Groups:
        return [g for opt in (self.muon, self.adamw) if opt is not None for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step both inner optimizers (the closure, if any, is evaluated once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in (self.muon, self.adamw):
            if opt is not None:
                opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter of both inner optimizers."""
        for opt in (self.muon, self.adamw):
            if opt is not None:
                opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"muon": ..., "adamw": ...}``: each inner optimizer's torch state_dict, or None when it has no params."""
        return {
            "muon": self.muon.state_dict() if self.muon is not None else None,
            "adamw": self.adamw.state_dict() if self.adamw is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load both parts; ``param_groups`` then holds the inner optimizers' new group dicts."""
        for key, opt in (("muon", self.muon), ("adamw", self.adamw)):
            saved = state_dict.get(key)
            if (saved is None) != (opt is None):
                problem = "missing" if saved is None else "unexpected"
                raise ValueError(f"optimizer state: the {key} part is {problem} for this model")
            if opt is not None:
                opt.load_state_dict(saved)
        # torch's load_state_dict replaces the group dicts, so the union must be rebuilt.
        self.param_groups[:] = self._inner_groups()


def muon_hidden_weights(model: nn.Module) -> set[int]:
    """``id()`` of the parameters Muon should own: the exactly-2-D weights of hidden layers.

    torch's docs call Muon "an optimizer for 2D parameters of neural network
    hidden layers", and its authors keep the input and output layers on AdamW
    even though they are 2-D. So the weights of the first and the last layer
    (the first/last ``nn.Linear``, ``nn.Conv*`` or embedding module registered
    in the model) and every embedding table are excluded. Conv filters are
    4-D, which torch's Muon refuses, so they stay on AdamW as well.
    """
    embeddings = (nn.Embedding, nn.EmbeddingBag)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd | embeddings)]
    excluded = {id(p) for m in layers if isinstance(m, embeddings) for p in m.parameters()}
    for outer in layers[:1] + layers[-1:]:
        excluded.update(id(p) for p in outer.parameters())
    return {id(p) for p in model.parameters() if p.ndim == 2 and id(p) not in excluded}


def split_for_muon(groups: Groups, is_muon: Callable[[torch.Tensor], bool]) -> Groups:
    """Split each group into a Muon part and an AdamW part (``use_muon``), dropping empty parts."""
    out: Groups = []
    for group in groups:
        names = group.get("param_names", [None] * len(group["params"]))
        for use_muon in (True, False):
            picked = [(p, n) for p, n in zip(group["params"], names, strict=True) if is_muon(p) == use_muon]
            if not picked:
                continue
            part = {**group, "params": [p for p, _ in picked], "use_muon": use_muon}
            if "param_names" in group:
                part["param_names"] = [n for _, n in picked]
            part["group_name"] = f"{group.get('group_name', 'group')} {'muon' if use_muon else 'adamw'}"
            out.append(part)
    return out


def _prepare_muon(model: nn.Module, groups: Groups) -> Groups:
    hidden = muon_hidden_weights(model)
    return split_for_muon(groups, lambda p: id(p) in hidden)


def _build_muon(groups: Groups, cfg: OptimConfig) -> torch.optim.Optimizer:
    if any("use_muon" not in g for g in groups):
        # Called without the model: every 2-D parameter is taken as hidden.
        groups = split_for_muon(groups, lambda p: p.ndim == 2)
    # Moonshot's RMS matching lets Muon share AdamW's lr and weight decay; extra.adjust_lr_fn overrides.
    muon_kwargs = _merge_extra(
        torch.optim.Muon,
        {"momentum": cfg.momentum, "adjust_lr_fn": "match_rms_adamw"},
        cfg.extra,
        homes={"momentum": "optim.momentum"},
    )
    adamw_kwargs = {"betas": cfg.betas, "eps": cfg.eps}
    try:
        return MuonWithAdamW(groups, cfg.lr, muon_kwargs, adamw_kwargs)
    except (TypeError, ValueError) as exc:
        if not cfg.extra:
            raise
        raise ConfigError(f"optim.extra: torch.optim.Muon rejected {dict(cfg.extra)}: {exc}") from None


# --------------------------------------------------------------------------- registry

_SGD = torch.optim.SGD
_ADAM_ARGS = {"betas": "betas", "eps": "eps"}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("gd", "full-batch gradient descent (torch SGD, no momentum; the loop feeds the whole set)", False,
                      _torch(_SGD, fixed={"momentum": 0.0, "nesterov": False})),
        OptimizerSpec("sgd", "stochastic gradient descent (torch SGD, no momentum)", False,
                      _torch(_SGD, fixed={"momentum": 0.0, "nesterov": False})),
        OptimizerSpec("momentum", "SGD with momentum: classic (torch SGD) or ema (v = βv + (1-β)g)", False,
                      _build_momentum),
        OptimizerSpec("nesterov", "SGD with Nesterov momentum (torch SGD nesterov=True)", False,
                      _torch(_SGD, {"momentum": "momentum"}, {"nesterov": True})),
        OptimizerSpec("adagrad", "AdaGrad (torch Adagrad, eps=optim.eps)", False,
                      _torch(torch.optim.Adagrad, {"eps": "eps"})),
        OptimizerSpec("rmsprop", "RMSprop (torch RMSprop, alpha=optim.alpha, eps=optim.eps)", False,
                      _torch(torch.optim.RMSprop, {"alpha": "alpha", "eps": "eps"})),
        OptimizerSpec("adam", "Adam (torch Adam); with regularize.weight_decay it is AdamW", False,
                      _torch(torch.optim.Adam, _ADAM_ARGS)),
        OptimizerSpec("adamw", "AdamW (torch AdamW, its own decoupled weight decay)", True,
                      _torch(torch.optim.AdamW, _ADAM_ARGS)),
        OptimizerSpec("adaptive", "gradient descent with lr / (1 + β Σ‖g‖²), β = optim.adaptive_beta", False,
                      _custom(AdaptiveLR, "beta", "adaptive_beta")),
        OptimizerSpec("nadam", "Adam with Nesterov momentum (torch NAdam)", False,
                      _torch(torch.optim.NAdam, _ADAM_ARGS)),
        OptimizerSpec("radam", "rectified Adam (torch RAdam)", False,
                      _torch(torch.optim.RAdam, _ADAM_ARGS)),
        OptimizerSpec("adamax", "Adam with the infinity norm (torch Adamax)", False,
                      _torch(torch.optim.Adamax, _ADAM_ARGS)),
        OptimizerSpec("adadelta", "Adadelta (torch Adadelta, eps=optim.eps; torch's default is 1e-6)", False,
                      _torch(torch.optim.Adadelta, {"eps": "eps"})),
        OptimizerSpec("adafactor", "Adafactor (torch Adafactor, factored second moments, own decoupled decay)", True,
                      _torch(torch.optim.Adafactor)),
        OptimizerSpec("muon", "Muon on hidden weight matrices + AdamW on the rest (momentum=optim.momentum)", True,
                      _build_muon, _prepare_muon),
    )
}  # fmt: skip


def list_optimizers() -> list[OptimizerSpec]:
    """All registered optimizers, in registry order."""
    return list(OPTIMIZERS.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, weight_decay: float) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg.name`` over ``model``'s trainable parameters.

    Args:
        model: The model.
        cfg: The optimizer section.
        weight_decay: Decoupled weight decay λ (``regularize.weight_decay``).

    Raises:
        ConfigError: Unknown name, bad ``lr_multipliers`` pattern, bad ``extra``, or nothing to train.
    """
    spec = OPTIMIZERS.get(cfg.name)
    if spec is None:
        raise ConfigError(f"optim.name: got {cfg.name!r}; expected one of {', '.join(OPTIMIZERS)}")
    groups = build_param_groups(model, cfg, weight_decay, native_decoupled=spec.native_decoupled_decay)
    if not groups:
        raise ConfigError("optim: the model has no trainable parameters (every parameter is frozen)")
    if spec.prepare is not None:
        groups = spec.prepare(model, groups)
    return spec.build(groups, cfg)
