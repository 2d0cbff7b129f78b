"""Sharded (FSDP-format) checkpoints in one process, FSDP unit choice, and the distributed config's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gradwise.config import OptimConfig, validate
from gradwise.errors import CheckpointError, ConfigError
from gradwise.models.cnn import CNN
from gradwise.models.mlp import MLP
from gradwise.optim import build_optimizer
from gradwise.store import sharded as sharded_checkpoint
from gradwise.store.checkpoint import load_model_state
from gradwise.store.sharded import (
    consolidate,
    consolidated_model_state,
    is_sharded,
    load_sharded_checkpoint,
    optimizer_state_dict,
    save_sharded_checkpoint,
)
from gradwise.train.distributed import Distributed
from gradwise.train.sharding import shard_units, state_bytes


def trained(seed: int, steps: int = 3, optimizer_name: str = "adamw") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MLP(8, [16, 12], 3)
    optimizer = build_optimizer(model, OptimConfig(name=optimizer_name, lr=0.01), weight_decay=0.0)
    for _ in range(steps):
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, optimizer


def save(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int = 3) -> Path:
    state = {"optimizer": optimizer_state_dict(model, optimizer), "counters": {"step": step}}
    return save_sharded_checkpoint(root, step, model.state_dict(), state, ["last"], ctx=Distributed())


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon", "adaptive"])
def test_a_sharded_checkpoint_restores_weights_and_optimizer_exactly(tmp_path: Path, optimizer_name: str):
    model, optimizer = trained(seed=0, optimizer_name=optimizer_name)  # muon: two inner torch optimizers
    ckpt = save(tmp_path / "checkpoints", model, optimizer)
    assert is_sharded(ckpt) and (tmp_path / "checkpoints" / "last").resolve() == ckpt.resolve()
    assert not (ckpt / "model.safetensors").exists()

    fresh, fresh_optimizer = trained(seed=1, steps=0, optimizer_name=optimizer_name)  # no optimizer state yet
    rest = load_sharded_checkpoint(ckpt, fresh, fresh_optimizer, ctx=Distributed())
    assert rest == {"counters": {"step": 3}}
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    # The next step is the same step: moments, step counts and hyperparameters all came back.
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_a_rank_writes_its_shards_in_files_of_bounded_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sharded_checkpoint, "SHARD_FILE_BYTES", 600)  # a few tensors of this tiny model per file
    model, optimizer = trained(seed=0)
    ckpt = save(tmp_path, model, optimizer)
    files = sorted(path.name for path in (ckpt / "shards").glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"shard-00001-model-00001-of-{len(files):05d}.safetensors"
    fresh, fresh_optimizer = trained(seed=1, steps=0)
    load_sharded_checkpoint(ckpt, fresh, fresh_optimizer, ctx=Distributed())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(consolidated_model_state(ckpt)[k], v) for k, v in model.state_dict().items())
    # A lost file is found from the manifest, never read as uninitialised memory.
    (ckpt / "shards" / files[0]).unlink()
    with pytest.raises(CheckpointError, match="a shard file is missing"):
        consolidated_model_state(ckpt)


def test_consolidation_assembles_the_full_weights(tmp_path: Path):
    model, optimizer = trained(seed=0)
    ckpt = save(tmp_path, model, optimizer)
    expected = model.state_dict()
    assembled = consolidated_model_state(ckpt)
    assert sorted(assembled) == sorted(expected)  # weights only, no optimizer state
    assert all(torch.equal(assembled[k], v) for k, v in expected.items())
    assert all(torch.equal(load_model_state(ckpt)[k], v) for k, v in expected.items())  # what eval reads
    written = consolidate(ckpt)
    assert written == ckpt / "model.safetensors"
    assert all(torch.equal(load_file(str(written))[k], v) for k, v in expected.items())


def test_a_mismatched_or_damaged_sharded_checkpoint_is_a_one_line_error(tmp_path: Path):
    model, optimizer = trained(seed=0)
    ckpt = save(tmp_path, model, optimizer)
    torch.manual_seed(0)
    wider = MLP(8, [20, 12], 3)
    with pytest.raises(CheckpointError, match=r"body\.0\.linear\.weight has shape \(16, 8\) in the checkpoint"):
        load_sharded_checkpoint(ckpt, wider, torch.optim.AdamW(wider.parameters()), ctx=Distributed())
    deeper = MLP(8, [16, 12, 4], 3)
    with pytest.raises(CheckpointError, match="does not match this run"):
        load_sharded_checkpoint(ckpt, deeper, None, ctx=Distributed())

    shard = next((ckpt / "shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="shards") as caught:
        consolidated_model_state(ckpt)
    assert "\n" not in str(caught.value)
    for file in (ckpt / "shards").iterdir():
        file.unlink()
    with pytest.raises(CheckpointError, match="no shard files"):
        consolidated_model_state(ckpt)


def test_consolidate_refuses_an_ordinary_checkpoint(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        consolidate(tmp_path)


def test_fsdp_units_are_the_blocks_of_the_first_stack():
    mlp = MLP(8, [16, 12], 3)
    assert shard_units(mlp) == list(mlp.body)
    cnn = CNN((1, 8, 8), channels=[4, 8], n_outputs=10)
    assert shard_units(cnn) == list(cnn.features)
    assert shard_units(nn.Linear(3, 2)) == []  # nothing to split: the root is the only unit
    assert shard_units(MLP(8, [16], 3)) == []  # one hidden block is not a stack


def test_state_bytes_counts_parameters_and_optimizer_state():
    model, optimizer = trained(seed=0, steps=1)
    n = sum(p.numel() for p in model.parameters())
    held = state_bytes(model, optimizer)
    assert held["parameters"] == 4 * n
    assert held["optimizer"] == 2 * 4 * n + 4 * len(list(model.parameters()))  # AdamW moments + step counters


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distributed": {"mixed_precision": "bf16"}}, "distributed.mixed_precision is an FSDP setting"),
        ({"distributed": {"cpu_offload": True}}, "distributed.cpu_offload is an FSDP setting"),
        ({"distributed": {"strategy": "fsdp"}, "prune": {"sparsity": 0.5}}, "prune cannot be combined"),
        ({"distributed": {"strategy": "zero"}}, "distributed.strategy"),
        ({"distributed": {"strategy": "fsdp"}, "optim": {"name": "adafactor"}}, "adafactor cannot run on FSDP"),
    ],
)
def test_distributed_config_refusals(overrides: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        validate(overrides, source="recipe.yaml")
