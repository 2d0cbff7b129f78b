"""Every setting of every registered model and optimizer changes what is computed, or is refused.

A field that is accepted and then ignored is the bug this guards against (``model.path`` on a
GPT used to be). For each component the test takes every field of its own section, moves it
away from its default and checks that the built model (its parameter shapes or its output on a
fixed batch) or one optimizer step differs; the few fields whose effect is not on the numbers
(memory, speed, plumbing) are listed with the reason and the test that covers them.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

from gradwise.config import MODELS, OPTIMIZERS
from gradwise.data.types import DataInfo
from gradwise.models import build_model
from gradwise.optim import apply_decoupled_weight_decay, build_optimizer

# Fields whose effect is not on the numbers, and where that effect is tested instead.
NOT_NUMERIC = {
    "init_from": "weights from another run: tests/finetune/test_transfer.py",
    "compile": "torch.compile, same numbers: tests/train/test_compile.py",
    "gradient_checkpointing": "recomputes activations, same numbers (memory only): tests/models/test_gpt.py",
    "chunked_loss": "the loss from hidden states chunk by chunk, same numbers (memory only): "
    "tests/llm/test_chunked_loss_runs.py",
    "path": "the pretrained directory: tests/models/test_hf_encoder.py",
    "extra": "forwarded keyword arguments, checked against the class signature: tests/optim/test_optimizers.py",
    "sparse": "which optimizer takes sparse-gradient embeddings: tests/train/test_recsys_runs.py",
}
# Components whose building needs a pretrained directory (covered by their own tests).
SKIPPED_MODELS = {
    "hf_encoder": "loads the bundled MiniLM: tests/models/test_hf_encoder.py",
    "hf_causal_lm": "loads a model directory; dtype, attention and load_in_4bit: tests/llm/test_causal_lm.py",
}


# A table with one categorical column of 2000 categories read through an embedding (fastai's width
# rule gives min(embedding_max, 113) for it, so both embedding fields show).
_EMBEDDED = {"columns": [{"name": "city", "kind": "categorical", "encoding": "embedding",
                          "categories": [f"c{i}" for i in range(2000)]}]}  # fmt: skip


def _info(takes: tuple[str, ...], embedded: bool = False) -> DataInfo:
    if embedded:
        return DataInfo("classification", 64, None, 3, ["a", "b", "c"], [f"f{i}" for i in range(64)], "y", "test",
                        preprocessing=_EMBEDDED)  # fmt: skip
    if "tokens" in takes:
        return DataInfo("language_modeling", 16, None, 300, None, ["tokens"], "next", "test", vocab_size=300,
                        pad_token_id=0)  # fmt: skip
    if "interactions" in takes:
        bags = {"genre_ids": [0, 1, 2, 1], "genre_offsets": [0, 1, 2, 3, 4, 4], "n_genres": 3,
                "user_counts": [0, 1, 2, 3, 4], "item_counts": [0, 5, 1, 1, 2, 3]}
        return DataInfo("regression", 2, None, 1, None, ["user", "item"], "rating", "test",
                        interactions={"n_users": 5, "n_items": 6, "global_mean": 3.5, **bags})  # fmt: skip
    return DataInfo("classification", 64, (1, 8, 8), 3, ["a", "b", "c"], [f"f{i}" for i in range(64)], "y", "test")


def _batch(takes: tuple[str, ...], embedded: bool = False) -> Any:
    generator = torch.Generator().manual_seed(0)
    if embedded:
        return {"features": torch.randn(4, 64, generator=generator),
                "categories": torch.randint(0, 2001, (4, 1), generator=generator)}  # fmt: skip
    if "tokens" in takes:
        return torch.randint(1, 300, (4, 16), generator=generator)
    if "interactions" in takes:
        return {"user": torch.tensor([1, 2, 3, 4]), "item": torch.tensor([1, 2, 3, 5])}
    return torch.randn(4, 64, generator=generator)


def _other_value(annotation: Any, default: Any) -> Any:
    """A valid value different from ``default`` for a field of this type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        members = [a for a in args if a is not type(None)]
        if default is None and members:
            member = members[0]
            if get_origin(member) is list:
                return [0]
            return _other_value(member, None)
        return _other_value(members[0], default)
    if origin is Literal:
        return next(a for a in args if a != default)
    if annotation is bool:
        return not default
    if origin is typing.Annotated:
        return _other_value(args[0], default)
    if annotation is int:
        return (default or 1) * 2
    if annotation is float:
        if default in (0.0, None):
            return 0.5
        return default * 1e4 if default < 1e-3 else default / 2  # a tiny eps must move far to show in fp32
    if origin is list:
        return [*default[:-1], default[-1] + 4] if default else [4]
    if origin is tuple:
        return tuple(v / 2 for v in default)
    if origin is dict:
        return {"*": 0.5}
    raise AssertionError(f"no alternative value for {annotation}")


def _fields(section: type) -> list[tuple[str, Any]]:
    return [(k, f) for k, f in section.model_fields.items() if k != "name" and k not in NOT_NUMERIC]


def _model_cases() -> list[Any]:
    cases = []
    for component in MODELS:
        if component.name in SKIPPED_MODELS:
            continue
        cases += [
            pytest.param(component.name, key, id=f"{component.name}.{key}") for key, _ in _fields(component.section)
        ]
    return cases


def _built(name: str, embedded: bool = False, **fields: Any) -> tuple[torch.nn.Module, Any]:
    section = MODELS.get(name).section
    cfg = section(**fields)
    torch.manual_seed(0)
    model = build_model(cfg, _info(section.takes, embedded))
    return model, section.takes


@pytest.mark.parametrize(("name", "key"), _model_cases())
def test_every_model_field_changes_the_model(name: str, key: str) -> None:
    section = MODELS.get(name).section
    field = section.model_fields[key]
    value = _other_value(field.annotation, field.default)
    if key == "keep_layers":
        pytest.skip("hf_encoder only")
    if name == "gpt" and key == "n_head":
        value = 8  # n_embd 128 must stay divisible
    embedded = key.startswith("embedding_")  # the MLP's fields for a table's categorical embeddings
    base, takes = _built(name, embedded)
    changed, _ = _built(name, embedded, **{key: value})
    base_shapes = {k: v.shape for k, v in base.state_dict().items()}
    new_shapes = {k: v.shape for k, v in changed.state_dict().items()}
    if base_shapes != new_shapes:
        return
    batch = _batch(takes, embedded)
    base.train(), changed.train()
    torch.manual_seed(1)
    out_base = base(batch)
    torch.manual_seed(1)
    out_new = changed(batch)
    logits = lambda out: out.logits if hasattr(out, "logits") else out  # noqa: E731
    if not torch.allclose(logits(out_base), logits(out_new)):
        return
    # A field of the model's own per-batch penalty (mf.l2) changes the loss, not the output.
    penalty = getattr(base, "batch_penalty_sum", None)
    assert penalty is not None, f"model.{key}={value!r} changed nothing on {name}"
    before, after = penalty(batch), changed.batch_penalty_sum(batch)
    assert after is not None and (before is None or not torch.allclose(before, after)), f"model.{key} on {name}"


def _optim_cases() -> list[Any]:
    return [pytest.param(c.name, key, id=f"{c.name}.{key}") for c in OPTIMIZERS for key, _ in _fields(c.section)]


def _one_step(name: str, weight_decay: float = 0.0, **fields: Any) -> dict[str, torch.Tensor]:
    section = OPTIMIZERS.get(name).section
    cfg = section(**fields)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2))  # fmt: skip
    optimizer = build_optimizer(model, cfg, weight_decay)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    for _ in range(8):  # past RAdam's first steps (no adaptive term before step 6): moments and eps must matter
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        apply_decoupled_weight_decay(optimizer)  # the loop's gradient chain does this for optimizers without their own
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "key"), _optim_cases())
def test_every_optimizer_field_changes_the_update(name: str, key: str) -> None:
    section = OPTIMIZERS.get(name).section
    field = section.model_fields[key]
    value = _other_value(field.annotation, field.default)
    if key == "momentum_form":
        value = "ema"
    # no_decay_bias_norm only decides where weight decay applies: compare with decay on.
    decay = 0.1 if key == "no_decay_bias_norm" else 0.0
    base = _one_step(name, decay)
    changed = _one_step(name, decay, **{key: value})
    assert any(not torch.equal(base[k], changed[k]) for k in base), f"optim.{key}={value!r} changed nothing on {name}"
