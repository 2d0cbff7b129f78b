"""``gradwise generate --chat``: the run's chat template, seeded sampling, top-p, stopping at EOS, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from tiny import make_model_dir
from torch import nn

from gradwise.cli import main
from gradwise.compress.runs import load_run_model
from gradwise.generate import Sampling, generate, generate_chat

SFT = {
    "seed": 0,
    "data": {"name": "chat", "max_length": 64, "limit": 64},
    "task": {"kind": "language_modeling"},
    "optim": {"name": "adamw", "lr": 0.003},
    "batch": {"size": 16},
    "stop": {"epochs": None, "max_steps": 4},
    "eval": {"every_steps": 2, "batch_size": 32},
    "log": {"progress": False, "plots": False},
}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    base = make_model_dir("llama", root / "tiny-llama")
    recipe = root / "sft.yaml"
    recipe.write_text(yaml.safe_dump({**SFT, "model": {"name": "hf_causal_lm", "path": str(base)}}))
    assert main(["train", str(recipe), f"out_dir={root / 'runs'}", "name=sft"]) == 0
    return root / "runs" / "sft"


def chat(capsys, run: Path, *extra: str) -> tuple[int, str, str]:
    return run_main(capsys, "generate", str(run), "--chat", "Hello, how are you?", "--max-new-tokens", "24", *extra)


def test_a_reply_is_text_fixed_by_the_seed(sft: Path, capsys):
    code, first, err = chat(capsys, sft, "--seed", "1", "--temperature", "1.0", "--top-p", "0.95")
    assert code == 0, err
    assert first.strip()
    assert chat(capsys, sft, "--seed", "1", "--temperature", "1.0", "--top-p", "0.95")[1] == first
    assert chat(capsys, sft, "--seed", "2", "--temperature", "1.0", "--top-p", "0.95")[1] != first
    assert "<|assistant|>" not in first and "<|endoftext|>" not in first  # the reply alone
    code, with_system, _ = chat(capsys, sft, "--seed", "1", "--system", "Be brief.", "--temperature", "0")
    assert code == 0 and with_system.strip()


def greedy_without_cache(model: nn.Module, ids: list[int], eos: int, steps: int) -> list[int]:
    """The reference: the whole context through gradwise's own forward at every step, argmax, stop at EOS."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return new


def test_greedy_reply_follows_the_run_template_and_equals_an_uncached_loop(sft: Path):
    from transformers import AutoTokenizer

    template = json.loads((sft / "data_info.json").read_text())["chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(str(sft / "tokenizer"))
    prompt = tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|system|>\nBe brief.") and prompt.endswith("<|assistant|>\n")
    model = load_run_model(sft, with_data=False)[2]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(greedy_without_cache(model, ids, tokenizer.eos_token_id, 30), skip_special_tokens=True)
    reply = generate_chat(model, sft / "tokenizer", MESSAGES, template, Sampling(30, temperature=0.0))
    assert reply == expected
    # A nucleus too small for a second token is greedy, whatever the seed.
    for seed in (0, 1, 2):
        nucleus = Sampling(30, temperature=1.0, top_k=None, top_p=1e-6, seed=seed)
        assert generate_chat(model, sft / "tokenizer", MESSAGES, template, nucleus) == expected


class ScriptedBody(nn.Module):
    """A library-like causal LM: fixed next-token logits by the last token, a ``cache`` counting the steps."""

    def __init__(self, logits_after: dict[int, torch.Tensor], vocab: int) -> None:
        super().__init__()
        self.logits_after, self.vocab = logits_after, vocab
        self.weight = nn.Parameter(torch.zeros(()))
        self.lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor, use_cache: bool = True, cache: int | None = None) -> SimpleNamespace:
        self.lengths.append(int(input_ids.shape[1]))
        logits = torch.full((1, input_ids.shape[1], self.vocab), -1e4)
        logits[0, -1] = self.logits_after.get(int(input_ids[0, -1]), self.logits_after[-1])
        return SimpleNamespace(logits=logits, cache=(cache or 0) + 1)


class Wrapped(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body


def one_hot(vocab: int, token: int) -> torch.Tensor:
    logits = torch.full((vocab,), -1e4)
    logits[token] = 0.0
    return logits


def test_sampling_stops_at_eos_feeds_one_token_a_step_and_top_p_keeps_the_nucleus(sft: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sft / "tokenizer"))
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    a, b, c = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "c"))
    template = json.loads((sft / "data_info.json").read_text())["chat_template"]
    body = ScriptedBody({-1: one_hot(vocab, a), a: one_hot(vocab, b), b: one_hot(vocab, eos)}, vocab)
    reply = generate_chat(Wrapped(body), sft / "tokenizer", MESSAGES, template, Sampling(50, seed=3))
    assert reply == "ab"  # EOS ends it and is not part of the reply
    assert body.lengths[1:] == [1, 1]  # after the prompt, one new token per step (the cache holds the rest)

    probs = torch.full((vocab,), 1e-9)
    probs[a], probs[b], probs[c] = 0.5, 0.3, 0.2
    fixed = ScriptedBody({-1: probs.log()}, vocab)

    def drawn(top_p: float) -> set[str]:
        settings = [Sampling(1, temperature=1.0, top_k=None, top_p=top_p, seed=s) for s in range(40)]
        return {generate_chat(Wrapped(fixed), sft / "tokenizer", MESSAGES, template, x) for x in settings}

    assert drawn(0.4) == {"a"}
    assert drawn(0.75) == {"a", "b"}
    assert drawn(1.0) == {"a", "b", "c"}


def test_top_p_in_the_plain_prompt_sampler(sft: Path):
    """gradwise's own GPT loop (``generate``) takes top-p too: a tiny nucleus is greedy."""
    model = load_run_model(sft, with_data=False)[2]
    greedy = generate(model, sft / "tokenizer", "Hello", 12, temperature=0.0)
    for seed in (0, 1):
        assert generate(model, sft / "tokenizer", "Hello", 12, temperature=1.0, top_p=1e-6, seed=seed) == greedy
    with pytest.raises(ValueError, match="top_p"):
        generate(model, sft / "tokenizer", "Hello", 12, top_p=0.0)


def test_a_prompt_on_a_chat_run_continues_it(sft: Path, capsys):
    code, out, err = run_main(capsys, "generate", str(sft), "--prompt", "Hello", "--max-new-tokens", "8")
    assert code == 0, err
    assert out.startswith("Hello")
    assert run_main(capsys, "generate", str(sft), "--prompt", "Hello", "--max-new-tokens", "8")[1] == out


def test_bad_runs_and_arguments_are_one_line_errors(sft: Path, capsys, tmp_path: Path):
    def refused(*argv: str) -> str:
        code, _, err = run_main(capsys, "generate", *argv)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "not a run directory" in refused(str(tmp_path / "nothing"), "--chat", "hi")
    assert "--system goes with --chat" in refused(str(sft), "--system", "x")
    assert "--top-p" in refused(str(sft), "--chat", "hi", "--top-p", "1.5")

    classifier = tmp_path / "runs" / "c"
    quick = ["data.limit=200", "stop.epochs=1", "schedule.step_size=2"]
    assert main(["train", "digits-mlp", f"out_dir={tmp_path / 'runs'}", "name=c", *quick]) == 0
    capsys.readouterr()
    assert "is a classification run, not a language model" in refused(str(classifier), "--chat", "hi")

    no_template = tmp_path / "no-template"
    shutil.copytree(sft, no_template, symlinks=True)
    info = json.loads((no_template / "data_info.json").read_text())
    (no_template / "data_info.json").write_text(json.dumps({**info, "chat_template": None}))
    assert "not trained on conversations" in refused(str(no_template), "--chat", "hi")
