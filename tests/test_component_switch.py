"""Switching a component by name keeps working where a whole section is already written (saved runs, recipes),
and the settings recommenders cannot honour are refused in one line."""

from __future__ import annotations

import pytest

from gradwise.cli import main
from gradwise.config import apply_overrides, validate
from gradwise.errors import ConfigError

ADAM = {
    "optim": {"name": "adam", "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8},
    "model": {"name": "mlp", "hidden": [8]},
}


def test_a_name_override_drops_the_previous_components_own_settings():
    cfg = validate(apply_overrides(ADAM, ["optim.name=sgd", "model.name=linear"]))
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.01 and cfg.model.name == "linear"


def test_settings_given_with_the_switch_belong_to_the_new_component_in_any_order():
    cfg = validate(apply_overrides(ADAM, ["optim.momentum=0.5", "optim.name=momentum"]))
    assert cfg.optim.momentum == 0.5
    with pytest.raises(ConfigError, match=r"optim\.momentum does not apply to optim\.name 'sgd'"):
        validate(apply_overrides(ADAM, ["optim.momentum=0.5", "optim.name=sgd"]))


def test_a_field_the_component_does_not_read_is_still_refused_without_a_switch():
    with pytest.raises(ConfigError, match=r"model\.path does not apply to model\.name 'gpt'"):
        validate({"model": {"name": "gpt", "path": "/x"}, "data": {"name": "python_source"}})


def test_a_saved_run_branches_into_another_optimizer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["log.progress=false", "log.plots=false", "stop.epochs=1", "data.name=wine", "model.hidden=[8]"]
    assert main(["train", "digits-mlp", "name=src", *common]) == 0
    assert main(["resume", "runs/src", "--from-checkpoint", "last", "optim.name=sgd", "stop.epochs=2"]) == 0
    assert "completed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"name": "mf", "sparse": True}, "regularize": {"clip_grad_norm": 1.0}}, "regularize.clip_grad_norm"),
        ({"model": {"name": "mf", "sparse": True}, "regularize": {"l1": 0.1}}, "regularize.l1"),
        ({"model": {"name": "mf"}, "noise": {"eta": 0.01}}, "noise.eta would move row 0"),
        ({"model": {"name": "mf"}, "distributed": {"strategy": "fsdp"}}, "cannot be sharded"),
    ],
)
def test_what_sparse_tables_and_id_rows_rule_out_is_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate({"data": {"name": "movielens"}, **raw})


def test_optim_sparse_on_a_model_without_sparse_tables_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.sparse is the optimizer of sparse-gradient embeddings"):
        validate({"optim": {"name": "adam", "sparse": "adagrad"}})


def test_a_sparse_table_gets_no_decoupled_decay_on_rows_the_batch_did_not_touch():
    import torch

    from gradwise.config import OptimConfig
    from gradwise.models.recsys import BiasedMF
    from gradwise.optim import apply_decoupled_weight_decay, build_optimizer

    torch.manual_seed(0)
    model = BiasedMF(5, 6, 3, sparse=True)
    before = model.item_factors.weight.detach().clone()
    opt = build_optimizer(model, OptimConfig(name="adam"), weight_decay=0.5)
    model({"user": torch.tensor([1]), "item": torch.tensor([1])}).sum().backward()
    apply_decoupled_weight_decay(opt)
    opt.step()
    changed = (model.item_factors.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1]
