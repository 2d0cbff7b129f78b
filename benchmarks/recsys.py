"""Recommenders: gradwise's loop against a plain PyTorch loop, dense against sparse embeddings.

For biased MF (rating regression, random split) and the two-tower model (BPR ranking,
leave-last-out), each of {dense, sparse embeddings} × {plain loop, gradwise} trains the same
model from the same initial weights on the same batches (the sampler's permutation) for the
same epochs, evaluating on validation once per epoch. Every measurement runs in a fresh
process, so peak resident memory (ru_maxrss) is its own; repeats alternate so machine noise
hits all alike. Reports examples/s, peak RSS, the gradwise/plain time ratio and the largest
weight difference between the two loops.

    .venv/bin/python benchmarks/recsys.py --repeats 3 --epochs 3

The plain loop is what a careful user writes: index the id tensors, forward, mean loss,
backward, step (Adam on dense tables; SparseAdam on sparse tables plus Adam on the rest, as
gradwise's optim.sparse does); gradwise also logs every step and writes its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = {
    "mf": {"data": {"name": "movielens", "split": "random"}, "model": {"name": "mf", "dim": 32}},
    "two_tower": {
        "data": {"name": "movielens", "split": "leave_last_out"},
        "task": {"kind": "ranking"},
        "model": {"name": "two_tower", "dim": 32, "hidden": []},
    },
}


def make_config(model: str, sparse: bool, epochs: int, batch: int):
    from gradwise.config import validate

    spec = MODELS[model]
    raw = {
        "seed": 0,
        **spec,
        "model": {**spec["model"], "sparse": sparse},
        "optim": {"name": "adam", "lr": 2e-3, "no_decay_bias_norm": False, "extra": {"fused": False}},
        "batch": {"size": batch},
        "stop": {"epochs": epochs, "restore_best": False},
        "eval": {"batch_size": 8192},
        "device": "cpu",
        "log": {"progress": False, "plots": False},
    }
    if model == "mf":
        raw["stop"]["monitor"] = "val_rmse"
    return validate(raw)


def plain_loop(cfg) -> tuple[float, int, dict[str, torch.Tensor]]:
    """Same init, same batch order, one validation pass per epoch, the model's own loss."""
    from gradwise.data import load_dataset
    from gradwise.data.batches import take
    from gradwise.models import build_model
    from gradwise.optim.partitioned import sparse_gradient_parameters
    from gradwise.tasks.ranking import bpr_loss_sum
    from gradwise.train.rng import seed_everything
    from gradwise.train.setup import SAMPLER_SEED_OFFSET

    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed)
    model = build_model(cfg.model, data.info)
    sparse_ids = sparse_gradient_parameters(model)
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    optimizers = [torch.optim.Adam(dense, lr=cfg.optim.lr)] if dense else []
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=cfg.optim.lr))
    ranking = cfg.task.kind == "ranking"
    n, batch = len(data.train.y), cfg.batch.size
    examples = 0
    start = time.perf_counter()
    for epoch in range(cfg.stop.epochs):
        entropy = np.random.SeedSequence([cfg.seed + SAMPLER_SEED_OFFSET, epoch]).generate_state(1)[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(entropy)))
        model.train()
        for i in range(0, n, batch):
            rows = perm[i : i + batch]
            inputs, targets = take(data.train, rows, epoch)  # the negatives are the same draw as gradwise's
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            out = model(inputs)
            loss = bpr_loss_sum(out) / len(rows) if ranking else torch.nn.functional.mse_loss(out, targets)
            loss.backward()
            for opt in optimizers:
                opt.step()
            examples += len(rows)
        model.eval()
        with torch.no_grad():  # one validation pass, as gradwise's per-epoch evaluation
            for j in range(0, len(data.val.y), 8192):
                model(take(data.val, torch.arange(j, min(j + 8192, len(data.val.y))))[0])
    return time.perf_counter() - start, examples, {k: v.clone() for k, v in model.state_dict().items()}


def gradwise_loop(cfg) -> tuple[float, int, dict[str, torch.Tensor]]:
    from gradwise.store.checkpoint import load_model_state, resolve_checkpoint
    from gradwise.train.loop import fit

    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(cfg, Path(tmp) / "run")
        weights = load_model_state(resolve_checkpoint(Path(tmp) / "run", "last"))
    return summary["wall_time_s"], summary["examples"], weights


def one(model: str, sparse: bool, loop: str, epochs: int, batch: int, weights_out: Path) -> None:
    torch.set_num_threads(1)
    cfg = make_config(model, sparse, epochs, batch)
    seconds, examples, weights = (plain_loop if loop == "plain" else gradwise_loop)(cfg)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(weights_out))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "examples": examples, "rss_mb": rss_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "SPARSE", "LOOP"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model, sparse, loop = args.one
        one(model, sparse == "sparse", loop, args.epochs, args.batch, args.weights)
        return
    from safetensors.torch import load_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for sparse in ("dense", "sparse"):
                runs: dict[str, list[dict[str, float]]] = {"plain": [], "gradwise": []}
                files = {}
                for _ in range(args.repeats):
                    for loop in ("plain", "gradwise"):
                        files[loop] = Path(tmp) / f"{model}-{sparse}-{loop}.safetensors"
                        cmd = [sys.executable, __file__, "--one", model, sparse, loop, "--epochs", str(args.epochs)]
                        cmd += ["--batch", str(args.batch), "--weights", str(files[loop])]
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                        runs[loop].append(json.loads(out.strip().splitlines()[-1]))
                a, b = load_file(str(files["plain"])), load_file(str(files["gradwise"]))
                diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
                t = {loop: statistics.median(r["seconds"] for r in runs[loop]) for loop in runs}
                ex = runs["plain"][0]["examples"]
                rss = {loop: statistics.median(r["rss_mb"] for r in runs[loop]) for loop in runs}
                rows.append((model, sparse, ex / t["plain"], ex / t["gradwise"], t["gradwise"] / t["plain"], rss, diff))
    print("| model | embeddings | plain ex/s | gradwise ex/s | time ratio | peak RSS plain / gradwise | max |Δw| |")
    print("|---|---|---|---|---|---|---|")
    for model, sparse, plain_rate, ours_rate, ratio, rss, diff in rows:
        print(
            f"| {model} | {sparse} | {plain_rate:,.0f} | {ours_rate:,.0f} | {ratio:.3f} | "
            f"{rss['plain']:.0f} / {rss['gradwise']:.0f} MB | {diff:.2e} |"
        )


if __name__ == "__main__":
    main()
