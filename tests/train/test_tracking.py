"""TensorBoard and MLflow trackers, read back with their own libraries."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gradwise.config import read_yaml, validate
from gradwise.errors import ConfigError
from gradwise.experiments.recipes import find_recipe
from gradwise.report.hooks import plotting_hooks
from gradwise.store.rundir import read_metrics
from gradwise.train.loop import fit
from gradwise.train.tracking import MLFLOW_RUN_ID_FILE, experiment_name, flatten_config, scalars

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def config(tmp_path: Path, **log):
    raw = read_yaml(find_recipe("digits-mlp"))
    raw.update(out_dir=str(tmp_path), name="digits-track")
    raw["model"]["hidden"] = [16]
    raw["stop"] = {"max_steps": 24}
    raw["eval"] = {"every_steps": 8}
    raw["schedule"] = {"name": "constant"}
    raw["log"] = {"progress": False, "plots": True, **log}
    return validate(raw)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    train, evals = read_metrics(run_dir)
    out: dict[str, list[tuple[int, float]]] = {}
    for record in train + evals:
        for tag, value in scalars(record).items():
            out.setdefault(tag, []).append((record["step"], value))
    return out


def assert_same_history(got: dict, want: dict) -> None:
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # every step exactly once, in order
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 in TB


def test_scalars_of_records_and_flattened_params():
    train = {"kind": "train", "step": 3, "epoch": 0.1, "loss": 0.5, "lr": 0.01, "batch_size": 32, "grad_norm": None}
    assert scalars(train) == {"train/loss": 0.5, "train/lr": 0.01, "train/batch_size": 32.0}
    evals = {"kind": "eval", "step": 3, "split": "val", "val_loss": 0.4, "val_accuracy": 0.9}
    assert scalars(evals) == {"eval/val_loss": 0.4, "eval/val_accuracy": 0.9}
    cfg = validate({"model": {"name": "mlp", "hidden": [8, 4]}, "optim": {"lr": 0.1}})
    params = flatten_config(cfg)
    assert params["model.hidden"] == "[8, 4]" and params["optim.lr"] == "0.1" and params["seed"] == "0"
    assert experiment_name(cfg, Path("runs/digits-mlp-20250101-120000-2")) == "digits-mlp"


@pytest.mark.slow
def test_tensorboard_and_mlflow_receive_the_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    summary = fit(config(tmp_path, tensorboard=True, mlflow="local"), run_dir, hooks=plotting_hooks(True))
    want = expected(run_dir)
    assert {"train/loss", "train/lr", "train/batch_size", "eval/val_accuracy", "eval/val_loss"} <= set(want)

    got = tensorboard_scalars(run_dir / "tensorboard")
    assert_same_history(got, want)
    assert got["final/test_accuracy"] == [(24, pytest.approx(summary["final"]["test_accuracy"]))]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlruns.db")
    run = client.get_run((run_dir / MLFLOW_RUN_ID_FILE).read_text().strip())
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "digits-track"
    assert run.data.params["optim.name"] == "adam" and run.data.params["model.hidden"] == "[16]"
    for tag, points in want.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert history == [(s, pytest.approx(v)) for s, v in points], tag
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(summary["final"]["test_accuracy"])
    assert run.data.tags["gradwise.status"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "plots"} <= artifacts
    assert {"plots/loss.png", "plots/lr.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    # artifacts live beside the database, not in the working directory
    assert (tmp_path / "mlartifacts").is_dir()


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_histories_without_duplicates(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = config(tmp_path, tensorboard=True, mlflow="local")
    steps = iter(range(1, 1000))
    first = fit(cfg, run_dir, stop_requested=lambda: next(steps) >= 13)
    assert first["status"] == "interrupted"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlruns.db")
    run_id = (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"

    fit(cfg, run_dir, resume=True)
    want = expected(run_dir)
    assert [s for s, _ in want["train/loss"]] == list(range(1, 25))
    assert_same_history(tensorboard_scalars(run_dir / "tensorboard"), want)
    assert (run_dir / MLFLOW_RUN_ID_FILE).read_text().strip() == run_id  # the same MLflow run continued
    assert client.get_run(run_id).info.status == "FINISHED"
    for tag, points in want.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))
        assert history == [(s, pytest.approx(v)) for s, v in points], tag


def test_an_unsupported_mlflow_uri_fails_before_training(tmp_path: Path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^log.mlflow: 'nosuch://x' cannot be used: ") as err:
        fit(config(tmp_path, mlflow="nosuch://x"), run_dir)
    assert "\n" not in str(err.value)
    assert not (run_dir / "metrics.jsonl").exists()  # no step was taken


def test_an_unreachable_mlflow_server_fails_fast(tmp_path: Path):
    with socket.socket() as sock:  # a port nothing listens on: bound, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^log.mlflow: tracking server http://127.0.0.1:{port} is unreachable"):
        fit(config(tmp_path, mlflow=f"http://127.0.0.1:{port}"), run_dir)
    assert not (run_dir / "metrics.jsonl").exists()
