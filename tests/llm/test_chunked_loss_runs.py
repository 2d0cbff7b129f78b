"""``model.chunked_loss``: training runs give the same losses with and without the full logits, for gpt and
hf_causal_lm, packed and unpacked, with LoRA, NEFTune and gradient checkpointing; everything that reads
logits outside the training step still gets them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwise.tasks.language_modeling as language_modeling
from gradwise.config import validate
from gradwise.config.loading import load_config
from gradwise.errors import ConfigError
from gradwise.experiments.recipes import find_recipe
from gradwise.models.lazy_logits import LazyLogits
from gradwise.train.loop import fit
from gradwise.train.setup import build_model_and_data

# gpt-python, shrunk to seconds: 1 layer, 8 steps, evaluated twice.
GPT = [
    "data.corpus_chars=30000",
    "data.vocab_size=300",
    "data.seq_len=32",
    "model.n_layer=1",
    "model.n_embd=32",
    "batch.size=8",
    "stop.max_steps=8",
    "eval.every_steps=4",
    "schedule.warmup_steps=2",
    "log.progress=false",
    "log.plots=false",
]


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


def assert_same_run(off: dict[str, Any], on: dict[str, Any], off_dir: Path, on_dir: Path) -> None:
    a, b = train_losses(off_dir), train_losses(on_dir)
    assert len(a) == len(b) > 0
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
    assert abs(off["final"]["val_loss"] - on["final"]["val_loss"]) < 1e-5


@pytest.fixture
def chunked_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the training losses computed by the chunked function (so an 'on' run is known to use it)."""
    calls: list[int] = []
    real = language_modeling.chunked_cross_entropy_sum

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(language_modeling, "chunked_cross_entropy_sum", counting)
    return calls


@pytest.mark.parametrize(
    "extra",
    [[], ["task.label_smoothing=0.1", "model.gradient_checkpointing=true", "batch.accumulate=2"]],
    ids=["plain", "smoothing-checkpointing-accumulation"],
)
def test_gpt_recipe_trains_the_same_with_chunked_loss(tmp_path: Path, chunked_calls: list[int], extra: list[str]):
    runs = {}
    for setting in ("off", "on"):
        cfg = load_config(find_recipe("gpt-python"), [*GPT, *extra, f"model.chunked_loss={setting}"])
        runs[setting] = fit(cfg, tmp_path / setting)
        assert bool(chunked_calls) == (setting == "on")
    assert_same_run(runs["off"], runs["on"], tmp_path / "off", tmp_path / "on")


def sft(model_dir: Path, chunked: str | bool, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "seed": 0,
        "data": {"name": "chat", "max_length": 64, "limit": 96},
        "model": {"name": "hf_causal_lm", "path": str(model_dir), "chunked_loss": chunked},
        "task": {"kind": "language_modeling"},
        "optim": {"name": "adamw", "lr": 0.003},
        "batch": {"size": 8},
        "stop": {"epochs": None, "max_steps": 6},
        "eval": {"every_steps": 3, "batch_size": 16},
        "log": {"progress": False, "plots": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.mark.parametrize(
    ("kind", "sections"),
    [
        ("llama", {}),
        ("llama", {"data": {"packing": "packed"}}),
        ("llama", {"data": {"packing": "padding_free"}}),
        ("qwen2", {"data": {"packing": "packed"}, "task": {"label_smoothing": 0.1}}),  # tied head
        ("llama", {"finetune": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "neftune_alpha": 5.0}}),
        ("gpt2", {"model": {"gradient_checkpointing": True}}),
    ],
    ids=[
        "llama-unpacked",
        "llama-packed",
        "llama-padding-free",
        "qwen2-packed-smoothing",
        "llama-lora-neftune",
        "gpt2-checkpointing",
    ],
)
def test_causal_lm_trains_the_same_with_chunked_loss(
    model_dirs: dict[str, Path], tmp_path: Path, chunked_calls: list[int], kind: str, sections: dict[str, Any]
):
    runs = {}
    for setting in ("off", "on"):
        runs[setting] = fit(validate(sft(model_dirs[kind], setting, **sections)), tmp_path / setting)
        assert bool(chunked_calls) == (setting == "on")
    assert_same_run(runs["off"], runs["on"], tmp_path / "off", tmp_path / "on")


def test_the_model_returns_lazy_logits_only_in_a_training_forward(model_dirs: dict[str, Path]):
    cfg = validate(sft(model_dirs["llama"], "on", data={"packing": "packed"}))
    data, model, _, _ = build_model_and_data(cfg)
    inputs = {k: v[:2] for k, v in data.train.x.items()} if isinstance(data.train.x, dict) else data.train.x[:2]
    model.train()
    lazy = model(inputs)
    assert isinstance(lazy, LazyLogits)
    model.eval()
    logits = model(inputs)
    assert type(logits) is torch.Tensor and logits.shape == lazy.shape
    torch.testing.assert_close(lazy.materialize(), logits, atol=1e-5, rtol=0)  # the same numbers
    model.train()
    with torch.no_grad():
        assert type(model(inputs)) is torch.Tensor  # no gradient, no loss: nothing to save


def test_auto_follows_the_vocabulary_size_and_on_is_refused_where_it_does_not_apply(
    model_dirs: dict[str, Path], tmp_path: Path
):
    # The tiny models' 512 tokens are below auto's threshold.
    assert build_model_and_data(validate(sft(model_dirs["llama"], "auto")))[1].chunked_loss is False
    assert build_model_and_data(validate(sft(model_dirs["llama"], "on")))[1].chunked_loss is True
    assert validate(sft(model_dirs["llama"], True)).model.chunked_loss == "on"  # YAML reads a bare on as true
    assert validate(sft(model_dirs["llama"], False)).model.chunked_loss == "off"
    dpo = sft(model_dirs["llama"], "on", data={"name": "preference", "max_length": 64}, task={"kind": "preference"})
    with pytest.raises(ConfigError, match=r"model\.chunked_loss on: preference"):
        build_model_and_data(validate(dpo))
    dpo["model"]["chunked_loss"] = "auto"
    assert build_model_and_data(validate(dpo))[1].chunked_loss is False
    with pytest.raises(ConfigError, match=r"model\.chunked_loss: got 'sometimes'; expected one of 'auto', 'on' or"):
        validate(sft(model_dirs["llama"], "sometimes"))


def test_fully_sharded_model_falls_back_to_logits(tmp_path: Path):
    """Under FSDP2 the head's weight is a shard outside the forward, so the forward returns logits."""
    script = tmp_path / "fsdp.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "from gradwise.config import ModelConfig\n"
        "from gradwise.data import DataInfo\n"
        "from gradwise.models.gpt import build_gpt\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "info = DataInfo('language_modeling', 16, None, 300, None, ['tokens'], 'next', 'test', vocab_size=300,"
        " pad_token_id=0)\n"
        "model = build_gpt(ModelConfig(name='gpt', n_layer=1, n_embd=32, chunked_loss='on'), info)\n"
        "ids = torch.randint(0, 300, (2, 16))\n"
        "assert type(model(ids)).__name__ == 'LazyLogits'\n"
        "fully_shard(model)\n"
        "out = model(ids)\n"
        "assert type(out) is torch.Tensor and out.shape == (2, 16, 300), type(out)\n"
        "out.float().logsumexp(-1).sum().backward()\n"
        "dist.destroy_process_group()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_ddp_on_two_processes_trains_the_same_with_chunked_loss(tmp_path: Path):
    """The head's weight gradient arrives through autograd, so DDP's all-reduce sees it as usual."""
    losses = {}
    for setting in ("off", "on"):
        command = [sys.executable, "-m", "gradwise", "train", "gpt-python", "--nproc", "2", f"name=chunked-{setting}",
                   f"out_dir={tmp_path / 'runs'}", *GPT, f"model.chunked_loss={setting}"]  # fmt: skip
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[setting] = train_losses(tmp_path / "runs" / f"chunked-{setting}")
    assert len(losses["on"]) == len(losses["off"]) > 0
    assert max(abs(a - b) for a, b in zip(losses["off"], losses["on"], strict=True)) < 1e-5
