"""Knowledge distillation: the blended loss, the teacher's targets, fit-through runs and the quality bar."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.compress.distill import DistillationTask, HeadInputs, attach_teacher, teacher_outputs
from gradwise.compress.runs import load_run_model
from gradwise.config import validate
from gradwise.data.types import Split
from gradwise.errors import CheckpointError, ConfigError
from gradwise.models import MLP
from gradwise.store.checkpoint import load_model_state
from gradwise.tasks import ClassificationTask
from gradwise.train.batching import gather
from gradwise.train.loop import fit
from gradwise.train.setup import build_model_and_data, build_run


def config(**sections):
    base = {
        "data": {"name": "digits", "limit": 400},
        "model": {"name": "mlp", "hidden": [32]},
        "optim": {"name": "adam", "lr": 0.01},
        "batch": {"size": 32},
        "stop": {"epochs": 2},
        "log": {"progress": False, "plots": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return validate(base)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits MLP with dropout (so a teacher left in training mode would give random logits)."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    fit(config(model={"name": "mlp", "hidden": [32], "dropout": 0.5}, stop={"epochs": 3}), run)
    return run


def read_train_losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "train"]


# --------------------------------------------------------------------------- the loss


def test_loss_matches_a_hand_computation():
    s, t, label, alpha, temp = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 1, 0.3, 2.0

    def softmax(v: list[float]) -> list[float]:
        z = sum(math.exp(x) for x in v)
        return [math.exp(x) / z for x in v]

    ce = -math.log(softmax(s)[label])
    p_t, p_s = softmax([x / temp for x in t]), softmax([x / temp for x in s])
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_t, p_s, strict=True))
    expected = (1 - alpha) * ce + alpha * temp**2 * kl
    assert expected == pytest.approx(0.559398156736685, rel=1e-12)  # 0.7 · 0.464369 + 0.3 · 4 · 0.195283

    task = DistillationTask(ClassificationTask(3), 3, alpha, temp)
    targets = torch.tensor([[float(label), *t]], dtype=torch.float64)
    outputs = torch.tensor([s], dtype=torch.float64)
    assert float(task.loss_sum(outputs, targets)) == pytest.approx(expected, rel=1e-12)
    # Two copies of the row: the sum doubles, the mean does not.
    assert float(task.loss_sum(outputs.repeat(2, 1), targets.repeat(2, 1))) == pytest.approx(2 * expected, rel=1e-12)
    assert float(task.loss(outputs.repeat(2, 1), targets.repeat(2, 1))) == pytest.approx(expected, rel=1e-12)
    assert task.count(targets.repeat(2, 1)) == 2


def test_loss_matches_torch_reference_functions():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=gen, dtype=torch.float64), 3 * torch.randn(6, 4, generator=gen).double()
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    alpha, temp = 0.6, 3.0
    task = DistillationTask(ClassificationTask(4), 4, alpha, temp)
    targets = torch.cat([labels.double().unsqueeze(1), t], dim=1)
    # kl_div with probability targets and batchmean: a different call path from the task's log-target sum.
    reference = (1 - alpha) * F.cross_entropy(s, labels) + alpha * temp**2 * F.kl_div(
        F.log_softmax(s / temp, dim=1), F.softmax(t / temp, dim=1), reduction="batchmean"
    )
    torch.testing.assert_close(task.loss(s, targets), reference, rtol=1e-12, atol=1e-12)


def test_alpha_zero_is_the_base_task_bit_for_bit():
    base = ClassificationTask(4, label_smoothing=0.1)
    task = DistillationTask(base, 4, alpha=0.0, temperature=4.0)
    s = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    targets = torch.cat([labels.float().unsqueeze(1), torch.randn(5, 4)], dim=1)
    ours = task.loss_sum(s, targets)
    (grad_ours,) = torch.autograd.grad(ours, s)
    theirs = base.loss_sum(s, labels)
    (grad_theirs,) = torch.autograd.grad(theirs, s)
    assert torch.equal(ours, theirs) and torch.equal(grad_ours, grad_theirs)


def test_label_smoothing_applies_to_the_hard_term():
    s, t = torch.tensor([[0.2, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, -1.0]])
    targets = torch.cat([torch.tensor([[0.0]]), t], dim=1)
    task = DistillationTask(ClassificationTask(3, label_smoothing=0.3), 3, alpha=0.5, temperature=1.0)
    # Smoothed CE by hand: (1 − ε)·(−log p₀) + ε · mean_k(−log p_k).
    log_p = torch.log_softmax(s[0], dim=0)
    smoothed = 0.7 * -log_p[0] + 0.3 * -log_p.mean()
    kl = (torch.softmax(t[0], 0) * (torch.log_softmax(t[0], 0) - log_p)).sum()
    torch.testing.assert_close(task.loss_sum(s, targets), 0.5 * smoothed + 0.5 * kl)


def test_plain_labels_behave_exactly_like_the_base_task():
    base = ClassificationTask(3, label_smoothing=0.2)
    task = DistillationTask(base, 3, alpha=0.7, temperature=4.0)
    s, labels = torch.randn(4, 3), torch.tensor([2, 0, 1, 1])
    assert torch.equal(task.loss_sum(s, labels), base.loss_sum(s, labels))
    assert torch.equal(task.loss(s, labels), base.loss(s, labels))
    assert task.count(labels) == base.count(labels) == 4
    assert (task.kind, task.loss_name, task.default_monitor) == (base.kind, base.loss_name, base.default_monitor)
    meter = task.new_meter()
    meter.update(s, labels)
    reference = base.new_meter()
    reference.update(s, labels)
    assert meter.compute() == reference.compute()


@pytest.mark.parametrize("temp", [1.0, 2.5, 6.0])
def test_soft_term_gradient_is_t_times_the_softmax_difference(temp: float):
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    targets = torch.cat([torch.zeros(3, 1, dtype=torch.float64), t], dim=1)
    task = DistillationTask(ClassificationTask(5), 5, alpha=1.0, temperature=temp)  # the soft term alone
    (grad,) = torch.autograd.grad(task.loss_sum(s, targets), s)
    # d/ds [T²·KL(softmax(t/T) ‖ softmax(s/T))] = T·(softmax(s/T) − softmax(t/T)), row by row.
    expected = temp * (torch.softmax(s.detach() / temp, dim=1) - torch.softmax(t / temp, dim=1))
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_feature_term_is_the_mean_squared_error_of_the_head_inputs():
    torch.manual_seed(0)
    student = MLP(6, [4], 3)
    x = torch.randn(5, 6)
    teacher_logits, teacher_features = torch.randn(5, 3), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    targets = torch.cat([labels.float().unsqueeze(1), teacher_logits, teacher_features], dim=1)
    weight, alpha, temp = 0.25, 0.4, 2.0
    task = DistillationTask(ClassificationTask(3), 3, alpha, temp, weight, HeadInputs(student.head))
    outputs = student(x)
    plain = DistillationTask(ClassificationTask(3), 3, alpha, temp).loss_sum(outputs, targets[:, :4])
    hidden = student.body(x)  # what the head reads
    expected = plain + weight * ((hidden - teacher_features) ** 2).mean(dim=1).sum()
    torch.testing.assert_close(task.loss_sum(outputs, targets), expected)
    with pytest.raises(RuntimeError, match="head features do not belong"):
        task.loss_sum(outputs[:2], targets[:2])  # the last forward had 5 rows


# --------------------------------------------------------------------------- the teacher


def test_teacher_runs_in_eval_mode_without_gradients():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    head = teacher[3]
    split = Split(x=torch.randn(10, 6), y=torch.zeros(10, dtype=torch.int64))
    logits, features = teacher_outputs(teacher, split, 4, torch.device("cpu"), "fp32", head)
    again, _ = teacher_outputs(teacher.train(), split, 4, torch.device("cpu"), "fp32")
    assert not teacher.training
    assert torch.equal(logits, again)  # dropout off: deterministic
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher.eval()(split.x))
        torch.testing.assert_close(features, teacher[:3](split.x))
    assert not logits.requires_grad and not features.requires_grad
    assert all(p.grad is None for p in teacher.parameters())
    assert not head._forward_pre_hooks  # the feature hook is removed again


def test_attach_teacher_appends_the_teachers_logits(teacher_dir: Path):
    cfg = config(distill={"teacher": str(teacher_dir), "alpha": 0.5, "temperature": 3.0})
    data, model, task, device = build_model_and_data(cfg, training=True)
    rng = torch.get_rng_state()
    distilled, widened = attach_teacher(cfg, task, data, model, device)
    assert torch.equal(torch.get_rng_state(), rng)  # building the teacher drew no random numbers of ours
    assert isinstance(distilled, DistillationTask) and distilled.base is task
    assert (distilled.alpha, distilled.temperature, distilled.n_classes) == (0.5, 3.0, 10)
    y = widened.train.y
    assert y.dtype == torch.float32 and y.shape == (len(data.train), 11)
    assert torch.equal(y[:, 0].long(), data.train.y)
    _, _, teacher, _, _ = load_run_model(teacher_dir, "best", with_data=False)
    with torch.no_grad():
        torch.testing.assert_close(y[:, 1:], teacher.eval()(data.train.x), rtol=0, atol=1e-6)
    assert widened.val is data.val and widened.test is data.test and widened.info is data.info
    assert torch.equal(widened.train.x, data.train.x)


def test_inputs_are_rescaled_to_the_teachers_standardization(teacher_dir: Path):
    # 300 rows standardize with other statistics than the teacher's 400.
    cfg = config(data={"limit": 300}, distill={"teacher": str(teacher_dir)})
    data, model, task, device = build_model_and_data(cfg, training=True)
    _, widened = attach_teacher(cfg, task, data, model, device)
    info = json.loads((teacher_dir / "data_info.json").read_text())
    assert info["feature_mean"] != data.info.feature_mean
    # Digits pixels are integers 0..16: undoing the student's scaling and rounding recovers them exactly.
    mean_s, std_s = torch.tensor(data.info.feature_mean), torch.tensor(data.info.feature_std)
    pixels = (data.train.x.double() * std_s + mean_s).round()
    teacher_x = ((pixels - torch.tensor(info["feature_mean"])) / torch.tensor(info["feature_std"])).float()
    _, _, teacher, _, _ = load_run_model(teacher_dir, "best", with_data=False)
    with torch.no_grad():
        torch.testing.assert_close(widened.train.y[:, 1:], teacher(teacher_x), rtol=0, atol=1e-4)
        assert (widened.train.y[:, 1:] - teacher(data.train.x)).abs().max() > 0.1


def test_a_teacher_for_other_classes_is_a_config_error(teacher_dir: Path):
    cfg = config(data={"name": "wine", "limit": None}, distill={"teacher": str(teacher_dir)})
    data, model, task, device = build_model_and_data(cfg, training=True)
    with pytest.raises(ConfigError, match=r"^distill\.teacher: .* predicts 10 classes but this run has 3;") as info:
        attach_teacher(cfg, task, data, model, device)
    assert "\n" not in str(info.value)
    cfg = config(distill={"teacher": str(teacher_dir)})
    data, model, task, device = build_model_and_data(cfg, training=True)
    renamed = dataclasses.replace(data, info=dataclasses.replace(data.info, class_names=[*"abcdefghij"]))
    with pytest.raises(ConfigError, match=r"has classes \[0, 1, 2, 3, 4, 5, …\] but this run has \[a, b, c"):
        attach_teacher(cfg, task, renamed, model, device)


def test_other_inputs_or_feature_widths_are_config_errors(teacher_dir: Path):
    cfg = config(data={"features": ["pixel_0_2", "pixel_0_3"]}, distill={"teacher": str(teacher_dir)})
    data, model, task, device = build_model_and_data(cfg, training=True)
    with pytest.raises(ConfigError, match="reads 64 features but this run's data has 2"):
        attach_teacher(cfg, task, data, model, device)
    cfg = config(model={"hidden": [16]}, distill={"teacher": str(teacher_dir), "feature_weight": 1.0})
    data, model, task, device = build_model_and_data(cfg, training=True)
    with pytest.raises(ConfigError, match=r"feature_weight: the student.s head reads 16 .* teacher.s reads 32"):
        attach_teacher(cfg, task, data, model, device)


def test_a_missing_teacher_is_a_one_line_checkpoint_error(tmp_path: Path):
    cfg = config(distill={"teacher": str(tmp_path / "no-such-run")})
    with pytest.raises(CheckpointError, match=r"^distill\.teacher: .*no-such-run: not a run directory") as info:
        fit(cfg, tmp_path / "student")
    assert "\n" not in str(info.value)
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("data: {name: digits}\n")
    with pytest.raises(CheckpointError, match=r"^distill\.teacher: .*no 'best' checkpoint"):
        fit(config(distill={"teacher": str(run)}), tmp_path / "student2")


# --------------------------------------------------------------------------- through the training loop


def test_alpha_zero_run_equals_the_plain_run_bit_for_bit(tmp_path: Path, teacher_dir: Path):
    # Dropout in the student: loading the teacher must not shift the random stream either.
    common = {"model": {"name": "mlp", "hidden": [32], "dropout": 0.2}}
    fit(config(**common), tmp_path / "plain")
    fit(config(**common, distill={"teacher": str(teacher_dir), "alpha": 0.0}), tmp_path / "distilled")
    assert read_train_losses(tmp_path / "plain") == read_train_losses(tmp_path / "distilled")
    plain = load_model_state(tmp_path / "plain" / "checkpoints" / "last")
    distilled = load_model_state(tmp_path / "distilled" / "checkpoints" / "last")
    assert all(torch.equal(plain[k], distilled[k]) for k in plain)


def test_the_loop_trains_on_the_distillation_loss(tmp_path: Path, teacher_dir: Path):
    cfg = config(
        precision="fp64",
        distill={"teacher": str(teacher_dir), "alpha": 0.8, "temperature": 2.0, "feature_weight": 0.5},
        stop={"max_steps": 3, "epochs": None},
    )
    parts = build_run(cfg)
    assert isinstance(parts.task, DistillationTask) and parts.data.train.y.shape[1] == 1 + 10 + 32
    indices, _ = parts.sampler.take(32)
    x, y = parts.data.train.x.double(), parts.data.train.y.double()
    with torch.no_grad():
        first = float(parts.task.loss(parts.model(x[indices]), y[indices]))
        plain = float(parts.task.base.loss(parts.model(x[indices]), y[indices, 0].long()))
    summary = fit(cfg, tmp_path / "run")
    assert read_train_losses(tmp_path / "run")[0] == pytest.approx(first, rel=1e-12)
    assert abs(first - plain) > 0.01  # the soft and feature terms are really in it
    assert set(summary["final"]) >= {"val_accuracy", "test_accuracy", "val_loss"}  # metrics of the base task


def test_a_distilled_run_resumes_bit_for_bit(tmp_path: Path, teacher_dir: Path):
    cfg = config(
        model={"name": "mlp", "hidden": [32], "dropout": 0.2},
        distill={"teacher": str(teacher_dir), "feature_weight": 0.1},
        eval={"every_steps": 5},
    )
    fit(cfg, tmp_path / "whole")
    calls = {"n": 0}

    def stop_at_step_7() -> bool:
        calls["n"] += 1
        return calls["n"] == 7

    assert fit(cfg, tmp_path / "split", stop_requested=stop_at_step_7)["status"] == "interrupted"
    fit(cfg, tmp_path / "split", resume=True)
    assert read_train_losses(tmp_path / "whole") == read_train_losses(tmp_path / "split")
    a = load_model_state(tmp_path / "whole" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "split" / "checkpoints" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer, 16-wide BERT with MiniLM's tokenizer, as save_pretrained writes it."""
    from transformers import BertConfig, BertModel

    from gradwise.models.hf_encoder import bundled_minilm_dir

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_minilm_dir() / name, directory / name)
    return directory


def test_a_text_teacher_distills_into_a_student_made_of_its_layers(tmp_path: Path, tiny_bert_dir: Path):
    def text(**sections) -> dict:
        return validate(
            {
                "data": {"name": "topics", "limit": 120, "max_length": 24},
                "model": {"name": "hf_encoder", "path": str(tiny_bert_dir), **sections.pop("model", {})},
                "optim": {"name": "adamw", "lr": 1e-3},
                "batch": {"size": 16},
                "stop": {"epochs": None, "max_steps": 2},
                "log": {"progress": False, "plots": False},
                **sections,
            }
        )

    fit(text(), tmp_path / "teacher")
    cfg = text(
        model={"keep_layers": [0, 2]},
        distill={"teacher": str(tmp_path / "teacher"), "feature_weight": 0.5},
        precision="fp64",
    )
    parts = build_run(cfg)
    assert len(parts.model.blocks()) == 2
    train = parts.data.train
    n_classes = parts.data.info.n_outputs
    assert train.y.shape == (len(train), 1 + n_classes + 16) and train.lengths is not None
    _, _, teacher, _, _ = load_run_model(tmp_path / "teacher", with_data=False)
    rows = torch.arange(5)
    with torch.no_grad():
        torch.testing.assert_close(train.y[rows, 1 : 1 + n_classes], teacher(gather(train.x, train.lengths, rows)))
    summary = fit(cfg, tmp_path / "student")
    assert summary["steps"] == 2 and "test_accuracy" in summary["final"]
    _, _, student, _, _ = load_run_model(tmp_path / "student", with_data=False)  # rebuilds with 2 layers, strictly
    assert len(student.blocks()) == 2 and student.body.config.num_hidden_layers == 2


# --------------------------------------------------------------------------- the quality bar

QUALITY_SEEDS = (0, 1, 2)


def test_distillation_closes_most_of_the_gap_to_the_teacher(tmp_path: Path):
    """A 32-unit MLP that sees 10% of digits learns far more from a big MLP's soft targets than from labels.

    Every run of a seed shares the same test split (it depends only on the seed and
    test_fraction); the teacher trains on 60% of the rows, the students on 10% (the
    rest of their rows is validation). Hinton et al. 2015 show soft targets let a
    model generalize from a small transfer set; here the gap closed on test accuracy,
    (distilled − alone) / (teacher − alone), averages about 0.64 over seeds 0–7 (min 0.49).
    """

    def run(name: str, seed: int, model: dict, data: dict, **extra) -> float:
        raw = {
            "seed": seed,
            "data": {"name": "digits", "test_fraction": 0.3, **data},
            "model": model,
            "optim": {"name": "adam", "lr": extra.pop("lr")},
            "batch": {"size": 32},
            "stop": {"epochs": extra.pop("epochs")},
            "checkpoint": {"min_interval_s": 1e9},
            "log": {"progress": False, "plots": False},
            **extra,
        }
        return fit(validate(raw), tmp_path / name)["final"]["test_accuracy"]

    few = {"val_fraction": 0.6}  # 10% of the rows to train on
    student = {"name": "mlp", "hidden": [32]}
    closed = []
    for seed in QUALITY_SEEDS:
        big = {"name": "mlp", "hidden": [256, 256], "dropout": 0.3}
        teacher = run(f"teacher{seed}", seed, big, {"val_fraction": 0.1}, lr=0.001, epochs=40)
        alone = run(f"alone{seed}", seed, student, few, lr=0.01, epochs=60)
        distill = {"teacher": str(tmp_path / f"teacher{seed}"), "alpha": 0.9, "temperature": 4.0}
        distilled = run(f"distilled{seed}", seed, student, few, lr=0.01, epochs=60, distill=distill)
        print(f"seed {seed}: teacher {teacher:.4f}  alone {alone:.4f}  distilled {distilled:.4f}")
        assert teacher > alone + 0.02  # a gap worth closing
        assert distilled > alone
        closed.append((distilled - alone) / (teacher - alone))
    assert sum(closed) / len(closed) >= 0.5, closed
