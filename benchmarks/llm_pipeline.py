"""The own-run LLM pipeline on offline data, every step a gradwise run, scored against the model it started from.

1. ``gpt-python``: a 1.3M-parameter GPT pretrained on the Python standard library's source;
2. exported to Hugging Face format (``gradwise export --format hf``);
3. ``chat-sft``: SFT of that export on the chatterbot-corpus dialogues (assistant tokens only, packed);
4. exported again;
5. ``chat-dpo``: DPO of the SFT export on chatterbot pairs (chosen = the real reply, rejected =
   another conversation's reply).

For SFT the base is the pretrained export; for DPO the reference (the SFT export). Both are scored
by the same code as the runs (``gradwise.train.evaluate.evaluate`` on the run's own test split):
held-out assistant-token loss and, per held-out conversation, whether the log-likelihood of its
reference replies rose; for DPO, held-out preference accuracy (the reference ties every pair: 0.5).

    .venv/bin/python benchmarks/llm_pipeline.py --work /tmp/llm-pipeline        # reuses finished steps

Steps whose run directory already holds a summary are not trained again (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gradwise.config import read_saved_config, validate
from gradwise.store.checkpoint import load_model_state, load_weights_into
from gradwise.tasks.preference import sequence_logps
from gradwise.train.evaluate import evaluate
from gradwise.train.setup import build_model_and_data


def gradwise(work: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "gradwise", *args], cwd=work, check=True)


def step(work: Path, recipe: str, name: str, fresh: bool, *overrides: str) -> dict:
    summary = work / "runs" / name / "summary.json"
    if fresh or not summary.is_file():
        gradwise(work, "train", recipe, f"name={name}", "log.progress=false", *overrides)
    return json.loads(summary.read_text())


def export(work: Path, name: str, out: str) -> None:
    if not (work / out / "config.json").is_file():
        gradwise(work, "export", f"runs/{name}", "--format", "hf", "-o", out)


def score_against_base(work: Path, name: str) -> dict[str, float]:
    """The run's test metrics for the model as loaded (base/reference) and as trained (best weights)."""
    raw = read_saved_config(work / "runs" / name / "config.yaml")
    if "packing" in raw["data"]:  # the same test conversations (split before layout), one per row
        raw["data"]["packing"] = "none"
    cfg = validate(raw)
    data, model, task, device = build_model_and_data(cfg)
    base = evaluate(model, task, data.test, "test", 64, device, "fp32").metrics
    _, tuned, _, _ = build_model_and_data(cfg)
    checkpoint = work / "runs" / name / "checkpoints" / "best"
    load_weights_into(tuned, load_model_state(checkpoint), checkpoint)
    after = evaluate(tuned, task, data.test, "test", 64, device, "fp32").metrics
    out = {f"base_{k}": v for k, v in base.items()} | {f"tuned_{k}": v for k, v in after.items()}
    if task.kind == "language_modeling" and not isinstance(data.test.x, dict):
        gains = []
        with torch.no_grad():
            for start in range(0, len(data.test), 64):
                x, y = data.test.x[start : start + 64], data.test.y[start : start + 64]
                gains.append(sequence_logps(tuned.eval()(x), y) - sequence_logps(model.eval()(x), y))
        out["share_of_conversations_more_likely"] = float((torch.cat(gains) > 0).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llm-pipeline"))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the recipes' model.path (models/...) are relative to where the runs were trained
    pretrain = step(work, "gpt-python", "gpt-python", args.fresh)
    export(work, "gpt-python", "models/gpt-python")
    sft = step(work, "chat-sft", "chat-sft", args.fresh)
    export(work, "chat-sft", "models/chat-sft")
    dpo = step(work, "chat-dpo", "chat-dpo", args.fresh)
    sft_scores = score_against_base(work, "chat-sft")
    dpo_scores = score_against_base(work, "chat-dpo")
    print("| step | run | held-out metric | start | after | wall s |")
    print("|---|---|---|---|---|---|")
    print(f"| pretrain | gpt-python | test perplexity | — | {pretrain['final']['test_perplexity']:.1f} | "
          f"{pretrain['wall_time_s']:.0f} |")
    print(f"| SFT | chat-sft | test assistant-token loss (nats) | {sft_scores['base_test_loss']:.3f} | "
          f"{sft_scores['tuned_test_loss']:.3f} | {sft['wall_time_s']:.0f} |")
    print(f"| SFT | chat-sft | test token accuracy | {sft_scores['base_test_accuracy']:.3f} | "
          f"{sft_scores['tuned_test_accuracy']:.3f} | |")
    if "share_of_conversations_more_likely" in sft_scores:
        print(f"| SFT | chat-sft | held-out conversations whose replies became more likely | — | "
              f"{sft_scores['share_of_conversations_more_likely']:.3f} | |")
    print(f"| DPO | chat-dpo | test preference accuracy | {dpo_scores['base_test_accuracy']:.3f} | "
          f"{dpo_scores['tuned_test_accuracy']:.3f} | {dpo['wall_time_s']:.0f} |")
    print(f"| DPO | chat-dpo | test reward margin | {dpo_scores['base_test_reward_margin']:.3f} | "
          f"{dpo_scores['tuned_test_reward_margin']:.3f} | |")


if __name__ == "__main__":
    main()
