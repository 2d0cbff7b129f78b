"""The config schema: overrides, one-line errors naming the field, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwise.config import (
    OPTIMIZER_NAMES,
    RunConfig,
    apply_overrides,
    load_config,
    monitor_mode,
    read_yaml,
    to_yaml,
    validate,
)
from gradwise.errors import ConfigError


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate(raw, source="r.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_overrides_are_typed_like_yaml():
    raw = apply_overrides(
        {"optim": {"name": "sgd"}},
        [
            "optim.lr=1e-3",
            "batch.size=64",
            "model.hidden=[32, 16]",
            "stop.patience=none",
            "regularize.l2=0",
            "batch.at_epochs={2: 64}",
        ],
    )
    cfg = validate(raw)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.batch.size == 64
    assert cfg.model.hidden == [32, 16]
    assert cfg.stop.patience is None
    assert cfg.batch.at_epochs == {2: 64}


def test_unknown_optimizer_lists_the_allowed_names():
    message = error_of({"optim": {"name": "adamx"}})
    assert message.startswith("r.yaml: optim.name: got 'adamx'")
    for name in ("sgd", "adam", "adaptive", "muon"):
        assert f"'{name}'" in message


def test_unknown_key_lists_the_section_keys_and_hints():
    message = error_of({"optim": {"weight_decay": 0.1}})
    assert "optim.weight_decay: unknown key" in message
    assert "allowed keys: name, lr" in message
    assert "regularize.weight_decay" in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"optim": {"lr": -1}}, "optim.lr: got -1; expected greater than 0"),
        ({"batch": {"size": "big"}}, "batch.size: got 'big'"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction: got 1.5; expected less than 1"),
        ({"stop": {"epochs": "x"}}, "stop.epochs: got 'x'"),
        ({"optim": {"name": "gd"}}, "set batch.size=full"),
        ({"schedule": {"name": "exponential"}}, "schedule.gamma is required"),
        ({"schedule": {"name": "multistep"}}, "schedule.milestones is required"),
        ({"data": {"name": "file"}}, "data.path is required"),
        ({"stop": {"epochs": None}}, "set stop.epochs or stop.max_steps"),
        ({"bogus": 1}, "bogus: unknown key; allowed keys: name, description, seed"),
        (
            {"data": {"name": "python_source"}, "model": {"name": "gpt"}, "finetune": {"lora": {}}},
            "finetune.lora supports model.name 'hf_encoder' only",
        ),
        ({"model": {"name": "gpt"}}, "model.name 'gpt' does not fit data.name 'digits'"),
        ({"finetune": {"head_only": True}}, "finetune.* needs a transformer body"),
    ],
)
def test_bad_values_name_the_field(raw, expected):
    assert expected in error_of(raw)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lr is a value, not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=2"])


def test_bad_yaml_names_file_and_line(tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  name: [sgd\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        read_yaml(recipe)
    with pytest.raises(ConfigError, match="file not found"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_yaml(tmp_path / "list.yaml")


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = validate({"optim": {"name": "adamw", "lr": 0.01}, "batch": {"at_epochs": {3: 64}}, "resume": "x"})
    file = tmp_path / "config.yaml"
    file.write_text(to_yaml(cfg))
    again = load_config(file)
    assert again == cfg.model_copy(update={"resume": None})


def test_monitor_mode():
    assert monitor_mode("val_loss", "auto") == "min"
    assert monitor_mode("val_r2", "auto") == "max"
    assert monitor_mode("val_accuracy", "auto") == "max"
    assert monitor_mode("val_accuracy", "min") == "min"


def test_optimizer_names_are_the_registry():
    from gradwise.optim import list_optimizers

    assert tuple(spec.name for spec in list_optimizers()) == OPTIMIZER_NAMES


def test_defaults_validate():
    assert RunConfig().optim.name == "adam"
