"""Where the batch finder's probes run: in process with a CUDA-like out-of-memory, in one capped child on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradwise.cli import main
from gradwise.config import RunConfig, read_yaml
from gradwise.errors import ConfigError, TrainingError
from gradwise.experiments.batch_find import OUT_OF_MEMORY, probe_config, search_batch
from gradwise.experiments.batch_probe import ChildRunner, InProcessRunner
from gradwise.experiments.recipes import find_recipe

WIDE = (
    "data: {name: linear, n_samples: 20000}\n"
    "model: {name: mlp, hidden: [2048, 2048]}\n"
    "optim: {name: sgd, lr: 0.01}\n"
    "batch: {size: 4096}\n"
    "stop: {epochs: 1}\n"
)


def _configs(tmp_path: Path, recipe: Path, steps: int = 2):
    raw = read_yaml(recipe)

    def at(batch: int) -> tuple[RunConfig, Path]:
        run_dir = tmp_path / f"batch-{batch}"
        return probe_config(raw, batch, steps, run_dir, source=str(recipe)), run_dir

    return at


class _FakeDevice:
    """A CUDA-like device for the in-process runner's logic: it holds ``capacity`` examples, no more."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.type = "cpu"  # no real CUDA calls; the out-of-memory is raised the way CUDA raises it
        self.calls: list[int] = []

    def train(self, cfg: RunConfig, run_dir: Path) -> tuple[int, float]:
        batch = int(cfg.batch.size)  # type: ignore[arg-type]
        self.calls.append(batch)
        if batch > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} MiB")
        print("fit's own output, which the runner keeps off the terminal")
        return batch, 100.0 * batch


def test_in_process_probes_turn_a_cuda_out_of_memory_into_a_failed_probe(tmp_path: Path, capsys) -> None:
    device = _FakeDevice(capacity=100)
    runner = InProcessRunner(device, train=device.train)
    at = _configs(tmp_path, find_recipe("digits-mlp"))
    probes = search_batch(lambda batch: runner(*at(batch)), start=8, max_batch=65536)
    assert device.calls == [8, 16, 32, 64, 128, 96, 112, 104, 100]
    assert max(p.batch for p in probes if p.fits) == 100
    assert {p.error for p in probes if not p.fits} == {OUT_OF_MEMORY}
    assert [p.examples_per_s for p in probes if p.fits] == [100.0 * p.batch for p in probes if p.fits]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("raised", "expected"),
    [(ValueError("bad shapes"), TrainingError), (ConfigError("optim.lr: bad"), ConfigError)],
)
def test_in_process_probes_reraise_other_failures(tmp_path: Path, raised: Exception, expected: type) -> None:
    def train(cfg: RunConfig, run_dir: Path) -> tuple[int, float]:
        raise raised

    runner = InProcessRunner(_FakeDevice(0), train=train)
    with pytest.raises(expected, match=r"^batch_find: probe at batch 8: "):
        runner(*_configs(tmp_path, find_recipe("digits-mlp"))(8))


@pytest.mark.slow
def test_one_child_runs_every_probe_and_is_replaced_after_an_out_of_memory(tmp_path: Path) -> None:
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(WIDE)
    at = _configs(tmp_path, recipe)
    runner = ChildRunner(limit_mb=120, log=tmp_path / "stderr.log")
    try:
        small = [runner(*at(batch)) for batch in (16, 32)]
        assert runner.starts == 1 and all(p.fits and p.examples_per_s for p in small)
        assert runner(*at(8192)).error == OUT_OF_MEMORY  # ~100 KB an example: far past 120 MB
        again = runner(*at(64))
        assert again.fits and again.batch == 64
        assert runner.starts == 2  # a fresh child after the out-of-memory, one for all the probes before it
    finally:
        runner.close()


def test_batch_find_on_the_batch_norm_cnn_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    # digits-cnn has BatchNorm, and 1257 training examples = 157·8 + 1: a probe at 8 must not be refused.
    monkeypatch.chdir(tmp_path)
    code = main(["batch-find", "digits-cnn", "--start", "8", "--max-batch", "16", "--steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "largest batch that fits: 16" in out
    assert "suggestion: batch.size=64 batch.accumulate=4" in out
    assert not (tmp_path / "runs").exists()  # probes live in a temporary directory
