"""gradwise's loop against a plain hand-written PyTorch loop on the same MLP and data.

Both train the same digits MLP with Adam from the same initial weights on the
same shuffled batches, alternating A/B over several repeats so that machine
noise hits both alike. Reports median wall time per run, the ratio, and
whether the final weights are bit-identical.

    .venv/bin/python benchmarks/overhead.py --repeats 5 --epochs 20

The hand-written loop evaluates on the validation split once per epoch and
saves the final model and optimizer, as a typical script would; gradwise
also evaluates once per epoch and, in addition, logs every step to
metrics.jsonl and writes its fsynced last/best checkpoints (that is the
overhead measured).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradwise.config import validate
from gradwise.data import load_dataset
from gradwise.models import build_model
from gradwise.store.checkpoint import load_model_state
from gradwise.train.distributed import Distributed
from gradwise.train.loop import fit
from gradwise.train.rng import seed_everything
from gradwise.train.setup import _DATA_CACHE, SAMPLER_SEED_OFFSET


def make_config(epochs: int, batch: int, hidden: list[int]):
    return validate(
        {
            "seed": 0,
            "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden": hidden},
            "optim": {"name": "adam", "lr": 1e-3, "no_decay_bias_norm": False},
            "batch": {"size": batch},
            "stop": {"epochs": epochs},
            "device": "cpu",
            "log": {"progress": False, "plots": False},
        }
    )


def plain_loop(cfg, workdir: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """What a careful user writes by hand: same init, same batch order, eval each epoch, save at the end."""
    global _OUTSIDE
    outside = time.perf_counter()
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed)
    model = build_model(cfg.model, data.info)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, fused=True)  # gradwise default for adam
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = data.train.x, data.train.y
    n, batch = len(y), cfg.batch.size
    start = time.perf_counter()
    for epoch in range(cfg.stop.epochs):
        # The same permutation gradwise's sampler draws, so the weights can be compared bit for bit.
        entropy = np.random.SeedSequence([cfg.seed + SAMPLER_SEED_OFFSET, epoch]).generate_state(1)[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(entropy)))
        model.train()
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            if not torch.isfinite(loss):
                raise RuntimeError("nan")
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_acc = (model(data.val.x).argmax(1) == data.val.y).float().mean().item()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, workdir / "final.pt")
    elapsed = time.perf_counter() - start
    _OUTSIDE = time.perf_counter() - outside
    assert val_acc > 0
    return elapsed, {k: v.clone() for k, v in model.state_dict().items()}


def gradwise_loop(cfg, workdir: Path) -> tuple[float, dict[str, torch.Tensor]]:
    global _OUTSIDE
    run_dir = workdir / f"run-{time.monotonic_ns()}"
    _DATA_CACHE.clear()  # a fresh process's fit: it loads the data, as the plain loop does every time
    outside = time.perf_counter()
    summary = fit(cfg, run_dir)
    _OUTSIDE = time.perf_counter() - outside
    return summary["wall_time_s"], load_model_state(run_dir / "checkpoints" / "last")


# The last call's wall time from outside: data loading, model building, the run directory's files, the
# final evaluation and summary included.
_OUTSIDE = 0.0


def step_overhead(cfg, blocks: int = 3, steps: int = 1000) -> tuple[float, float]:
    """Microseconds per optimizer step: gradwise's step function vs the plain step, same model and optimizer.

    Isolates the per-step cost (LR setting, accumulation bookkeeping, NaN check, weight-decay hook) from the
    per-epoch evaluation and the checkpoint writes that the end-to-end timing includes.
    """
    from gradwise.train.compiled import StepFunctions
    from gradwise.train.loop import _loss_function, _train_step
    from gradwise.train.setup import build_run

    parts = build_run(cfg)
    x, y = parts.data.train.x, parts.data.train.y
    model, optimizer, loss_fn = parts.model, parts.optimizer, torch.nn.CrossEntropyLoss()
    model.train()

    def plain(step: int) -> None:
        idx, _ = parts.sampler.take(cfg.batch.size)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if not torch.isfinite(loss):
            raise RuntimeError("nan")
        optimizer.step()

    single = Distributed()  # one process: the model itself does the forward
    step_functions = StepFunctions(model, _loss_function(parts, model), optimizer, compile_step=False)

    def ours(step: int) -> None:
        _train_step(parts, step, step_functions, single)

    timings: dict[str, list[float]] = {"plain": [], "ours": []}
    for _ in range(blocks):
        for name, fn in (("plain", plain), ("ours", ours)):
            for s in range(50):
                fn(s)
            start = time.perf_counter()
            for s in range(steps):
                fn(s)
            timings[name].append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(timings["plain"]), statistics.median(timings["ours"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = make_config(args.epochs, args.batch, args.hidden)
    plain_times, ours_times, plain_outside, ours_outside = [], [], [], []
    identical = True
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop(cfg, Path(tmp))  # warm-up: imports, allocator, thread pool
        gradwise_loop(cfg, Path(tmp))
        for _ in range(args.repeats):
            t_plain, w_plain = plain_loop(cfg, Path(tmp))
            plain_outside.append(_OUTSIDE)
            t_ours, w_ours = gradwise_loop(cfg, Path(tmp))
            ours_outside.append(_OUTSIDE)
            plain_times.append(t_plain)
            ours_times.append(t_ours)
            identical &= all(torch.equal(w_plain[k], w_ours[k]) for k in w_plain)
    plain, ours = statistics.median(plain_times), statistics.median(ours_times)
    steps = args.epochs * -(-1257 // args.batch)
    print(
        f"digits MLP {args.hidden}, batch {args.batch}, {args.epochs} epochs (~{steps} steps), "
        f"{torch.get_num_threads()} threads, {args.repeats} alternated repeats"
    )
    print(f"plain PyTorch loop : {plain:.3f} s (median; all: {', '.join(f'{t:.3f}' for t in plain_times)})")
    print(f"gradwise fit       : {ours:.3f} s (median; all: {', '.join(f'{t:.3f}' for t in ours_times)})")
    print(f"time ratio gradwise/plain: {ours / plain:.3f}  (overhead {100 * (ours / plain - 1):+.1f}%)")
    print(f"final weights identical: {identical}")
    p_out, o_out = statistics.median(plain_outside), statistics.median(ours_outside)
    print(f"whole call from outside (setup, files, final evaluation): plain {p_out:.3f} s, gradwise {o_out:.3f} s, "
          f"ratio {o_out / p_out:.3f}")  # fmt: skip
    plain_us, ours_us = step_overhead(cfg)
    print(f"per optimizer step: plain {plain_us:.0f} us, gradwise {ours_us:.0f} us, ratio {ours_us / plain_us:.3f}")


if __name__ == "__main__":
    main()
