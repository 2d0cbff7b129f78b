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
from typing import Any, Literal

import torch
from pydantic import create_model
from torch import nn

from gradwise.config.base import Fraction, NonNegFloat, PositiveFloat
from gradwise.config.kinds import OPTIMIZERS as OPTIMIZER_COMPONENTS
from gradwise.config.kinds import OptimSection
from gradwise.config.registry import Component
from gradwise.errors import ConfigError
from gradwise.optim.custom import AdaptiveLR, EMAMomentum, MuonWithAdamW, muon_hidden_weights, split_for_muon
from gradwise.optim.param_groups import DECOUPLED_WD_KEY, build_param_groups
from gradwise.optim.partitioned import PartitionedOptimizer, sparse_gradient_parameters, split_sparse

OptimConfig = OptimSection  # what every build function receives: the chosen optimizer's own section

Groups = list[dict[str, Any]]


# --------------------------------------------------------------------------- the sections: what each optimizer reads


class _Momentum(OptimSection):
    momentum: Fraction = 0.9


class _Eps(OptimSection):
    eps: PositiveFloat = 1e-8


class _Adam(_Eps):
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)


class _RMSprop(_Eps):
    alpha: Fraction = 0.99


class _MomentumForm(_Momentum):
    momentum_form: Literal["classic", "ema"] = "classic"


class _Adaptive(OptimSection):
    adaptive_beta: NonNegFloat = 1.0


class _Muon(_Adam, _Momentum):
    pass


_SECTION_BASES: dict[str, type[OptimSection]] = {
    "gd": OptimSection,
    "sgd": OptimSection,
    "momentum": _MomentumForm,
    "nesterov": _Momentum,
    "adagrad": _Eps,
    "rmsprop": _RMSprop,
    "adam": _Adam,
    "adamw": _Adam,
    "adaptive": _Adaptive,
    "nadam": _Adam,
    "radam": _Adam,
    "adamax": _Adam,
    "adadelta": _Eps,
    "adafactor": OptimSection,
    "muon": _Muon,
}


def _section(name: str) -> type[OptimSection]:
    """The section of optimizer ``name``: its base's fields, ``name`` narrowed to it."""
    base = _SECTION_BASES[name]
    title = "".join(part.capitalize() for part in name.split("_")) + "Config"
    return create_model(title, __base__=base, __doc__=base.__doc__, name=(Literal[name], name))  # type: ignore[call-overload]


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

    @property
    def section(self) -> type[OptimSection]:
        return _section(self.name)


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
        if extra:
            raise ConfigError(f"optim.extra: {_class_path(cls)} rejected {dict(extra)}: {exc}") from None
        shown = {k: v for k, v in kwargs.items() if k != "lr"}
        raise ConfigError(f"optim: {_class_path(cls)} rejected {shown}: {exc}") from None


def _fusable(groups: Groups) -> bool:
    """Whether torch's fused kernels accept every parameter (floating point, on CPU or CUDA)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])


def _torch(
    cls: type[torch.optim.Optimizer],
    from_cfg: Mapping[str, str] | None = None,
    fixed: Mapping[str, Any] | None = None,
    after_load: Callable[[torch.optim.Optimizer], None] | None = None,
    fused: bool = False,
) -> Callable[[Groups, OptimConfig], torch.optim.Optimizer]:
    """A build function for ``cls`` taking ``lr`` and the ``from_cfg`` fields {argument: OptimConfig attribute}.

    ``after_load`` is registered as a ``load_state_dict`` post-hook. With ``fused``, torch's fused
    kernel is used where every parameter allows it (one kernel per step instead of a Python loop over
    parameters: ~18 % faster MiniLM steps on CPU, the Hugging Face Trainer's default);
    ``optim.extra: {fused: false}`` turns it off.
    """
    from_cfg = dict(from_cfg or {})

    def build(groups: Groups, cfg: OptimConfig) -> torch.optim.Optimizer:
        kwargs = {"lr": cfg.lr, **{arg: getattr(cfg, attr) for arg, attr in from_cfg.items()}}
        if fused and _fusable(groups):
            kwargs["fused"] = True
        homes = {arg: f"optim.{attr}" for arg, attr in from_cfg.items()}
        kwargs = _merge_extra(cls, kwargs, cfg.extra, homes=homes, fixed=fixed)
        optimizer = _construct(cls, groups, kwargs, cfg.extra)
        if after_load is not None:
            optimizer.register_load_state_dict_post_hook(after_load)
        return optimizer

    return build


def _nadam_scalars_back(optimizer: torch.optim.Optimizer) -> None:
    """Put NAdam's scalar ``mu_product`` back to the dtype and device torch created it with.

    torch's ``load_state_dict`` casts every non-``step`` state tensor to its
    parameter's dtype and device; for ``mu_product`` (a float32 CPU scalar
    unless the default dtype is float64) that changes the last bits of every
    later step of a float64 run, breaking bit-for-bit resume.
    """
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        if group.get("capturable"):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            mu = state.get("mu_product")
            if isinstance(mu, torch.Tensor):
                state["mu_product"] = mu.to(device="cpu", dtype=dtype)


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


def _prepare_muon(model: nn.Module, groups: Groups) -> Groups:
    hidden = muon_hidden_weights(model)
    return split_for_muon(groups, lambda p: id(p) in hidden)


def _build_muon(groups: Groups, cfg: OptimConfig) -> torch.optim.Optimizer:
    if not any(g["use_muon"] for g in groups):
        raise ConfigError(
            "optim.name 'muon': the model has no hidden 2-D weight matrices for Muon (everything would run on "
            "AdamW); use optim.name=adamw or a model with at least two hidden layers"
        )
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
        where = "optim.extra" if cfg.extra else "optim"
        raise ConfigError(f"{where}: torch.optim.Muon rejected the settings: {exc}") from None


# --------------------------------------------------------------------------- registry

_SGD = torch.optim.SGD
_ADAM_ARGS = {"betas": "betas", "eps": "eps"}

_REGISTRY = (
    OptimizerSpec(
        name="gd",
        description="full-batch gradient descent (torch SGD, no momentum; the loop feeds the whole set)",
        native_decoupled_decay=False,
        build=_torch(_SGD, fixed={"momentum": 0.0, "nesterov": False}),
    ),
    OptimizerSpec(
        name="sgd",
        description="stochastic gradient descent (torch SGD, no momentum)",
        native_decoupled_decay=False,
        build=_torch(_SGD, fixed={"momentum": 0.0, "nesterov": False}),
    ),
    OptimizerSpec(
        name="momentum",
        description="SGD with momentum: classic (torch SGD) or ema (v = βv + (1-β)g)",
        native_decoupled_decay=False,
        build=_build_momentum,
    ),
    OptimizerSpec(
        name="nesterov",
        description="SGD with Nesterov momentum (torch SGD nesterov=True)",
        native_decoupled_decay=False,
        build=_torch(_SGD, {"momentum": "momentum"}, {"nesterov": True}),
    ),
    OptimizerSpec(
        name="adagrad",
        description="AdaGrad (torch Adagrad, eps=optim.eps)",
        native_decoupled_decay=False,
        build=_torch(torch.optim.Adagrad, {"eps": "eps"}),
    ),
    OptimizerSpec(
        name="rmsprop",
        description="RMSprop (torch RMSprop, alpha=optim.alpha, eps=optim.eps)",
        native_decoupled_decay=False,
        build=_torch(torch.optim.RMSprop, {"alpha": "alpha", "eps": "eps"}),
    ),
    OptimizerSpec(
        name="adam",
        description="Adam (torch Adam); with regularize.weight_decay it is AdamW",
        native_decoupled_decay=False,
        build=_torch(torch.optim.Adam, _ADAM_ARGS, fused=True),
    ),
    OptimizerSpec(
        name="adamw",
        description="AdamW (torch AdamW, its own decoupled weight decay)",
        native_decoupled_decay=True,
        build=_torch(torch.optim.AdamW, _ADAM_ARGS, fused=True),
    ),
    OptimizerSpec(
        name="adaptive",
        description="gradient descent with lr / (1 + β Σ‖g‖²), β = optim.adaptive_beta",
        native_decoupled_decay=False,
        build=_custom(AdaptiveLR, "beta", "adaptive_beta"),
    ),
    OptimizerSpec(
        name="nadam",
        description="Adam with Nesterov momentum (torch NAdam)",
        native_decoupled_decay=False,
        build=_torch(torch.optim.NAdam, _ADAM_ARGS, after_load=_nadam_scalars_back),
    ),
    OptimizerSpec(
        name="radam",
        description="rectified Adam (torch RAdam)",
        native_decoupled_decay=False,
        build=_torch(torch.optim.RAdam, _ADAM_ARGS),
    ),
    OptimizerSpec(
        name="adamax",
        description="Adam with the infinity norm (torch Adamax)",
        native_decoupled_decay=False,
        build=_torch(torch.optim.Adamax, _ADAM_ARGS),
    ),
    OptimizerSpec(
        name="adadelta",
        description="Adadelta (torch Adadelta, eps=optim.eps; torch's default is 1e-6)",
        native_decoupled_decay=False,
        build=_torch(torch.optim.Adadelta, {"eps": "eps"}),
    ),
    OptimizerSpec(
        name="adafactor",
        description="Adafactor (torch Adafactor, factored second moments, own decoupled decay)",
        native_decoupled_decay=True,
        build=_torch(torch.optim.Adafactor),
    ),
    OptimizerSpec(
        name="muon",
        description="Muon on hidden weight matrices + AdamW on the rest (momentum=optim.momentum)",
        native_decoupled_decay=True,
        build=_build_muon,
        prepare=_prepare_muon,
    ),
)
OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _REGISTRY}
# The config registry's entries (entry-point group gradwise.optimizers): each optimizer's section, once.
COMPONENTS: dict[str, Component] = {
    spec.name: Component(
        spec.section,
        spec.build,
        spec.description,
        capabilities={"native_decoupled_decay": spec.native_decoupled_decay, "prepare": spec.prepare},
    )
    for spec in _REGISTRY
}


def list_optimizers() -> list[OptimizerSpec]:
    """Every optimizer ``optim.name`` accepts: the built-in ones in their order, then any registered since."""
    return [*OPTIMIZERS.values(), *(_spec(name) for name in OPTIMIZER_COMPONENTS.names() if name not in OPTIMIZERS)]


def _spec(name: str) -> OptimizerSpec:
    """The spec of a component in the config registry (built-in or registered by a plugin or a test)."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    component = OPTIMIZER_COMPONENTS.get(name)
    caps = component.capabilities
    return OptimizerSpec(
        name=name,
        description=component.description,
        native_decoupled_decay=bool(caps.get("native_decoupled_decay", False)),
        build=component.builder(),
        prepare=caps.get("prepare"),
    )


def build_optimizer(model: nn.Module, cfg: OptimConfig, weight_decay: float) -> torch.optim.Optimizer:
    """Build the optimizer ``cfg.name`` over ``model``'s trainable parameters.

    Args:
        model: The model.
        cfg: The optimizer section.
        weight_decay: Decoupled weight decay λ (``regularize.weight_decay``).

    Raises:
        ConfigError: Unknown name, bad ``lr_multipliers`` pattern, bad ``extra``, or nothing to train.
    """
    spec = _spec(cfg.name)
    groups = build_param_groups(model, cfg, weight_decay, native_decoupled=spec.native_decoupled_decay)
    if not groups:
        raise ConfigError("optim: the model has no trainable parameters (every parameter is frozen)")
    sparse = sparse_gradient_parameters(model)
    if sparse:
        return _with_sparse_part(model, groups, sparse, spec, cfg)
    if spec.prepare is not None:
        groups = spec.prepare(model, groups)
    return spec.build(groups, cfg)


def _with_sparse_part(
    model: nn.Module, groups: Groups, sparse: set[int], spec: OptimizerSpec, cfg: OptimConfig
) -> torch.optim.Optimizer:
    """``cfg.name`` over the dense parameters and ``optim.sparse`` over the sparse-gradient embeddings.

    Dense optimizers refuse sparse gradients (Adam: "does not support sparse gradients"). SparseAdam
    updates only the rows a batch touched, Adam-style (lazy moments); Adagrad's sparse path is
    exact Adagrad on the touched rows. Neither applies decoupled weight decay to sparse rows: a decay
    of every row every step would make each step dense again.
    """
    dense_groups, sparse_groups = split_sparse(groups, sparse)
    for group in sparse_groups:
        group["weight_decay"] = 0.0
        group[DECOUPLED_WD_KEY] = 0.0  # nor the loop's decoupled decay, which would touch every row
    if spec.prepare is not None and dense_groups:
        dense_groups = spec.prepare(model, dense_groups)
    dense = spec.build(dense_groups, cfg) if dense_groups else None
    if cfg.sparse == "sparse_adam":
        betas, eps = getattr(cfg, "betas", (0.9, 0.999)), getattr(cfg, "eps", 1e-8)
        sparse_part = torch.optim.SparseAdam(sparse_groups, lr=cfg.lr, betas=betas, eps=eps)
    elif cfg.sparse == "adagrad":
        sparse_part = torch.optim.Adagrad(sparse_groups, lr=cfg.lr, eps=getattr(cfg, "eps", 1e-10))
    else:
        sparse_part = torch.optim.SGD(sparse_groups, lr=cfg.lr)
    return PartitionedOptimizer({"dense": dense, "sparse": sparse_part})
