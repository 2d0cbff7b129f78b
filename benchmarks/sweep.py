"""A gradwise sweep against plain Optuna code around a hand-written PyTorch loop.

Both run the same search: the same digits MLP recipe, the same space
(``optim.name: [sgd, adam]``, ``optim.lr: loguniform(1e-4, 1e-1)``), TPE with
the same seed, the median pruner with the same settings, the recipe's own
values as trial 0, and an SQLite study. The hand-written objective trains
from the same initial weights on the same shuffled batches, so when the two
loops agree bit for bit, TPE proposes the same values in both and the best
accuracies match. The two are alternated over several repeats so that
machine noise hits both alike; reported: median wall time, the ratio, the
best validation accuracy found, and whether every trial got the same values.

    .venv/bin/python benchmarks/sweep.py --trials 20 --repeats 2 --epochs 5 --hidden 32

What gradwise adds per trial (the overhead measured): a run directory with
config, metrics.jsonl and summary, fsynced best/last checkpoints, a final
evaluation on the validation and test splits, the trial's record in the
study, and at the end trials.md/json, trials.png and best.yaml.

``--storage postgresql`` measures instead what a PostgreSQL study costs per trial
against SQLite: it starts a throw-away server (scripts/pg_cluster.py, as the tests
do) and runs the same gradwise sweep on each, alternated, the PostgreSQL one with
its heartbeat and advisory lock as it runs across machines; then it times the
study's own calls of a trial alone (lock, ask, draws, a report and pruning check
per epoch, the result, tell), with no training, on each.

    .venv/bin/python benchmarks/sweep.py --storage postgresql --trials 20 --repeats 3 --epochs 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import optuna
import torch
import yaml

from gradwise.config import validate
from gradwise.data import load_dataset
from gradwise.experiments import sweep as gradwise_sweep_module
from gradwise.experiments.sweep import MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_EVALS, run_sweep
from gradwise.models import build_model
from gradwise.train.rng import seed_everything
from gradwise.train.setup import SAMPLER_SEED_OFFSET

SPACE = "optim.name: [sgd, adam]\noptim.lr: loguniform(1e-4, 1e-1)\n"


def recipe(epochs: int, batch: int, hidden: list[int]) -> dict:
    return {
        "description": "benchmark: digits MLP",
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": hidden},
        "optim": {"name": "adam", "lr": 1e-3, "no_decay_bias_norm": False},
        "batch": {"size": batch},
        "stop": {"epochs": epochs},
        "log": {"progress": False, "plots": False},
    }


def gradwise_sweep(
    raw: dict, workdir: Path, trials: int, seed: int, storage: str | None = None
) -> tuple[float, float, list[dict]]:
    recipe_file, space_file = workdir / "recipe.yaml", workdir / "space.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    space_file.write_text(SPACE)
    start = time.perf_counter()
    overrides = [f"out_dir={workdir}"]
    sweep_dir = run_sweep(recipe_file, space_file, overrides=overrides, trials=trials, seed=seed, storage=storage)
    elapsed = time.perf_counter() - start
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    rows = json.loads((sweep_dir / "trials.json").read_text())
    return elapsed, meta["best"]["value"], [{"params": r["params"], "outcome": r["outcome"]} for r in rows]


def plain_sweep(raw: dict, workdir: Path, trials: int, seed: int) -> tuple[float, float, list[dict]]:
    """What a careful user writes by hand with Optuna: data loaded once, a loop, report and prune per epoch."""
    cfg = validate(raw)
    start = time.perf_counter()
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed)
    x, y, n, batch = data.train.x, data.train.y, len(data.train.y), cfg.batch.size
    loss_fn = torch.nn.CrossEntropyLoss()

    def objective(trial: optuna.Trial) -> float:
        name = trial.suggest_categorical("optim.name", ["sgd", "adam"])
        lr = trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
        seed_everything(cfg.seed)  # the data splits use their own generators: the init matches gradwise's
        model = build_model(cfg.model, data.info)
        if name == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        best = -1.0
        for epoch in range(cfg.stop.epochs):
            # The permutation gradwise's sampler draws, so both loops see the same batches.
            entropy = np.random.SeedSequence([cfg.seed + SAMPLER_SEED_OFFSET, epoch]).generate_state(1)[0]
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(entropy)))
            model.train()
            for i in range(0, n, batch):
                idx = perm[i : i + batch]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                accuracy = (model(data.val.x).argmax(1) == data.val.y).float().mean().item()
            best = max(best, accuracy)
            trial.report(accuracy, epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best

    study = optuna.create_study(
        storage=f"sqlite:///{workdir / 'plain.db'}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_EVALS),
    )
    study.enqueue_trial({"optim.name": cfg.optim.name, "optim.lr": cfg.optim.lr})
    study.optimize(objective, n_trials=trials)
    elapsed = time.perf_counter() - start
    rows = [{"params": t.params, "outcome": t.state.name.lower()} for t in study.trials]
    return elapsed, study.best_value, rows


def load_pg_cluster() -> ModuleType:
    """scripts/pg_cluster.py (the tests' throw-away server helpers; scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "pg_cluster.py"
    spec = importlib.util.spec_from_file_location("pg_cluster", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pg_cluster"] = module
    spec.loader.exec_module(module)
    return module


def study_calls(url: str, workdir: Path, trials: int, epochs: int) -> float:
    """Seconds for ``trials`` trials' worth of the study calls gradwise makes, with no training in between."""
    sweep = gradwise_sweep_module
    storage = sweep._storage(url, sweep.HEARTBEAT_S)
    study = optuna.create_study(storage=storage, direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.pruner = optuna.pruners.MedianPruner(
        n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_EVALS
    )
    plan = sweep._Plan(workdir, url, study.study_name, {}, None, trials, "random", "median", 0, "val_accuracy", 1, 20)  # type: ignore[arg-type]
    start = time.perf_counter()
    for _ in range(trials):
        with sweep._study_lock(study, plan):
            if sweep._beats(study):
                sweep._reclaim_dead(study)
            sweep._taken(study.get_trials(deepcopy=False))
            trial = sweep._ask(study, plan, 0)
            trial.suggest_categorical("optim.name", ["sgd", "adam"])
            value = trial.suggest_float("optim.lr", 1e-4, 1e-1, log=True)
        with sweep.get_heartbeat_thread(trial._trial_id, study._storage):
            for epoch in range(epochs):
                trial.report(value * (epoch + 1), epoch + 1)
                trial.should_prune()
            trial.set_user_attr("result", {"outcome": "completed", "best_value": value, "steps": epochs})
            study.tell(trial, value * epochs)
    return time.perf_counter() - start


def storage_compare(raw: dict, args: argparse.Namespace) -> None:
    """The same gradwise sweep on SQLite and on a throw-away PostgreSQL, alternated; then the study calls alone."""
    pg = load_pg_cluster()
    times: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    calls: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, pg.Cluster(pg.ensure_bindir()) as cluster:
        for run in range(args.repeats + 1):  # run 0 warms up imports and caches
            for name in ("sqlite", "postgresql"):
                workdir = Path(tmp) / f"{name}-{run}"
                workdir.mkdir()
                url = None if name == "sqlite" else cluster.create_database(f"sweep{run}")
                elapsed, _, rows[name] = gradwise_sweep(raw, workdir, 2 if run == 0 else args.trials, args.seed, url)
                ops_url = (
                    f"sqlite:///{workdir / 'ops.db'}" if name == "sqlite" else cluster.create_database(f"ops{run}")
                )
                ops = study_calls(ops_url, workdir, args.trials, args.epochs)
                if run:
                    times[name].append(elapsed)
                    calls[name].append(ops)
    n = args.trials
    wall = {k: statistics.median(v) for k, v in times.items()}
    ops = {k: statistics.median(v) for k, v in calls.items()}
    same = [a["params"] == b["params"] for a, b in zip(rows["sqlite"], rows["postgresql"], strict=False)]
    print(
        f"digits MLP {args.hidden}, batch {args.batch}, {args.epochs} epochs a trial, {n} trials (TPE seed "
        f"{args.seed}, median pruner), {torch.get_num_threads()} threads, {args.repeats} alternated repeats; "
        f"PostgreSQL on 127.0.0.1 (fsync off), heartbeat {gradwise_sweep_module.HEARTBEAT_S} s"
    )
    print()
    print("| storage | sweep median wall s | all runs, s | per trial, ms | study calls alone, ms a trial |")
    print("|---|---|---|---|---|")
    for name in ("sqlite", "postgresql"):
        shown = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {wall[name]:.2f} | {shown} | {1000 * wall[name] / n:.1f} | {1000 * ops[name] / n:.2f} |")
    print()
    delta = 1000 * (wall["postgresql"] - wall["sqlite"]) / n
    print(f"sweep time ratio postgresql/sqlite: {wall['postgresql'] / wall['sqlite']:.3f} ({delta:+.1f} ms a trial)")
    print(f"study calls ratio postgresql/sqlite: {ops['postgresql'] / ops['sqlite']:.3f}")
    print(f"same values proposed in every trial: {all(same) and len(same) == n} ({sum(same)}/{len(same)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, nargs="+", default=[32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--storage",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="sqlite: gradwise against plain Optuna; postgresql: gradwise on PostgreSQL against SQLite",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = recipe(args.epochs, args.batch, args.hidden)
    if args.storage == "postgresql":
        storage_compare(raw, args)
        return
    times: dict[str, list[float]] = {"plain": [], "gradwise": []}
    bests: dict[str, float] = {}
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sweep in (("plain", plain_sweep), ("gradwise", gradwise_sweep)):  # warm-up: imports, caches
            (Path(tmp) / f"warm-{name}").mkdir()
            sweep(raw, Path(tmp) / f"warm-{name}", 2, args.seed)
        for repeat in range(args.repeats):
            for name, sweep in (("plain", plain_sweep), ("gradwise", gradwise_sweep)):
                workdir = Path(tmp) / f"{name}-{repeat}"
                workdir.mkdir()
                elapsed, best, rows[name] = sweep(raw, workdir, args.trials, args.seed)
                times[name].append(elapsed)
                bests[name] = best
    same = [a["params"] == b["params"] for a, b in zip(rows["plain"], rows["gradwise"], strict=False)]
    plain, ours = statistics.median(times["plain"]), statistics.median(times["gradwise"])
    pruned = {k: sum(r["outcome"] == "pruned" for r in v) for k, v in rows.items()}
    print(
        f"digits MLP {args.hidden}, batch {args.batch}, {args.epochs} epochs a trial, {args.trials} trials "
        f"(TPE seed {args.seed}, median pruner), {torch.get_num_threads()} threads, {args.repeats} alternated repeats"
    )
    print()
    print("| sweep | median wall s | all runs, s | best val_accuracy | pruned trials |")
    print("|---|---|---|---|---|")
    for name, label in (("plain", "plain Optuna + hand-written loop"), ("gradwise", "gradwise run_sweep")):
        shown = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {label} | {statistics.median(times[name]):.2f} | {shown} | {bests[name]:.4f} | {pruned[name]} |")
    print()
    print(f"time ratio gradwise/plain: {ours / plain:.3f} (overhead {100 * (ours / plain - 1):+.1f}%)")
    print(f"same values proposed in every trial: {all(same) and len(same) == args.trials} ({sum(same)}/{len(same)})")


if __name__ == "__main__":
    main()
