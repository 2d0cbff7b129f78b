"""Fixed freezing and gradual unfreezing: exactly which parameters train, on a tiny BERT and an MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwise.config import FinetuneConfig, OptimConfig
from gradwise.errors import ConfigError
from gradwise.finetune import GradualUnfreezer, apply_freezing, model_parts
from gradwise.models import MLP
from gradwise.optim import apply_decoupled_weight_decay, build_optimizer

LAYERS = 3  # the tiny BERT of conftest.py


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def layer(k: int, names: set[str]) -> set[str]:
    return {n for n in names if n.startswith(f"body.encoder.layer.{k}.")}


def test_model_parts_split_bert_names(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    parts = model_parts(tiny)
    assert parts.head == ["head.weight", "head.bias"]
    assert parts.embeddings == [n for n in names if n.startswith("body.embeddings.")]
    assert {n.split(".")[-2] for n in parts.embeddings} == {
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "LayerNorm",
    }
    assert len(parts.blocks) == LAYERS
    for k, block in enumerate(parts.blocks):
        assert block == [n for n in names if n.startswith(f"body.encoder.layer.{k}.")]
    assert parts.top == []
    covered = parts.embeddings + [n for b in parts.blocks for n in b] + parts.head
    assert sorted(covered) == sorted(names)


def test_head_only_leaves_just_the_head(tiny):
    frozen = apply_freezing(tiny, FinetuneConfig(head_only=True))
    assert trainable(tiny) == {"head.weight", "head.bias"}
    assert set(frozen) == {n for n, _ in tiny.named_parameters()} - {"head.weight", "head.bias"}


def test_freeze_embeddings_freezes_the_whole_embedding_block(tiny):
    everything = {n for n, _ in tiny.named_parameters()}
    frozen = apply_freezing(tiny, FinetuneConfig(freeze_embeddings=True))
    expected = {n for n in everything if n.startswith("body.embeddings.")}
    assert len(expected) == 5  # word, position, token type, LayerNorm weight and bias
    assert set(frozen) == expected
    assert trainable(tiny) == everything - expected


def test_freeze_layers_freezes_the_bottom_blocks(tiny):
    everything = {n for n, _ in tiny.named_parameters()}
    frozen = set(apply_freezing(tiny, FinetuneConfig(freeze_layers=2)))
    assert frozen == layer(0, everything) | layer(1, everything)
    assert layer(2, everything) <= trainable(tiny)


def test_freeze_patterns_and_their_errors(tiny):
    frozen = apply_freezing(tiny, FinetuneConfig(freeze=["*.attention.*", "body.embeddings.word_embeddings.*"]))
    assert frozen and all(".attention." in n or "word_embeddings" in n for n in frozen)
    assert len([n for n in frozen if ".attention." in n]) == LAYERS * 10  # q, k, v, output dense, LayerNorm: w + b
    with pytest.raises(ConfigError, match=r"finetune\.freeze: pattern 'encoder\.\*' matches no parameter.*body\."):
        apply_freezing(tiny, FinetuneConfig(freeze=["encoder.*"]))


def test_too_many_layers_and_nothing_left_are_config_errors(tiny):
    with pytest.raises(ConfigError, match=r"freeze_layers: got 4, but the model has 3 layers"):
        apply_freezing(tiny, FinetuneConfig(freeze_layers=4))
    with pytest.raises(ConfigError, match="nothing to train"):
        apply_freezing(tiny, FinetuneConfig(head_only=True, freeze=["head.*"]))


def test_mlp_supports_head_only_but_not_layer_freezing():
    mlp = MLP(8, [6, 4], 3)
    apply_freezing(mlp, FinetuneConfig(head_only=True))
    assert trainable(mlp) == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError, match="needs a transformer"):
        apply_freezing(MLP(8, [6], 3), FinetuneConfig(freeze_layers=1))


def test_frozen_parameters_stay_put_through_an_adamw_step_with_weight_decay(tiny):
    apply_freezing(tiny, FinetuneConfig(freeze_layers=2, freeze_embeddings=True))
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    optimizer = build_optimizer(tiny, OptimConfig(name="adam", lr=0.1), weight_decay=0.1)
    ids = torch.tensor([[101, 2054, 2003, 102], [101, 7592, 102, 0]])
    torch.nn.functional.cross_entropy(tiny(ids), torch.tensor([0, 2])).backward()
    apply_decoupled_weight_decay(optimizer)
    optimizer.step()
    changed = {n for n, p in tiny.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable(tiny)
    assert not any(
        n.startswith(("body.embeddings.", "body.encoder.layer.0.", "body.encoder.layer.1.")) for n in changed
    )


# --------------------------------------------------------------------------- gradual unfreezing


def expected_trainable(everything: set[str], k: int) -> set[str]:
    """Head, plus the top k stages: layer 2, layer 1, layer 0, then the embeddings."""
    stages = [layer(2, everything), layer(1, everything), layer(0, everything)]
    stages.append({n for n in everything if n.startswith("body.embeddings.")})
    return {"head.weight", "head.bias"}.union(*stages[:k])


def test_unfreezing_schedule_epoch_by_epoch(tiny):
    everything = {n for n, _ in tiny.named_parameters()}
    unfreezer = GradualUnfreezer(tiny, every_epochs=2)
    assert trainable(tiny) == {"head.weight", "head.bias"}
    assert (unfreezer.n_stages, unfreezer.final_epoch) == (LAYERS + 1, 8)
    # epoch e (completed epochs) → stages e // 2, capped at 4
    for epoch, k in [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (7, 3), (8, 4), (20, 4)]:
        assert unfreezer.apply(epoch) == k
        assert trainable(tiny) == expected_trainable(everything, k), epoch


def test_unfreezing_is_a_pure_function_of_the_epoch(tiny):
    everything = {n for n, _ in tiny.named_parameters()}
    # A resumed run builds a new unfreezer and jumps straight to its epoch.
    GradualUnfreezer(tiny, every_epochs=1).apply(2)
    assert trainable(tiny) == expected_trainable(everything, 2)


def test_permanently_frozen_parameters_are_never_unfrozen(tiny):
    everything = {n for n, _ in tiny.named_parameters()}
    apply_freezing(tiny, FinetuneConfig(freeze_layers=1))
    unfreezer = GradualUnfreezer(tiny, every_epochs=1)
    unfreezer.unfreeze_all()
    assert trainable(tiny) == everything - layer(0, everything)


def test_optimizer_built_after_unfreeze_all_covers_every_stage(tiny):
    everything = {n for n, _ in tiny.named_parameters()}
    unfreezer = GradualUnfreezer(tiny, every_epochs=1)
    unfreezer.unfreeze_all()
    optimizer = build_optimizer(tiny, OptimConfig(name="adamw", lr=0.01), weight_decay=0.01)
    unfreezer.apply(0)
    in_optimizer = {n for g in optimizer.param_groups for n in g["param_names"]}
    assert in_optimizer == everything
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    ids = torch.tensor([[101, 2054, 2003, 102]])
    torch.nn.functional.cross_entropy(tiny(ids), torch.tensor([1])).backward()
    optimizer.step()
    changed = {n for n, p in tiny.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.weight", "head.bias"}  # AdamW decays only parameters that have a gradient


def test_unfreezer_needs_a_transformer():
    with pytest.raises(ConfigError, match="needs a transformer"):
        GradualUnfreezer(MLP(4, [3], 2), every_epochs=1)
