"""The config schema: overrides, one-line errors naming the field, value and what is allowed."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from gradwise.config import (
    OPTIMIZER_NAMES,
    RunConfig,
    apply_overrides,
    load_config,
    monitor_mode,
    read_yaml,
    set_path,
    to_yaml,
    validate,
)
from gradwise.errors import ConfigError
from gradwise.experiments.recipes import find_recipe, list_recipes


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
    assert "optim.name 'adam' takes: lr, lr_multipliers" in message
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
            "finetune.lora supports model.name 'hf_encoder' and 'hf_causal_lm' only",
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

    assert sorted(spec.name for spec in list_optimizers()) == sorted(OPTIMIZER_NAMES)


def test_defaults_validate():
    assert RunConfig().optim.name == "adam"


# --------------------------------------------------------------------------- non-finite numbers

NON_FINITE = [math.inf, -math.inf, math.nan]


def _float_value(ann: Any, x: float) -> tuple[Any, str] | None:
    """A raw value for annotation ``ann`` holding ``x`` wherever a float goes, and the path suffix of the first."""
    if get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if ann is float:
        return x, ""
    origin, args = get_origin(ann), get_args(ann)
    if origin in (Union, UnionType):
        return next((found for a in args if (found := _float_value(a, x)) is not None), None)
    if origin is list and (inner := _float_value(args[0], x)) is not None:
        return [inner[0]], f".0{inner[1]}"
    if origin is tuple:
        items = [_float_value(a, x) for a in args]
        if all(items):
            return [i[0] for i in items], f".0{items[0][1]}"
    if origin is dict and (inner := _float_value(args[1], x)) is not None:
        return {"k": inner[0]}, f".k{inner[1]}"
    return None


def _section(ann: Any) -> type[BaseModel] | None:
    members = get_args(ann) if get_origin(ann) in (Union, UnionType) else (ann,)
    return next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)


def float_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every field of the run schema with a float in its type (sections stepped into)."""
    found = []
    for name, field in model.model_fields.items():
        ann = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        section = _section(field.annotation)
        if section is not None:
            found += float_fields(section, f"{prefix}{name}.")
        elif _float_value(ann, 0.5) is not None:
            found.append(f"{prefix}{name}")
    return found


# Sections that need a field to exist at all.
_REQUIRED = {"prune": {"sparsity": 0.5}, "distill": {"teacher": "runs/t"}}


def test_the_float_fields_are_found():
    fields = set(float_fields())
    assert {"optim.lr", "optim.lr_multipliers", "regularize.clip_grad_norm"} <= fields
    assert {"schedule.gamma", "finetune.layer_lr_decay", "finetune.lora.alpha", "prune.sparsity"} <= fields
    assert {"distill.temperature", "checkpoint.min_interval_s", "data.val_fraction"} <= fields
    assert len(fields) > 30  # plus every component's own: test_every_component_float_field_refuses_non_finite_numbers


@pytest.mark.parametrize("x", NON_FINITE, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("path", float_fields())
def test_every_float_field_refuses_non_finite_numbers(path: str, x: float):
    section, _, leaf = path.rpartition(".")
    model: type[BaseModel] = RunConfig
    for key in section.split(".") if section else []:
        model = _section(model.model_fields[key].annotation)
    field = model.model_fields[leaf]
    ann = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    value, suffix = _float_value(ann, x)
    raw = {k: dict(v) for k, v in _REQUIRED.items()}
    set_path(raw, path, value)
    message = error_of(raw)
    assert message.startswith(f"r.yaml: {path}{suffix}: got {x!r}; expected a finite number"), message


def _component_float_fields() -> list[Any]:
    """(kind, component, field path) of every float a registered component's own section declares."""
    from gradwise.config import DATA, MODELS, OPTIMIZERS

    cases = []
    for registry in (MODELS, DATA, OPTIMIZERS):
        for component in registry:
            for path in float_fields(component.section):
                cases.append(pytest.param(registry.path, component.name, path, id=f"{component.name}.{path}"))
    return cases


@pytest.mark.parametrize(("kind", "name", "path"), _component_float_fields())
def test_every_component_float_field_refuses_non_finite_numbers(kind: str, name: str, path: str):
    from gradwise.config import DATA, MODELS, OPTIMIZERS

    section = {"model": MODELS, "data": DATA, "optim": OPTIMIZERS}[kind].get(name).section
    field = section.model_fields[path]
    ann = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    value, suffix = _float_value(ann, math.inf)
    raw: dict[str, Any] = {kind: {"name": name, path: value}}
    if name == "file":
        raw[kind]["path"] = "x.csv"
    if kind == "model" and MODELS.get(name).section.takes != ("features",):
        raw["data"] = {
            "name": {"tokens": "python_source", "interactions": "movielens"}[MODELS.get(name).section.takes[0]]
        }
    message = error_of(raw)
    assert message.startswith(f"r.yaml: {kind}.{path}{suffix}: got inf; expected a finite number"), message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=1e400", "optim.lr: got '1e400'; expected a finite number"),
        ("optim.lr=inf", "optim.lr: got 'inf'; expected a finite number"),
        ("optim.lr=-inf", "optim.lr: got '-inf'; expected a finite number"),
        ("optim.lr=nan", "optim.lr: got 'nan'; expected a finite number"),
        ("optim.lr=.inf", "optim.lr: got inf; expected a finite number"),
        ("optim.lr=.nan", "optim.lr: got nan; expected a finite number"),
        ("optim.betas=[0.9, .nan]", "optim.betas.1: got nan; expected a finite number"),
        ("optim.lr_multipliers={'head.*': .inf}", "optim.lr_multipliers.head.*: got inf; expected a finite number"),
        ("regularize.clip_grad_norm=1e999", "regularize.clip_grad_norm: got '1e999'; expected a finite number"),
        ("schedule.gamma=.nan", "schedule.gamma: got nan; expected a finite number"),
        ("batch.size=.inf", "batch.size: got inf; expected a finite number or one of 'full'"),
        ("stop.epochs=.inf", "stop.epochs: got inf; expected a finite number"),
        ("optim.extra={foo: .inf}", "optim.extra.foo: got inf; expected a finite number"),
        ("optim.extra={eps: [1.0e-30, .nan]}", "optim.extra.eps.1: got nan; expected a finite number"),
    ],
)
def test_non_finite_overrides_name_the_field_and_value(override: str, expected: str):
    assert error_of(apply_overrides({}, [override])) == f"r.yaml: {expected}"


def test_non_finite_text_stays_text_for_text_fields():
    cfg = validate(apply_overrides({}, ["name=inf", "stop.monitor=nan"]))
    assert cfg.name == "inf" and cfg.stop.monitor == "nan"
    assert validate(apply_overrides({}, ["optim.lr=1e-2"])).optim.lr == pytest.approx(1e-2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim: {lr: .inf}\n", "optim.lr: got inf;"),
        ("optim: {lr: -.Inf}\n", "optim.lr: got -inf;"),
        ("optim: {lr: .NaN}\n", "optim.lr: got nan;"),
        ("optim: {lr: 1e400}\n", "optim.lr: got '1e400';"),  # YAML 1.1 text; pydantic reads it as inf
        ("optim: {lr: 1.0e+400}\n", "optim.lr: got inf;"),  # a YAML float that overflows
        ("regularize: {clip_grad_norm: nan}\n", "regularize.clip_grad_norm: got 'nan';"),
    ],
)
def test_non_finite_numbers_in_a_recipe_file(tmp_path: Path, text: str, expected: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    assert str(info.value) == f"{recipe}: {expected} expected a finite number"


def test_a_variant_with_a_non_finite_number_is_refused():
    from gradwise.experiments.variants import variant_configs

    with pytest.raises(ConfigError, match=r"^r\.yaml variants\.hot: optim\.lr: got inf; expected a finite number$"):
        variant_configs({"variants": {"hot": {"optim.lr": math.inf}}}, "r.yaml")


def test_a_compression_recipe_refuses_non_finite_numbers(tmp_path: Path):
    from gradwise.compress.recipe import load_compress_recipe

    recipe = tmp_path / "c.yaml"
    recipe.write_text("budget: {max_drop: .inf}\nvariants: {p: [{prune: {sparsity: .nan}}]}\n")
    with pytest.raises(ConfigError, match=r"budget\.max_drop: got inf; expected a finite number"):
        load_compress_recipe(recipe)
    with pytest.raises(ConfigError, match=r"variants\.p\.0\.prune\.sparsity: got nan; expected a finite number"):
        load_compress_recipe(recipe, ["budget.max_drop=0.1"])


# --------------------------------------------------------------------------- unreadable files


def read_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_latin1_recipe_names_the_byte_and_its_offset(tmp_path: Path):
    recipe = tmp_path / "latin.yaml"
    recipe.write_bytes("description: café\n".encode("latin-1"))
    message = read_error(recipe)
    assert message == f"recipe {recipe}: not UTF-8 text (byte 0xe9 at offset 16, line 1); save it as UTF-8"
    recipe.write_bytes("a: 1\nb: ü\n".encode("latin-1"))
    assert "byte 0xfc at offset 8, line 2" in read_error(recipe)


def test_a_binary_recipe_is_refused(tmp_path: Path):
    recipe = tmp_path / "nul.yaml"
    recipe.write_bytes(b"optim: {lr: 0.1}\n\x00\x01\x02")
    assert read_error(recipe) == f"recipe {recipe}: a binary file, not YAML text (NUL byte at offset 17)"
    executable = Path(sys.executable).resolve()  # an ELF or Mach-O file
    assert "a binary file, not YAML text (NUL byte at offset" in read_error(executable)
    recipe.write_bytes("optim: {}\n".encode("utf-16"))
    assert read_error(recipe) == f"recipe {recipe}: UTF-16 text, not UTF-8; save it as UTF-8"
    recipe.write_bytes(b"optim: {}\n\x1b[0m\n")
    assert "line 2: unacceptable character #x001b" in read_error(recipe)


def test_a_directory_or_non_mapping_recipe_is_refused(tmp_path: Path):
    assert read_error(tmp_path) == f"recipe {tmp_path}: is a directory, not a YAML file"
    for text, kind in (("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")):
        (tmp_path / "r.yaml").write_text(text)
        assert read_error(tmp_path / "r.yaml").endswith(f"expected a mapping of sections at the top, got {kind}")
    (tmp_path / "r.yaml").write_text("[" * 5000)
    assert "nested too deeply" in read_error(tmp_path / "r.yaml")


def test_utf8_recipes_with_a_bom_or_accents_read(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes("\ufeffdescription: café ✓\noptim: {lr: 0.1}\n".encode())
    assert read_yaml(recipe) == {"description": "café ✓", "optim": {"lr": 0.1}}


def test_find_recipe_refuses_directories_and_unusable_names(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        find_recipe(str(tmp_path))
    with pytest.raises(ConfigError, match=r"cannot read \(File name too long\)"):
        find_recipe("x" * 5000)
    with pytest.raises(ConfigError, match="not a file name"):
        find_recipe("")
    assert find_recipe("digits-mlp").name == "digits-mlp.yaml"
    assert all(r.description for r in list_recipes())
