"""Starting from another run's best weights: the body loads, a differently shaped head stays new."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwise.config import LoraConfig, ModelConfig
from gradwise.errors import CheckpointError
from gradwise.finetune import apply_lora, load_from_run
from gradwise.models import MLP
from gradwise.models.hf_encoder import build_hf_encoder
from gradwise.store.checkpoint import save_checkpoint


def fake_run(tmp_path, model: nn.Module, tags: tuple[str, ...] = ("last", "best")):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 10, model.state_dict(), {"counters": {"step": 10}}, list(tags))
    return run


def test_digits_mlp_body_moves_to_a_new_three_class_task(tmp_path):
    torch.manual_seed(0)
    source = MLP(64, [32, 16], 10)
    run = fake_run(tmp_path, source)
    torch.manual_seed(1)
    target = MLP(64, [32, 16], 3)
    fresh_head = target.head.weight.detach().clone()
    report = load_from_run(target, run)
    assert report.source == (run / "checkpoints" / "best").resolve() / "model.safetensors"
    assert report.loaded == ["body.0.linear.weight", "body.0.linear.bias", "body.1.linear.weight", "body.1.linear.bias"]
    assert report.skipped_head == ["head.weight", "head.bias"]
    assert report.missing == [] and report.unexpected == []
    for name, tensor in source.state_dict().items():
        if name.startswith("body."):
            assert torch.equal(target.state_dict()[name], tensor)
    assert torch.equal(target.head.weight, fresh_head)
    assert "new head: head.weight, head.bias" in report.summary()


def test_same_shaped_head_is_loaded_too(tmp_path):
    source = MLP(8, [4], 2)
    target = MLP(8, [4], 2)
    report = load_from_run(target, fake_run(tmp_path, source))
    assert report.skipped_head == [] and "head.weight" in report.loaded
    assert torch.equal(target.head.weight, source.head.weight)


def test_body_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    run = fake_run(tmp_path, MLP(64, [32], 10))
    with pytest.raises(
        CheckpointError, match=r"body\.0\.linear\.weight has shape \(32, 64\) in the run but \(16, 64\)"
    ):
        load_from_run(MLP(64, [16], 10), run)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    run = fake_run(tmp_path, MLP(8, [4, 4], 2, norm="layer"))
    report = load_from_run(MLP(8, [4, 4], 2), run)
    assert sorted(report.unexpected) == [
        "body.0.norm.bias",
        "body.0.norm.weight",
        "body.1.norm.bias",
        "body.1.norm.weight",
    ]
    assert report.missing == []
    report = load_from_run(MLP(8, [4, 4], 2, norm="batch"), run)
    assert "body.0.norm.running_mean" in report.missing and "body.0.norm.weight" in report.loaded


def test_falls_back_to_last_and_refuses_missing_runs(tmp_path):
    run = fake_run(tmp_path, MLP(8, [4], 2), tags=("last",))
    assert load_from_run(MLP(8, [4], 2), run).source.parent == (run / "checkpoints" / "last").resolve()
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_from_run(MLP(8, [4], 2), tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no weight fits"):
        load_from_run(nn.Sequential(nn.Linear(3, 3)), run)


def test_encoder_with_a_new_head(tmp_path, tiny, tiny_bert_dir, info):
    from dataclasses import replace

    run = fake_run(tmp_path, tiny)
    info5 = replace(info, n_outputs=5, class_names=list("abcde"))
    target = build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_bert_dir), info5)
    with torch.no_grad():
        for p in target.body.parameters():
            p.zero_()
    report = load_from_run(target, run)
    assert report.skipped_head == ["head.weight", "head.bias"] and not report.missing and not report.unexpected
    assert torch.equal(target.body.encoder.layer[2].output.dense.weight, tiny.body.encoder.layer[2].output.dense.weight)


def test_a_lora_run_loads_merged_into_a_plain_model(tmp_path, tiny, tiny_bert_dir, info):
    apply_lora(tiny, LoraConfig(r=2, alpha=6.0, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tiny.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    run = fake_run(tmp_path, tiny)
    (run / "config.yaml").write_text("finetune:\n  lora:\n    r: 2\n    alpha: 6.0\n")
    ids = torch.tensor([[101, 2054, 2003, 102], [101, 7592, 102, 0]])
    tiny.eval()
    with torch.no_grad():
        expected = tiny(ids)
    plain = build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_bert_dir), info).eval()
    report = load_from_run(plain, run)
    assert not report.missing and not report.unexpected and not report.skipped_head
    assert "body.encoder.layer.0.attention.self.query.weight" in report.loaded
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, atol=1e-5, rtol=0)
    (run / "config.yaml").write_text("finetune: {}\n")
    with pytest.raises(CheckpointError, match=r"trained LoRA adapters, but its finetune\.lora alpha and r"):
        load_from_run(plain, run)
