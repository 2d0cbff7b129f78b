"""models.weight_sparsity: zeros among the weight matrices, the figure run summaries and variants report."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwise.compress.prune import magnitude_prune, sparsity_report
from gradwise.models import weight_sparsity
from gradwise.models.mlp import MLP
from gradwise.train.loop import _final_line


def test_a_known_pruned_fraction_is_reported_and_biases_do_not_count():
    torch.manual_seed(0)
    model = MLP(8, [4], 3)  # weight matrices 8·4 + 4·3 = 44 entries; biases 4 + 3
    assert weight_sparsity(model) == 0.0
    magnitude_prune(model, 0.25, "global")  # round(0.25 · 44) = 11 zeros
    assert weight_sparsity(model) == pytest.approx(11 / 44, abs=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.zero_()  # zero biases are not weight matrices
    assert weight_sparsity(model) == pytest.approx(11 / 44, abs=0)
    assert weight_sparsity(model) == sparsity_report(model)["sparsity"]  # the pruner's own count


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=False)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight  # tied: an embedding table, not counted


def test_embedding_tables_are_left_out_as_pruning_leaves_them_out():
    model = TiedLM()
    with torch.no_grad():
        model.embed.weight.zero_()
        model.proj.weight[0].zero_()
    assert weight_sparsity(model) == 4 / 16
    assert weight_sparsity(model) == sparsity_report(model)["sparsity"]
    assert weight_sparsity(nn.Sequential()) is None  # nothing to count (an ONNX Runtime session, say)


def test_the_final_line_names_parameters_and_sparsity_only_when_there_are_zeros():
    summary = {"status": "completed", "stop_reason": "budget reached", "final": {"test_accuracy": 0.97}}
    dense = _final_line({**summary, "parameters": 12345, "trainable_parameters": 45, "sparsity": 0.0})
    assert dense.endswith("test_accuracy 0.97; 12,345 parameters (45 trainable)")
    pruned = _final_line({**summary, "parameters": 10, "trainable_parameters": 10, "sparsity": 0.9})
    assert pruned.endswith("10 parameters (10 trainable), sparsity 0.9000")
