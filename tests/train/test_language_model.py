"""A GPT trained from scratch through the one loop: quality against a unigram baseline, resume, generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradwise.cli import main
from gradwise.config import validate
from gradwise.data.corpus import unigram_perplexity
from gradwise.store.checkpoint import load_model_state
from gradwise.train.loop import fit
from gradwise.train.setup import build_model_and_data

TINY = {
    "data": {"name": "python_source", "corpus_chars": 500_000, "vocab_size": 512, "seq_len": 64},
    "model": {"name": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64},
    "task": {"kind": "language_modeling"},
    "optim": {"name": "adamw", "lr": 0.003},
    "schedule": {"name": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1},
    "regularize": {"clip_grad_norm": 1.0},
    "batch": {"size": 32},
    "eval": {"every_steps": 50, "batch_size": 128},
    "log": {"progress": False, "plots": False},
}


def config(**sections):
    raw = {**TINY, "stop": {"epochs": None, "max_steps": 300}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate(raw)


@pytest.mark.slow
def test_gpt_perplexity_falls_well_below_the_unigram_baseline(tmp_path: Path):
    cfg = config()
    summary = fit(cfg, tmp_path / "run")
    data, _, _, _ = build_model_and_data(cfg)
    baseline = unigram_perplexity(data.train, data.val, data.info.vocab_size)
    assert summary["final"]["val_perplexity"] < 0.5 * baseline
    # The summary carries the same baseline on the test split, which the model must beat there too.
    test_baseline = unigram_perplexity(data.train, data.test, data.info.vocab_size)
    assert summary["unigram_perplexity"] == {"split": "test", "value": pytest.approx(test_baseline, abs=1e-4)}
    assert summary["final"]["test_perplexity"] < 0.5 * summary["unigram_perplexity"]["value"]
    assert summary["monitor"] == "val_loss"
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()


def test_lm_resume_is_bit_exact_and_accumulation_counts_tokens(tmp_path: Path):
    cfg = config(
        stop={"max_steps": 12},
        eval={"every_steps": 5},
        batch={"size": 8, "accumulate": 2},
        schedule={"warmup_steps": 3},
    )
    fit(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_at_7() -> bool:
        calls["n"] += 1
        return calls["n"] == 7

    fit(cfg, tmp_path / "split", stop_requested=stop_at_7)
    fit(cfg, tmp_path / "split", resume=True)
    a = load_model_state(tmp_path / "whole" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "split" / "checkpoints" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_from_a_run_is_deterministic(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(config(stop={"max_steps": 5}, eval={"every_steps": 5}, schedule={"warmup_steps": 0}), tmp_path / "runs" / "lm")
    args = ["generate", "runs/lm", "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("def ")
    assert main(["generate", "runs/lm", "--prompt", "def ", "--max-new-tokens", "20", "--seed", "4"]) == 0
    assert capsys.readouterr().out != first
    summary = json.loads((tmp_path / "runs" / "lm" / "summary.json").read_text())
    assert "val_perplexity" in summary["final"]


def test_generate_refuses_a_classifier_run(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "digits-mlp", "data.limit=300", "stop.epochs=1", "log.progress=false", "name=c"]) == 0
    capsys.readouterr()
    assert main(["generate", "runs/c", "--prompt", "x"]) == 2
    assert "is a classification run, not a language model" in capsys.readouterr().err


def test_generate_and_export_need_no_data(tmp_path: Path, capsys, monkeypatch):
    """A run records what sizes its model: sampling works where the corpus cannot be rebuilt."""
    monkeypatch.chdir(tmp_path)
    fit(config(stop={"max_steps": 3}, eval={"every_steps": 3}, schedule={"warmup_steps": 0}), tmp_path / "runs" / "lm")
    assert (tmp_path / "runs" / "lm" / "data_info.json").exists()

    def no_data(*args, **kwargs):
        raise AssertionError("the data must not be rebuilt")

    monkeypatch.setattr("gradwise.train.setup.load_dataset", no_data)
    assert main(["generate", "runs/lm", "--prompt", "import ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    assert main(["export", "runs/lm"]) == 0
    assert (tmp_path / "runs" / "lm" / "export" / "model.safetensors").exists()
