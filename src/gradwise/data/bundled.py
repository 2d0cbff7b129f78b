"""Datasets that need no download: scikit-learn's bundled sets and a synthetic line.

- ``digits``: 1,797 real 8×8 handwritten digits (classification, 10 classes, image ``(1, 8, 8)``).
- ``wine``: 178 wines, 13 chemical measurements, 3 cultivars (classification).
- ``breast_cancer``: 569 tumours, 30 features, malignant/benign (classification).
- ``diabetes``: 442 patients, 10 features, disease progression after a year (regression).
- ``linear``: ``y = 2x + 1 + N(0, noise_std²)`` with ``x ~ U(-1, 1)``, ``n_samples`` points drawn
  from the seed (regression, one feature) — a problem whose answer is known.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from gradwise.data.files import available
from gradwise.data.sources import LinearData, TabularData
from gradwise.data.types import RawData, TaskKind
from gradwise.errors import ConfigError, DataError


@dataclass(frozen=True)
class _Bundled:
    loader: str  # the sklearn.datasets function: scikit-learn is imported (~1.7 s) only by a run that reads one
    kind: TaskKind
    target_name: str
    image_shape: tuple[int, int, int] | None = None


_SKLEARN: dict[str, _Bundled] = {
    "digits": _Bundled("load_digits", "classification", "digit", (1, 8, 8)),
    "wine": _Bundled("load_wine", "classification", "cultivar"),
    "breast_cancer": _Bundled("load_breast_cancer", "classification", "diagnosis"),
    "diabetes": _Bundled("load_diabetes", "regression", "disease_progression"),
}
BUNDLED: tuple[str, ...] = (*_SKLEARN, "linear")


def load_bundled(cfg: TabularData, seed: int) -> RawData:
    """The bundled set ``cfg.name``, its columns chosen by ``cfg.features`` and cut to ``cfg.limit`` rows.

    Raises:
        ConfigError: ``cfg.name`` is not bundled.
        DataError: ``data.features`` names a column the set does not have.
    """
    if isinstance(cfg, LinearData):
        raw = _linear(cfg.n_samples, cfg.noise_std, seed)
    elif cfg.name in _SKLEARN:
        raw = _sklearn(cfg.name)
    else:
        raise ConfigError(f"data.name: got {cfg.name!r}; bundled sets are {', '.join(BUNDLED)}")
    if cfg.features is not None:
        raw = select_features(raw, cfg.features)
    return raw if cfg.limit is None else raw.head(cfg.limit)


def select_features(raw: RawData, names: list[str]) -> RawData:
    """Keep only the named feature columns, in the order given (an image stays one only if all are kept)."""
    if not names:
        raise ConfigError("data.features is empty; name at least one column (or leave it unset for all)")
    position = {name: j for j, name in enumerate(raw.feature_names)}
    for name in names:
        if name not in position:
            raise DataError(
                f"{raw.source}: no column {name!r} (data.features); available columns: {available(raw.feature_names)}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"data.features lists a column more than once: {names}")
    keep = [position[name] for name in names]
    image_shape = raw.image_shape if keep == list(range(len(raw.feature_names))) else None
    return replace(raw, x=raw.x[:, keep], feature_names=list(names), image_shape=image_shape)


def _sklearn(name: str) -> RawData:
    spec = _SKLEARN[name]
    from sklearn import datasets

    bunch = getattr(datasets, spec.loader)()
    class_names = [str(c) for c in bunch.target_names] if spec.kind == "classification" else None
    return RawData(
        x=np.asarray(bunch.data, dtype=np.float64),
        y=np.asarray(bunch.target),
        feature_names=[str(f) for f in bunch.feature_names],
        target_name=spec.target_name,
        source=f"scikit-learn {name}",
        name=name,
        kind=spec.kind,
        class_names=class_names,
        image_shape=spec.image_shape,
    )


def _linear(n_samples: int, noise_std: float, seed: int) -> RawData:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=n_samples)
    y = 2.0 * x + 1.0 + rng.normal(0.0, noise_std, size=n_samples)
    return RawData(
        x=x[:, None],
        y=y,
        feature_names=["x"],
        target_name="y",
        source=f"synthetic linear y = 2x + 1 + N(0, {noise_std:g}²)",
        name="linear",
        kind="regression",
    )
