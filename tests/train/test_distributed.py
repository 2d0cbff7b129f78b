"""Data-parallel training under torchrun (2 CPU processes, gloo): same optimization as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradwise.train.distributed import Distributed

# digits MLP without dropout (each rank draws its own masks) and a constant LR: 3 epochs of batch 32.
OVERRIDES = [
    "model.dropout=0",
    "stop.epochs=3",
    "stop.patience=null",
    "schedule.name=constant",
    "log.progress=false",
    "log.plots=false",
]


def gradwise(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "gradwise", *args, f"out_dir={tmp_path / 'runs'}"]
        if args[0] == "train"
        else [sys.executable, "-m", "gradwise", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # torchrun prints the failing rank's error first and its own summary last: show both ends.
    assert result.returncode == 0, result.stderr[:3000] + "\n...\n" + result.stderr[-1500:]
    return result


def train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_shard_strides_the_global_batch():
    rows = torch.arange(10)
    shards = [Distributed(rank=r, world=3).shard(rows) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert Distributed().shard(rows) is rows and not Distributed().active


@pytest.mark.slow
def test_two_processes_follow_one_and_resume_with_another_count(tmp_path: Path):
    runs = tmp_path / "runs"
    gradwise(tmp_path, "train", "digits-mlp", "name=one", *OVERRIDES)
    out = gradwise(tmp_path, "train", "digits-mlp", "--nproc", "2", "name=two", *OVERRIDES)
    assert out.stdout.count("run: ") == 1  # only rank 0 reports
    one, two = train_losses(runs / "one"), train_losses(runs / "two")
    assert len(one) == len(two) == 120  # the global batch is batch.size whatever the world size
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-5
    reference = weights(runs / "one")
    for key, tensor in weights(runs / "two").items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=1e-5)
    summary = json.loads((runs / "two" / "summary.json").read_text())
    # Metrics are summed from both ranks' sufficient statistics: the whole split, not one rank's half.
    reference_summary = json.loads((runs / "one" / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] == reference_summary["final"]["test_accuracy"]

    # Saved by 2 processes after 50 steps, resumed by 1 to the end: the same run as the uninterrupted one.
    gradwise(tmp_path, "train", "digits-mlp", "--nproc", "2", "name=switch", "stop.max_steps=50", *OVERRIDES)
    gradwise(tmp_path, "resume", str(runs / "switch"), "stop.max_steps=120")
    assert len(train_losses(runs / "switch")) == 120
    for key, tensor in weights(runs / "switch").items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=1e-5)


def test_a_bad_rendezvous_is_a_one_line_error(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    result = subprocess.run(
        [sys.executable, "-m", "gradwise", "train", "digits-mlp", f"out_dir={tmp_path}", *OVERRIDES],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.count("\n") == 0 and "cannot join the job" in err and "MASTER_ADDR" in err
