"""FSDP2 under torchrun (2 CPU processes, gloo): the same optimization as one process with half the state each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# digits MLP without dropout and with a constant LR and gradient clipping (the norm of sharded gradients).
MLP = [
    "model.dropout=0",
    "stop.epochs=3",
    "stop.patience=null",
    "schedule.name=constant",
    "regularize.clip_grad_norm=1.0",
    "log.progress=false",
    "log.plots=false",
]
# A 2-layer GPT on 200k characters of Python source, 60 steps.
GPT = [
    "data.corpus_chars=200000",
    "data.vocab_size=512",
    "data.seq_len=64",
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=2",
    "stop.max_steps=60",
    "eval.every_steps=30",
    "schedule.warmup_steps=10",
    "log.progress=false",
    "log.plots=false",
]
FSDP = "distributed.strategy=fsdp"


def gradwise(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gradwise", *args]
    if args[0] == "train":
        command.append(f"out_dir={tmp_path / 'runs'}")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[:3000] + "\n...\n" + result.stderr[-1500:]
    return result


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key, tensor in a.items():
        torch.testing.assert_close(tensor, b[key], rtol=0, atol=1e-5)


def assert_half_the_state(sharded: dict, whole: dict) -> None:
    """Each of 2 ranks holds about half of the parameters and of the optimizer state (dim-0 shards are padded)."""
    for part in ("parameters", "optimizer"):
        ratio = sharded["state_mb_per_process"][part] / whole["state_mb_per_process"][part]
        assert 0.45 <= ratio <= 0.56, (part, ratio)


@pytest.mark.slow
def test_fsdp_on_two_processes_follows_one_process_and_resumes_with_any_count(tmp_path: Path):
    runs = tmp_path / "runs"
    gradwise(tmp_path, "train", "digits-mlp", "name=one", *MLP)
    gradwise(tmp_path, "train", "digits-mlp", "--nproc", "2", "name=two", FSDP, *MLP)
    one, two = runs / "one", runs / "two"
    assert max(abs(a - b) for a, b in zip(train_losses(one), train_losses(two), strict=True)) < 1e-5
    reference = load_file(str(one / "checkpoints" / "last" / "model.safetensors"))

    # Each rank wrote its own shards, and no single weights file exists until it is asked for.
    last = two / "checkpoints" / "last"
    assert len(list((last / "shards").glob("*.safetensors"))) == 2
    assert not (last / "model.safetensors").exists()
    out = gradwise(tmp_path, "consolidate", str(two))
    assert "last:" in out.stdout and "best:" in out.stdout
    assert_same_weights(load_file(str(last / "model.safetensors")), reference)

    s_one, s_two = summary(one), summary(two)
    assert s_two["strategy"] == "fsdp" and s_two["processes"] == 2
    assert s_two["final"]["test_accuracy"] == s_one["final"]["test_accuracy"]
    assert abs(s_two["final"]["test_loss"] - s_one["final"]["test_loss"]) < 1e-5
    assert_half_the_state(s_two, s_one)

    # Saved sharded by 2 processes, resumed by 1 (no sharding at all); and an ordinary 1-process run
    # continued fully sharded on 2 (each rank keeps its shards of the full files).
    gradwise(tmp_path, "train", "digits-mlp", "--nproc", "2", "name=two-one", FSDP, "stop.max_steps=50", *MLP)
    gradwise(tmp_path, "resume", str(runs / "two-one"), "stop.max_steps=120")
    gradwise(tmp_path, "train", "digits-mlp", "name=one-two", "stop.max_steps=50", *MLP)
    gradwise(tmp_path, "resume", str(runs / "one-two"), "--nproc", "2", FSDP, "stop.max_steps=120")
    # Rank 0's shard files lost: each tensor's pieces no longer cover it, a one-line error (not garbage).
    for file in (runs / "two-one" / "checkpoints" / "best" / "shards").glob("shard-00001-*"):
        file.unlink()
    failed = subprocess.run(
        [sys.executable, "-m", "gradwise", "consolidate", str(runs / "two-one"), "--checkpoint", "best"],
        capture_output=True,
        text=True,
    )
    assert (
        failed.returncode == 2
        and ("incomplete" in failed.stderr or "the checkpoint is damaged" in failed.stderr)
        and failed.stderr.count("\n") == 1
    )
    for name in ("two-one", "one-two"):
        assert len(train_losses(runs / name)) == 120
        gradwise(tmp_path, "consolidate", str(runs / name), "--checkpoint", "last")
        assert_same_weights(load_file(str(runs / name / "checkpoints" / "last" / "model.safetensors")), reference)


@pytest.mark.slow
def test_fsdp_accumulation_with_uneven_shares_keeps_the_ranks_in_step(tmp_path: Path):
    # The epoch's last batch of 9 rows: 5 for rank 0, 4 for rank 1; with 5 micro-batches rank 1 runs an empty one.
    args = ["batch.accumulate=5", "stop.epochs=1", *MLP]
    gradwise(tmp_path, "train", "digits-mlp", "name=one", *args)
    gradwise(tmp_path, "train", "digits-mlp", "--nproc", "2", "name=two", FSDP, "distributed.timeout_s=60", *args)
    one, two = train_losses(tmp_path / "runs" / "one"), train_losses(tmp_path / "runs" / "two")
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5


@pytest.mark.slow
def test_fsdp_trains_a_tiny_gpt_like_one_process(tmp_path: Path):
    runs = tmp_path / "runs"
    gradwise(tmp_path, "train", "gpt-python", "name=one", *GPT)
    gradwise(tmp_path, "train", "gpt-python", "--nproc", "2", "name=two", FSDP, *GPT)
    assert max(abs(a - b) for a, b in zip(train_losses(runs / "one"), train_losses(runs / "two"), strict=True)) < 1e-4
    s_one, s_two = summary(runs / "one"), summary(runs / "two")
    assert abs(s_two["final"]["val_loss"] - s_one["final"]["val_loss"]) < 1e-4
    assert s_two["final"]["val_loss"] < 5.5  # it learned: a uniform guess over 512 tokens is ln 512 = 6.24
    assert_half_the_state(s_two, s_one)
    # eval reads the sharded best checkpoint directly.
    out = gradwise(tmp_path, "eval", str(runs / "two"))
    assert f"{s_two['final']['test_loss']:.6g}"[:5] in out.stdout


@pytest.mark.slow
def test_fsdp_mixed_precision_computes_in_bf16_close_to_fp32(tmp_path: Path):
    runs = tmp_path / "runs"
    gradwise(tmp_path, "train", "digits-mlp", "--nproc", "2", "name=fp32", FSDP, *MLP)
    bf16_args = ["name=bf16", FSDP, "distributed.mixed_precision=bf16"]
    gradwise(tmp_path, "train", "digits-mlp", "--nproc", "2", *bf16_args, *MLP)
    fp32, bf16 = train_losses(runs / "fp32"), train_losses(runs / "bf16")
    gap = max(abs(a - b) for a, b in zip(fp32, bf16, strict=True))
    assert 1e-5 < gap < 0.05  # bf16 really ran (not bit-equal to fp32), and stayed close
    s_fp32, s_bf16 = summary(runs / "fp32"), summary(runs / "bf16")
    assert abs(s_bf16["final"]["test_accuracy"] - s_fp32["final"]["test_accuracy"]) <= 0.01
    # The shards themselves stay fp32: only the gathered copies used for compute are bf16.
    assert s_bf16["state_mb_per_process"] == s_fp32["state_mb_per_process"]
