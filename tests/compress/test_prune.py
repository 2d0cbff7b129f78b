"""One-shot magnitude pruning, weight selection, sparsity counts and the Zhu & Gupta schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwise.compress.prune import (
    magnitude_prune,
    prunable_weights,
    smallest_mask,
    sparsity_report,
    zhu_gupta_sparsity,
)
from gradwise.errors import ConfigError
from gradwise.models.mlp import MLP


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(64, [32, 16], 10, norm="layer")  # weights 2048 + 512 + 160 = 2720; LayerNorm scales are 1-D


class Tied(nn.Module):
    """A tiny language model whose output layer shares the embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight


WEIGHTS = ["body.0.linear.weight", "body.1.linear.weight", "head.weight"]


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (9, 0.0),  # before begin: nothing pruned
        (10, 0.1),  # begin: the initial sparsity
        (15, 0.1),  # between points: the last point's value
        (20, 0.9 - 0.8 * 0.75**3),  # 0.5625
        (29, 0.5625),
        (30, 0.9 - 0.8 * 0.5**3),  # 0.8
        (40, 0.9 - 0.8 * 0.25**3),  # 0.8875
        (49, 0.8875),
        (50, 0.9),  # end
        (1000, 0.9),  # after end
    ],
)
def test_zhu_gupta_cubic_schedule(step: int, expected: float):
    assert zhu_gupta_sparsity(step, 0.1, 0.9, begin_step=10, end_step=50, every_steps=10) == pytest.approx(expected)


def test_zhu_gupta_end_that_is_not_a_multiple_of_every_steps():
    # Points at 0, 4, 8 and the end 10; from 0 to 0.5.
    values = [zhu_gupta_sparsity(s, 0.0, 0.5, 0, 10, 4) for s in (0, 3, 4, 8, 9, 10)]
    assert values == pytest.approx([0.0, 0.0, 0.5 * (1 - 0.6**3), 0.5 * (1 - 0.2**3), 0.5 * (1 - 0.2**3), 0.5])
    assert zhu_gupta_sparsity(7, 0.2, 0.6, 7, 7, 3) == 0.6  # begin == end: one-shot at that step
    assert zhu_gupta_sparsity(6, 0.2, 0.6, 7, 7, 3) == 0.0


def test_zhu_gupta_rejects_bad_steps():
    with pytest.raises(ConfigError, match=r"prune\.every_steps"):
        zhu_gupta_sparsity(5, 0.0, 0.5, 0, 10, 0)
    with pytest.raises(ConfigError, match="end step"):
        zhu_gupta_sparsity(5, 0.0, 0.5, 10, 5, 1)


# --------------------------------------------------------------------------- which weights


def test_prunable_weights_are_the_matrices_in_parameter_order():
    model = mlp()
    assert [name for name, _, _ in prunable_weights(model)] == WEIGHTS
    _, module, attr = prunable_weights(model)[0]
    assert module is model.body[0].linear and attr == "weight"
    assert [n for n, _, _ in prunable_weights(model, ["body.*"], ["*.1.*"])] == ["body.0.linear.weight"]


def test_embedding_tables_only_when_named():
    model = Tied()
    # The tied output layer is the embedding table under its first name, and "*" leaves it out.
    assert [n for n, _, _ in prunable_weights(model)] == ["conv.weight"]
    assert [n for n, _, _ in prunable_weights(model, ["*", "emb.*"])] == ["emb.weight", "conv.weight"]
    with pytest.raises(ConfigError, match="leave no weight to prune"):
        prunable_weights(model, ["*"], ["conv.*"])


@pytest.mark.parametrize(
    ("field", "kwargs"), [("include", {"include": ["encoder.*"]}), ("exclude", {"exclude": ["x"]})]
)
def test_pattern_matching_nothing_is_an_error_listing_names(field: str, kwargs: dict):
    with pytest.raises(ConfigError, match=rf"prune\.{field}: pattern .* matches no prunable weight.*body\.0\.linear"):
        prunable_weights(mlp(), **kwargs)


# --------------------------------------------------------------------------- one-shot pruning


def _smallest_positions(tensors: list[torch.Tensor], k: int) -> set[tuple[int, int]]:
    """(tensor index, flat index) of the k smallest |w| over all tensors, by a full sort."""
    entries = [(abs(v), t, i) for t, w in enumerate(tensors) for i, v in enumerate(w.flatten().tolist())]
    entries.sort()
    return {(t, i) for _, t, i in entries[:k]}


def _zero_positions(tensors: list[torch.Tensor]) -> set[tuple[int, int]]:
    return {(t, int(i)) for t, w in enumerate(tensors) for i in torch.nonzero(w.flatten() == 0).flatten()}


def test_global_magnitude_prune_zeroes_the_smallest_weights_overall():
    model = mlp()
    before_keys = list(model.state_dict())
    params = {name: getattr(module, attr) for name, module, attr in prunable_weights(model)}
    originals = [p.detach().clone() for p in params.values()]
    bias = model.head.bias.detach().clone()

    magnitude_prune(model, 0.7, scope="global")

    after = [p.detach() for p in params.values()]
    k = round(0.7 * 2720)  # 1904
    assert sum(int((w == 0).sum()) for w in after) == k
    assert _zero_positions(after) == _smallest_positions(originals, k)
    for w, w0 in zip(after, originals, strict=True):
        assert torch.equal(w[w != 0], w0[w != 0])  # survivors keep their values
    # Global ranking prunes the layers unevenly.
    assert len({round(float((w == 0).float().mean()), 3) for w in after}) == 3
    assert torch.equal(model.head.bias, bias)
    # Same keys, same Parameter objects (an optimizer keeps working), no pruning hooks left behind.
    assert list(model.state_dict()) == before_keys
    assert all(getattr(m, a) is params[n] for n, m, a in prunable_weights(model))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_layer_magnitude_prune_gives_each_tensor_the_sparsity():
    model = mlp()
    originals = [getattr(m, a).detach().clone() for _, m, a in prunable_weights(model)]
    before_keys = list(model.state_dict())
    magnitude_prune(model, 0.7, scope="layer")
    after = [getattr(m, a).detach() for _, m, a in prunable_weights(model)]
    # round(0.7 * n) per tensor: 1433.6 → 1434, 358.4 → 358, 112.
    assert [int((w == 0).sum()) for w in after] == [1434, 358, 112]
    for w, w0, k in zip(after, originals, [1434, 358, 112], strict=True):
        assert _zero_positions([w]) == _smallest_positions([w0], k)
    assert list(model.state_dict()) == before_keys
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_prune_only_the_included_conv_weight():
    torch.manual_seed(1)
    model = Tied()
    emb = model.emb.weight.detach().clone()
    magnitude_prune(model, 0.5, scope="layer", include=["conv.*"])
    assert int((model.conv.weight == 0).sum()) == round(0.5 * 8 * 8 * 3)
    assert torch.equal(model.emb.weight, emb)
    assert model.out.weight is model.emb.weight  # the tie survives


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan])
def test_sparsity_outside_the_unit_interval_is_an_error(sparsity: float):
    with pytest.raises(ConfigError, match=r"prune\.sparsity: got .*0 <= sparsity < 1"):
        magnitude_prune(mlp(), sparsity)


def test_unknown_scope_is_an_error():
    with pytest.raises(ConfigError, match=r"prune\.scope"):
        magnitude_prune(mlp(), 0.5, scope="row")  # type: ignore[arg-type]


def test_sparsity_zero_changes_nothing_and_report_counts_true_zeros():
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    magnitude_prune(model, 0.0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.head.weight[0, :5] = 0.0  # zeros written by hand count too: the report reads the tensors
    report = sparsity_report(model)
    assert report["weights"]["head.weight"] == {"numel": 160, "nonzeros": 155, "sparsity": pytest.approx(5 / 160)}
    assert (report["numel"], report["nonzeros"]) == (2720, 2715)
    assert report["sparsity"] == pytest.approx(5 / 2720)
    assert list(sparsity_report(model, exclude=["head.*"])["weights"]) == WEIGHTS[:2]


def test_smallest_mask_is_exact_with_ties():
    scores = torch.tensor([[3.0, 1.0, 1.0], [1.0, 0.5, -1.0]])
    # -1 and 0.5, then the first of the three tied 1.0s by flat index.
    assert smallest_mask(scores, 3).tolist() == [[False, True, False], [False, True, True]]
    assert not smallest_mask(scores, 0).any() and smallest_mask(scores, 6).all()
    assert int(smallest_mask(torch.zeros(4, 4), 5).sum()) == 5
