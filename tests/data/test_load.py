"""load_dataset end to end on the bundled digits and diabetes sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits

from gradwise.config import DataConfig
from gradwise.data import load_dataset
from gradwise.errors import ConfigError, DataError


def test_digits_splits_add_up_with_the_right_types():
    data = load_dataset(DataConfig(name="digits"), "auto", seed=0)
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sizes == [1257, 270, 270] and sum(sizes) == 1797
    assert data.train.x.dtype == torch.float32 and data.train.x.shape == (1257, 64)
    assert data.train.y.dtype == torch.int64 and data.train.y.shape == (1257,)
    info = data.info
    assert (info.kind, info.n_outputs, info.n_features, info.image_shape) == ("classification", 10, 64, (1, 8, 8))


def test_splits_are_deterministic_for_a_seed_and_differ_between_seeds():
    a = load_dataset(DataConfig(name="digits"), "auto", seed=0)
    b = load_dataset(DataConfig(name="digits"), "auto", seed=0)
    c = load_dataset(DataConfig(name="digits"), "auto", seed=1)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.test.x, c.test.x)


def test_splits_are_stratified():
    data = load_dataset(DataConfig(name="digits"), "auto", seed=0)
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    for split in (data.train, data.val, data.test):
        share = np.bincount(split.y.numpy(), minlength=10) / len(split)
        # Two stratified draws (test, then validation) each round a class by at most one row.
        np.testing.assert_allclose(share, overall, atol=2.0 / len(split))


def test_standardization_uses_training_statistics_only():
    data = load_dataset(DataConfig(name="diabetes"), "auto", seed=0)
    raw = load_dataset(DataConfig(name="diabetes", standardize=False), "auto", seed=0)
    mean = raw.train.x.double().mean(0)
    std = raw.train.x.double().std(0, unbiased=False)
    torch.testing.assert_close(data.train.x.double().mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(data.train.x.double().std(0, unbiased=False), torch.ones(10, dtype=torch.float64))
    # Validation is scaled with the training mean and std, so its own mean is not 0.
    torch.testing.assert_close(data.val.x.double(), (raw.val.x.double() - mean) / std, atol=1e-5, rtol=1e-5)
    assert data.val.x.mean(0).abs().max() > 0.05
    np.testing.assert_allclose(data.info.feature_mean, mean.numpy(), rtol=1e-4, atol=1e-8)  # raw.x is float32
    assert raw.info.feature_mean is None


def test_constant_pixels_are_centred_not_divided_by_zero():
    data = load_dataset(DataConfig(name="digits"), "auto", seed=0)
    assert torch.isfinite(data.train.x).all() and torch.isfinite(data.test.x).all()
    assert data.train.x[:, 0].abs().max() == 0  # pixel_0_0 is always blank
    assert data.info.feature_std[0] == 1.0


def test_regression_targets_are_float_columns():
    data = load_dataset(DataConfig(name="diabetes", standardize=False), "auto", seed=0)
    assert data.train.y.dtype == torch.float32 and data.train.y.shape == (len(data.train), 1)
    assert data.info.kind == "regression" and data.info.n_outputs == 1 and data.info.class_names is None
    everything = torch.cat([data.train.y, data.val.y, data.test.y])[:, 0].sort().values
    torch.testing.assert_close(everything, torch.tensor(np.sort(load_diabetes().target), dtype=torch.float32))


def test_empty_splits_keep_their_shapes():
    data = load_dataset(DataConfig(name="wine", val_fraction=0.0, test_fraction=0.2), "auto", seed=0)
    assert data.val.x.shape == (0, 13) and data.val.y.shape == (0,) and data.val.y.dtype == torch.int64
    linear = load_dataset(DataConfig(name="linear", test_fraction=0.0), "auto", seed=0)
    assert linear.test.x.shape == (0, 1) and linear.test.y.shape == (0, 1)


def test_limit_and_a_contradicting_task_kind():
    data = load_dataset(DataConfig(name="digits", limit=300), "auto", seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 300
    with pytest.raises(ConfigError, match=r"task\.kind 'regression' does not fit data\.name 'digits'"):
        load_dataset(DataConfig(name="digits"), "regression", seed=0)
    with pytest.raises(DataError, match=r"scikit-learn breast_cancer: column 'diagnosis' has a single class"):
        load_dataset(DataConfig(name="breast_cancer", limit=3), "auto", seed=0)
