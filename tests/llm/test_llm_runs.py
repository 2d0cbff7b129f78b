"""SFT and DPO runs through the one loop: quality bars on held-out bundled dialogue, bit-exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradwise.config import validate
from gradwise.data.preference import bundled_pairs
from gradwise.store.checkpoint import load_model_state, load_weights_into
from gradwise.tasks.preference import sequence_logps
from gradwise.train.evaluate import evaluate
from gradwise.train.loop import fit
from gradwise.train.setup import build_model_and_data


def run_config(model_dir: Path, base_data: dict, base_task: dict, sections: dict) -> dict:
    raw = {
        "seed": 0,
        "data": base_data,
        "model": {"name": "hf_causal_lm", "path": str(model_dir)},
        "task": base_task,
        "optim": {"name": "adamw", "lr": 0.003},
        "schedule": {"name": "cosine", "warmup_steps": 10},
        "batch": {"size": 16},
        "stop": {"epochs": None, "max_steps": 200},
        "eval": {"every_steps": 100, "batch_size": 32},
        "log": {"progress": False, "plots": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def chat(model_dir: Path, **sections) -> dict:
    data = {"name": "chat", "max_length": 96, "packing": "packed"}
    return run_config(model_dir, data, {"kind": "language_modeling"}, sections)


def preference(model_dir: Path, **sections) -> dict:
    data = {"name": "preference", "max_length": 96}
    return run_config(model_dir, data, {"kind": "preference", "beta": 0.1}, {"optim": {"lr": 0.001}, **sections})


@pytest.mark.slow
def test_sft_lowers_held_out_assistant_loss_and_raises_reference_likelihood(model_dirs, tmp_path):
    cfg = validate(chat(model_dirs["llama"]))
    data, base, task, device = build_model_and_data(cfg)
    before = evaluate(base, task, data.test, "test", 64, device, "fp32").metrics
    summary = fit(cfg, tmp_path / "sft")
    after = summary["final"]
    # The base is random (≈ ln 512 = 6.2 nats per token); 200 steps of SFT on the dialogues roughly halve it.
    assert before["test_loss"] > 6.0
    assert after["test_loss"] < 0.55 * before["test_loss"], (before, after)
    assert after["test_accuracy"] > 0.35
    # Per held-out conversation: the log-likelihood of its reference replies rises for nearly every one.
    tuned = build_model_and_data(cfg)[1]
    load_weights_into(tuned, load_model_state(tmp_path / "sft" / "checkpoints" / "best"), tmp_path)
    x, y = data.test.x, data.test.y
    with torch.no_grad():
        gain = sequence_logps(tuned.eval()(x), y) - sequence_logps(base.eval()(x), y)
    assert float((gain > 0).float().mean()) > 0.95
    stats = summary["data_stats"]
    assert stats["packing"] == "packed" and 0 <= stats["row_padding_fraction"] < 0.2
    assert summary["target_tokens"] > 0 and summary["target_tokens_per_s"] > 0


@pytest.mark.slow
def test_dpo_raises_held_out_preference_accuracy_from_a_half_to_above_080(model_dirs, tmp_path):
    cfg = validate(preference(model_dirs["llama"], stop={"max_steps": 120}, eval={"every_steps": 60}))
    data, model, task, device = build_model_and_data(cfg)
    before = evaluate(model, task, data.test, "test", 64, device, "fp32").metrics
    assert before["test_accuracy"] == pytest.approx(0.5)  # the policy is its reference: every pair ties
    summary = fit(cfg, tmp_path / "dpo")
    assert summary["final"]["test_accuracy"] >= 0.8, summary["final"]
    assert summary["final"]["test_chosen_reward"] > summary["final"]["test_rejected_reward"]


def test_bundled_pairs_reject_another_conversations_reply():
    pairs = bundled_pairs(0)
    assert len(pairs) > 1000
    assert all(chosen != rejected for _, chosen, rejected in pairs)
    prompt, chosen, _ = pairs[0]
    assert isinstance(prompt, list) and prompt[-1]["role"] == "user" and isinstance(chosen, str)
    assert bundled_pairs(0) == pairs and bundled_pairs(1) != pairs


def test_preference_file_with_a_conversational_prompt(model_dirs, tmp_path):
    import json

    file = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": f"Say {w}"}], "chosen": w, "rejected": "no"}
        for w in ("yes", "maybe", "sure", "fine", "ok", "right", "good", "great", "nice", "true")
    ]
    rows.append({"prompt": "Answer: ", "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no"})
    rows.insert(3, {"prompt": "long " * 200, "chosen": "a", "rejected": "b"})  # dropped: over max_length
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_cfg = {"path": str(file), "val_fraction": 0.2, "test_fraction": 0.0, "overflow": "drop"}
    cfg = validate(preference(model_dirs["llama"], data=data_cfg))
    data, _, task, _ = build_model_and_data(cfg)  # the reference of every kept pair, by its place in the file
    stats = data.info.text_stats
    assert (stats["examples"], stats["dropped_too_long"], stats["pairs_read"]) == (11, 1, 12)
    assert task.reference.shape == (12, 2) and bool((task.reference[3] == 0).all())
    assert int((task.reference != 0).all(dim=1).sum()) == 11
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,chosen,rejected\nhi,"[{""role"": ""assistant"", ""content"": ""x""",no\n')
    from gradwise.errors import DataError

    with pytest.raises(DataError, match=r"bad.csv: column 'chosen' row 1 .*not a JSON list of messages"):
        build_model_and_data(validate(preference(model_dirs["llama"], data={"path": str(bad)})))


def test_ipo_is_the_squared_distance_of_the_margin_to_half_over_beta(model_dirs):
    cfg = validate(preference(model_dirs["llama"], data={"limit": 40}, task={"loss": "ipo", "beta": 0.5}))
    data, model, task, _ = build_model_and_data(cfg)
    rows = torch.arange(4)
    x, y = data.train.x[rows], data.train.y[rows]
    with torch.no_grad():
        logits = model(x)
        logits = logits + 0.01 * torch.randn_like(logits)  # a policy that moved a little from its reference
        ratios = sequence_logps(logits, y[..., 1:]) - task.reference[y[:, 0, 0]].float()
        expected = ((ratios[:, 0] - ratios[:, 1] - 1.0) ** 2).sum()
        assert torch.allclose(task.loss_sum(logits, y), expected, rtol=1e-5)
        dpo = validate(preference(model_dirs["llama"], data={"limit": 40}))
        dpo_task = build_model_and_data(dpo)[2]
        margin = 0.1 * (ratios[:, 0] - ratios[:, 1])
        assert torch.allclose(dpo_task.loss_sum(logits, y), -torch.nn.functional.logsigmoid(margin).sum(), rtol=1e-5)


def _resume_matches(cfg_raw: dict, tmp_path: Path) -> None:
    cfg = validate(cfg_raw)
    fit(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_at_4() -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    fit(cfg, tmp_path / "split", stop_requested=stop_at_4)
    fit(cfg, tmp_path / "split", resume=True)
    a = load_model_state(tmp_path / "whole" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "split" / "checkpoints" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_sft_resume_is_bit_exact(model_dirs, tmp_path):
    raw = chat(
        model_dirs["llama"],
        data={"limit": 120},
        stop={"max_steps": 9},
        eval={"every_steps": 3},
        schedule={"warmup_steps": 2},
        batch={"size": 8, "accumulate": 2},
        regularize={"clip_grad_norm": 1.0},
    )
    _resume_matches(raw, tmp_path)


def test_dpo_resume_is_bit_exact(model_dirs, tmp_path):
    raw = preference(
        model_dirs["qwen2"],
        data={"limit": 120},
        stop={"max_steps": 9},
        eval={"every_steps": 3},
        schedule={"warmup_steps": 2},
        batch={"size": 8},
    )
    _resume_matches(raw, tmp_path)


def test_lora_sft_resume_is_bit_exact(model_dirs, tmp_path):
    raw = chat(
        model_dirs["gpt2"],
        data={"limit": 120, "packing": "padding_free"},
        stop={"max_steps": 9},
        eval={"every_steps": 3},
        schedule={"warmup_steps": 2},
        batch={"size": 8},
        finetune={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
    )
    _resume_matches(raw, tmp_path)


@pytest.mark.slow
def test_two_processes_follow_one_on_packed_sft(model_dirs, tmp_path):
    """DDP on 2 CPU processes: each rank takes its stride of the packed rows; the weights follow one process."""
    import subprocess
    import sys

    import yaml

    raw = chat(
        model_dirs["llama"],
        data={"limit": 120},
        stop={"max_steps": 4},
        eval={"every_steps": 4},
        batch={"size": 8},
        schedule={"warmup_steps": 0},
    )
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    fit(validate(raw), tmp_path / "runs" / "one")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradwise",
            "train",
            str(recipe),
            "--nproc",
            "2",
            "name=two",
            f"out_dir={tmp_path / 'runs'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_model_state(tmp_path / "runs" / "one" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "runs" / "two" / "checkpoints" / "last")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
