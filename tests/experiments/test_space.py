"""Space files: every spec form parses to the right Optuna distribution, and mistakes are one-line errors."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from gradwise.config import read_yaml, validate
from gradwise.errors import ConfigError
from gradwise.experiments.recipes import find_recipe
from gradwise.experiments.space import find_space, load_space

BASE = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "optim": {"name": "adam", "lr": 0.01}}


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_every_spec_form_becomes_its_optuna_distribution(tmp_path: Path):
    space = load_space(
        space_file(
            tmp_path,
            "description: a note, not an entry\n"
            "optim.name: [sgd, adam]\n"
            "optim.lr: loguniform(1e-4, 1e-1)\n"
            "model:\n  dropout: uniform(0.0, 0.5, 0.1)\n"
            "batch.size: intlog(16, 256)\n"
            "stop.epochs: int(2, 10, 2)\n"
            "regularize.weight_decay: [0, 1e-4]\n",
        ),
        BASE,
    )
    assert space.paths == [
        "optim.name",
        "optim.lr",
        "model.dropout",
        "batch.size",
        "stop.epochs",
        "regularize.weight_decay",
    ]
    dists = {p.path: p.distribution() for p in space.params}
    assert dists["optim.name"] == CategoricalDistribution(["sgd", "adam"])
    assert dists["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert dists["model.dropout"] == FloatDistribution(0.0, 0.5, step=0.1)
    assert dists["batch.size"] == IntDistribution(16, 256, log=True)
    assert dists["stop.epochs"] == IntDistribution(2, 10, step=2)
    # YAML 1.1 reads 1e-4 as text; in a space it is the number.
    assert dists["regularize.weight_decay"] == CategoricalDistribution([0, 1e-4])
    assert space.describe()["optim.lr"] == "loguniform(0.0001, 0.1)"


def test_list_choices_travel_as_json_and_apply_decodes_them(tmp_path: Path):
    space = load_space(space_file(tmp_path, "model.hidden: [[32], [64, 32]]\noptim.lr: [0.1, 0.01]\n"), BASE)
    hidden = space.params[0]
    assert hidden.encoded and hidden.choices == ("[32]", "[64, 32]")
    raw = space.apply(BASE, {"model.hidden": "[64, 32]", "optim.lr": 0.1})
    cfg = validate(raw)
    assert cfg.model.hidden == [64, 32] and cfg.optim.lr == 0.1
    assert BASE["optim"]["lr"] == 0.01  # the base recipe is not touched
    assert space.decoded({"model.hidden": "[32]"}) == {"model.hidden": [32]}
    assert space.grid() == {"model.hidden": ["[32]", "[64, 32]"], "optim.lr": [0.1, 0.01]}
    assert space.grid_size() == 4


def test_suggest_samples_inside_each_entry(tmp_path: Path):
    space = load_space(
        space_file(tmp_path, "optim.name: [sgd, adam]\noptim.lr: loguniform(1e-4, 1e-1)\nbatch.size: int(8, 64, 8)\n"),
        BASE,
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        trial = study.ask()
        values = space.suggest(trial)
        assert values["optim.name"] in ("sgd", "adam")
        assert 1e-4 <= values["optim.lr"] <= 1e-1
        assert values["batch.size"] in range(8, 65, 8)
        validate(space.apply(BASE, values))
        study.tell(trial, 0.0)


def test_contains_knows_the_recipe_values(tmp_path: Path):
    space = load_space(space_file(tmp_path, "optim.lr: loguniform(1e-4, 1e-1)\nbatch.size: int(8, 64, 8)\n"), BASE)
    lr, batch = space.params
    assert lr.contains(0.01) and not lr.contains(0.5) and not lr.contains("0.01")
    assert batch.contains(32) and not batch.contains(36) and not batch.contains(72)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "optim.lrr: [0.1, 0.01]\n",
            "space.yaml: optim.lrr: unknown key; optim.name 'adam' takes: lr, lr_multipliers,",
        ),
        ("optimizer.lr: [0.1]\n", "space.yaml: optimizer: unknown key"),
        ("optim.lr: loguniform(0, 0.1)\n", "space.yaml: optim.lr: loguniform low must be > 0 (got 0)"),
        ("optim.lr: uniform(0.1, 0.01)\n", "space.yaml: optim.lr: uniform low must be < high (got 0.1, 0.01)"),
        ("optim.lr: intlog(-1, 8)\n", "space.yaml: optim.lr: intlog low must be > 0 (got -1)"),
        ("batch.size: int(8, 64.5)\n", "space.yaml: batch.size: int bounds and step must be integers"),
        ("batch.size: int(8, 60, 8)\n", "space.yaml: batch.size: int high - low must be a whole number of steps"),
        ("optim.name: []\n", "space.yaml: optim.name: empty choice list"),
        ("optim.name: [adam, adam]\n", 'space.yaml: optim.name: choice "adam" is listed twice'),
        ("optim.lr: normal(0, 1)\n", "space.yaml: optim.lr: got 'normal(0, 1)'; expected a list of choices"),
        ("optim.lr: 0.01\n", "space.yaml: optim.lr: got 0.01; expected a list of choices"),
        ("optim.lr: uniform(a, b)\n", "space.yaml: optim.lr: uniform arguments must be numbers"),
        ("optim.lr: uniform(1)\n", "space.yaml: optim.lr: uniform takes uniform(low, high)"),
        ("optim.name: [adam, nosuch]\n", "space.yaml: optim.name: got 'nosuch'; expected one of"),
        ("model.dropout: uniform(0, 1.5)\n", "space.yaml: model.dropout: got 1.5; expected"),
        ("optim.lr.x: [1]\n", "space.yaml: optim.lr.x: not a config path"),
        ("stop.monitor: [val_loss]\n", "space.yaml: stop.monitor: cannot be searched (the objective)"),
        ("out_dir: [a, b]\n", "space.yaml: out_dir: cannot be searched (set by the sweep)"),
        ("schedule.name: [constant, exponential]\n", 'space.yaml: schedule.name: "exponential" does not fit'),
        ("[1, 2]\n", "expected a mapping of config paths"),
        ("description: only a note\n", "no entries"),
        ("optim.lr: [0.1\n", "line 2"),
    ],
)
def test_bad_space_files_are_one_line_errors_naming_the_entry(tmp_path: Path, text: str, message: str):
    path = space_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path, BASE)
    shown = str(info.value).replace(str(tmp_path) + "/", "")
    assert message in shown
    assert "\n" not in shown


def test_a_rule_between_fields_may_be_met_by_another_entry(tmp_path: Path):
    # Alone, 'exponential' cannot work (schedule.gamma is required); with gamma searched too it can.
    space = load_space(
        space_file(tmp_path, "schedule.name: [constant, exponential]\nschedule.gamma: uniform(0.9, 0.999)\n"), BASE
    )
    assert validate(space.apply(BASE, {"schedule.name": "exponential", "schedule.gamma": 0.95})).schedule.gamma == 0.95


def test_grid_needs_choices_everywhere(tmp_path: Path):
    space = load_space(space_file(tmp_path, "optim.name: [sgd, adam]\noptim.lr: loguniform(1e-4, 1e-1)\n"), BASE)
    with pytest.raises(ConfigError, match=r"optim.lr: the grid sampler needs a list of choices"):
        space.grid()


def test_missing_file_and_unknown_bundled_name(tmp_path: Path):
    with pytest.raises(ConfigError, match="file not found"):
        load_space(tmp_path / "nope.yaml", BASE)
    with pytest.raises(ConfigError, match=r"space no-such-space: no such file.*bundled: .*digits-mlp"):
        find_space("no-such-space")
    with pytest.raises(ConfigError, match=r"space spaces/typo\.yaml: file not found"):
        find_space("spaces/typo.yaml")  # a path never falls back to a bundled space


def test_bundled_digits_space_fits_the_digits_recipe():
    path = find_space("digits-mlp")
    raw = read_yaml(find_recipe("digits-mlp"))
    space = load_space(path, raw)
    assert {"optim.name", "optim.lr"} <= set(space.paths)
