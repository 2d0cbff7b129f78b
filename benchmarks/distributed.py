"""gradwise data-parallel training (DDP over gloo, CPU): 1 vs 2 processes, and against a plain hand-written DDP loop.

Three launches per round, each a separate ``torchrun --standalone`` job
(``python -m torch.distributed.run``) whose processes run this file in worker
mode; the order rotates every round so that machine noise hits all alike:

- gradwise, 1 process: ``gradwise.cli.main(["train", RECIPE, ...])``, what
  ``gradwise train RECIPE`` runs;
- gradwise, 2 processes: the same call in each rank, what each rank of
  ``gradwise train RECIPE --nproc 2`` runs;
- plain, 2 processes: a hand-written loop: DistributedDataParallel, the same
  model and initial weights (gradwise's data and model builders after the
  same seed), the same seeded global batch per step (the shuffled epoch
  order gradwise's sampler draws) with each rank taking ``rows[rank::world]``,
  the loss summed over the rank's rows, divided by the global count and
  multiplied by the world size (DDP averages gradients), the same optimizer
  (torch Adam/AdamW, fused, decay on ≥2-D weights only), the same LR
  schedule written as a pure function of the step, the same clipping and the
  same number of steps.

Every process gets ``OMP_NUM_THREADS=--threads`` (default 1, what torchrun
sets for several processes); ``--single-threads`` gives the 1-process run
another count (2 = one process using both cores).

Evaluation: the plain loop evaluates the validation split at the points
gradwise does (the end of every epoch unless ``eval.every_steps`` is set, and
the last step), each rank its stride, loss and accuracy summed over ranks
with one all_reduce; ``--eval-every N`` sets ``eval.every_steps`` for both.
The plain loop adds no collective of its own per step: it keeps each step's
local loss and all-reduces the whole vector once after training, to compare
the per-step global losses with gradwise's metrics.jsonl. Rank 0 saves model
and optimizer once at the end (torch.save). What gradwise adds (the overhead
measured): per step, an all_reduce of the loss (for its log and NaN check)
and one of the interrupt flag, a metrics.jsonl line and the LR/batch
bookkeeping; per evaluation, full metrics (loss, accuracy, macro-F1,
confusion) and an in-memory copy of a new best; fsynced ``last``/``best``
checkpoints at the first evaluation and at the end.

Measured: gradwise's ``wall_time_s``/``examples_per_s`` (summary.json, rank 0:
from after the DDP wrap to after the final checkpoint) and the plain loop's
time over the same span; the median step time (gaps between consecutive
step ends: metrics.jsonl ``time`` for gradwise, the clock after each
``optimizer.step()`` for plain); the whole command's time (torchrun, imports,
data, final evaluation); and each process's peak RSS, VmHWM from
/proc/self/status read by the worker (this file) in every rank when its work
is done (= ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; the torchrun agent
process itself is not counted).

    .venv/bin/python benchmarks/distributed.py                      # digits MLP, 10 epochs, 5 rounds
    .venv/bin/python benchmarks/distributed.py --model gpt --repeats 3
    .venv/bin/python benchmarks/distributed.py --single-threads 2   # 1 process on both cores vs 2 processes
    .venv/bin/python benchmarks/distributed.py --plain-sync         # plain also makes gradwise's 2 all_reduces/step
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUNS = (("gradwise", 1), ("gradwise", 2), ("plain", 2))
CHECKPOINT = "plain-final.pt"


def recipe_and_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The bundled recipe and the overrides every side trains with."""
    common = ["device=cpu", "log.progress=false", "log.plots=false"]
    if args.eval_every is not None:
        common.append(f"eval.every_steps={args.eval_every}")
    if args.model == "mlp":
        # No dropout (no RNG in the forward) and no early stopping: both sides run the same steps.
        return "digits-mlp", [*common, "model.dropout=0", "stop.patience=null", f"stop.epochs={args.epochs}"]
    gpt = ["model.n_layer=2", "model.n_embd=64", "data.corpus_chars=200000", "data.vocab_size=512"]
    gpt += ["data.seq_len=64", f"stop.max_steps={args.steps}", f"schedule.warmup_steps={max(1, args.steps // 10)}"]
    return "gpt-python", [*common, *gpt]


def load_config(recipe: str, overrides: list[str]) -> Any:
    from gradwise.config import apply_overrides, read_yaml, validate
    from gradwise.experiments.recipes import find_recipe

    path = find_recipe(recipe)
    return validate(apply_overrides(read_yaml(path), overrides), source=str(path))


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return math.nan


# --------------------------------------------------------------------------- workers (one per rank)


def gradwise_worker(spec: dict[str, Any], out: Path) -> None:
    from gradwise.cli import main

    code = main(["train", spec["recipe"], *spec["overrides"], f"out_dir={out}", "name=run"])
    if code:
        sys.exit(code)


def plain_worker(spec: dict[str, Any], out: Path) -> None:
    """A hand-written DDP loop (nanoGPT-like) over the same data, model, batches, optimizer and schedule."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from gradwise.data import load_dataset
    from gradwise.models import build_model
    from gradwise.train.adapt import model_dir
    from gradwise.train.rng import seed_everything
    from gradwise.train.setup import SAMPLER_SEED_OFFSET

    cfg = load_config(spec["recipe"], spec["overrides"])
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    seed_everything(cfg.seed)  # the same draws as gradwise's build: seed, load (no RNG), build the model
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed, tokenizer_dir=model_dir(cfg))
    model = build_model(cfg.model, data.info)
    net = DistributedDataParallel(model) if world > 1 else model
    opt, reg, sched = cfg.optim, cfg.regularize, cfg.schedule
    if opt.name not in ("adam", "adamw") or (opt.name == "adam" and reg.weight_decay):
        sys.exit(f"plain loop: optim {opt.name} with weight decay {reg.weight_decay} is not written here")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": reg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    optimizer = cls(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=True)

    x, y, n, batch = data.train.x, data.train.y, len(data.train.y), int(cfg.batch.size)
    per_epoch = math.ceil(n / batch)
    total = per_epoch * cfg.stop.epochs if cfg.stop.epochs else cfg.stop.max_steps
    total = min(total, cfg.stop.max_steps or total)
    lm = cfg.task.kind == "language_modeling"

    def lr_at(step: int) -> float:
        warm = sched.warmup_steps
        if step < warm:
            return opt.lr * (step + 1) / warm
        span = max(total - warm, 1)
        t, r = min(step - warm, span), sched.min_lr_ratio
        if sched.name == "constant":
            return opt.lr
        if sched.name == "step":
            return opt.lr * max((0.1 if sched.gamma is None else sched.gamma) ** (t // sched.step_size), r)
        if sched.name == "cosine":
            return opt.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t / span)))
        sys.exit(f"plain loop: schedule {sched.name} is not written here")

    def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        vx, vy = data.val.x, data.val.y
        mine = torch.arange(len(vy))[rank::world]
        sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, count
        for i in range(0, len(mine), cfg.eval.batch_size):
            rows = mine[i : i + cfg.eval.batch_size]
            logits = model(vx[rows])
            correct = (logits.argmax(-1) == vy[rows]).sum()
            sums += torch.tensor([float(loss_sum(logits, vy[rows])), float(correct), vy[rows].numel()])
        if world > 1:
            dist.all_reduce(sums)
        model.train()
        return float(sums[0] / sums[2]), float(sums[1] / sums[2])

    losses, ends, evals, examples = [], [], [], 0
    model.train()
    start = time.perf_counter()
    step, epoch = 0, 0
    while step < total:
        # gradwise's sampler: epoch e's order is randperm seeded by SeedSequence([seed + 1, e]).
        entropy = np.random.SeedSequence([cfg.seed + SAMPLER_SEED_OFFSET, epoch]).generate_state(1)[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(entropy)))
        for i in range(0, n, batch):
            rows = perm[i : i + batch]
            local = rows[rank::world]
            terms = y[rows].numel()  # examples, or target tokens for a language model
            optimizer.zero_grad(set_to_none=True)
            loss = loss_sum(net(x[local]), y[local]) / terms * world  # DDP averages: scale back to the global sum
            loss.backward()
            if reg.clip_grad_norm is not None:
                # Over the optimizer's parameters in group order, as gradwise does: the norm's float sum is then
                # added up in the same order and the weights can agree bit for bit.
                torch.nn.utils.clip_grad_norm_(decay + no_decay, reg.clip_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.step()
            step += 1
            examples += len(rows)
            losses.append(loss.detach())
            if spec["plain_sync"] and world > 1:
                # --plain-sync: the two small collectives gradwise makes every step (its logged loss, its stop flag).
                logged = loss.detach().clone()
                dist.all_reduce(logged)
                float(logged)
                dist.all_reduce(torch.zeros(1, dtype=torch.float64), op=dist.ReduceOp.MAX)
            ends.append(time.perf_counter() - start)
            epoch_ended = i + batch >= n
            every = cfg.eval.every_steps
            if step == total or (every is not None and step % every == 0) or (every is None and epoch_ended):
                evals.append((step, *evaluate()))
            if step == total:
                break
        epoch += 1
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / CHECKPOINT)
    elapsed = time.perf_counter() - start
    global_losses = torch.stack(losses)
    if world > 1:
        dist.all_reduce(global_losses)
    if rank == 0:
        result = {
            "wall_time_s": elapsed,
            "examples": examples,
            "losses": (global_losses / world).tolist(),
            "ends": ends,
            "evals": [{"step": s, "val_loss": vl, "val_accuracy": va} for s, vl, va in evals],
            "lm": lm,
        }
        (out / "plain.json").write_text(json.dumps(result))


def leave_process_group() -> None:
    """Wait for every rank, then destroy the gloo group.

    A rank that exits with its group alive (as ``gradwise train`` does) sometimes dies at interpreter exit
    with "terminate called without an active exception" (SIGABRT), and torchrun reports the finished job
    as failed: 6 of 36 jobs here (1 of 12 ``gradwise train --nproc 2``, 5 of 24 plain); with this barrier
    and destroy, 1 of 48. :func:`launch` accepts such a job when every rank had written its results.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def worker(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.result_dir)
    spec = json.loads((out / "spec.json").read_text())
    (gradwise_worker if args.worker == "gradwise" else plain_worker)(spec, out)
    leave_process_group()  # after gradwise's timed loop, final evaluation and run directory: outside all timings
    rank = int(os.environ.get("RANK", "0"))
    rss = {"rank": rank, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}
    (out / f"rank{rank}.json").write_text(json.dumps(rss))


# --------------------------------------------------------------------------- parent: launch, read, report


def median_gap(ends: list[float]) -> float:
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    return statistics.median(gaps) if gaps else math.nan


def launch(side: str, nproc: int, threads: int, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """One torchrun job of ``nproc`` workers; what it measured, read back from ``out``."""
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += [__file__, "--worker", side, "--result-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    command_s = time.perf_counter() - start
    finished = len(list(out.glob("rank*.json"))) == nproc  # every rank got past its work and wrote its file
    if done.returncode != 0 and not finished:
        sys.exit(f"{side} x{nproc} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    result: dict[str, Any] = {"command_s": command_s, "rss": [r["peak_rss_mb"] for r in ranks]}
    result["exit_abort"] = done.returncode != 0  # died in teardown after the work (see leave_process_group)
    result["threads"] = [r["threads"] for r in ranks]
    if side == "gradwise":
        summary = json.loads((out / "run" / "summary.json").read_text())
        lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        train = [line for line in lines if line["kind"] == "train"]
        evals = [line for line in lines if line["kind"] == "eval"]
        result.update(
            wall_time_s=summary["wall_time_s"],
            examples_per_s=summary["examples_per_s"],
            losses=[line["loss"] for line in train],
            step_s=median_gap([line["time"] for line in train]),
            evals=[{"step": e["step"], "val_loss": e["val_loss"], "val_accuracy": e["val_accuracy"]} for e in evals],
        )
    else:
        plain = json.loads((out / "plain.json").read_text())
        result.update(
            wall_time_s=plain["wall_time_s"],
            examples_per_s=plain["examples"] / plain["wall_time_s"],
            losses=plain["losses"],
            step_s=median_gap(plain["ends"]),
            evals=plain["evals"],
        )
    return result


def max_diff(a: list[float], b: list[float]) -> float:
    return max((abs(u - v) for u, v in zip(a, b, strict=True)), default=math.nan)


def table(runs: dict[str, list[dict[str, Any]]], left: str, right: str, title: str) -> None:
    def col(key: str, get: Any, spec: str) -> tuple[str, str, float]:
        cells, meds = [], []
        for name in (left, right):
            values = [get(r) for r in runs[name]]
            med = statistics.median(values)
            meds.append(med)
            cells.append(f"{med:{spec}} ({', '.join(format(v, spec) for v in values)})")
        return cells[0], cells[1], meds[0] / meds[1] if meds[1] else math.nan

    rows = [
        ("train wall time s", lambda r: r["wall_time_s"], ".3f"),
        ("train examples/s", lambda r: r["examples_per_s"], ".0f"),
        ("median step ms", lambda r: 1000 * r["step_s"], ".2f"),
        ("whole command s", lambda r: r["command_s"], ".1f"),
        ("peak RSS MB, rank 0", lambda r: r["rss"][0], ".0f"),
        ("peak RSS MB, max over ranks", lambda r: max(r["rss"]), ".0f"),
        ("final train loss", lambda r: r["losses"][-1], ".6f"),
        ("final val loss", lambda r: r["evals"][-1]["val_loss"], ".6f"),
        ("final val accuracy", lambda r: r["evals"][-1]["val_accuracy"], ".4f"),
    ]
    print(f"\n{title}\n")
    print(f"| median (all rounds) | {left} | {right} | {left} / {right} |")
    print("|---|---|---|---|")
    for label, get, spec in rows:
        a, b, ratio = col(label, get, spec)
        print(f"| {label} | {a} | {b} | {ratio:.3f} |")
    a, b = runs[left][0], runs[right][0]
    evals_a, evals_b = [e["val_loss"] for e in a["evals"]], [e["val_loss"] for e in b["evals"]]
    same_points = [e["step"] for e in a["evals"]] == [e["step"] for e in b["evals"]]
    train_diff = max_diff(a["losses"], b["losses"])
    print(
        f"\nloss agreement (round 1): max |Δ train loss| over {len(a['losses'])} steps {train_diff:.3g}"
        f", max |Δ val loss| over {len(evals_a)} evaluations {max_diff(evals_a, evals_b):.3g} "
        f"(same evaluation steps: {same_points}); bit-identical train losses: {a['losses'] == b['losses']}"
    )


def parent(args: argparse.Namespace) -> None:
    import torch

    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(recipe, overrides)
    spec = {"recipe": recipe, "overrides": overrides, "plain_sync": args.plain_sync}
    names = {("gradwise", 1): "gradwise 1 proc", ("gradwise", 2): "gradwise 2 procs", ("plain", 2): "plain 2 procs"}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
    load_before = os.getloadavg()[0]
    print(
        f"{recipe} {' '.join(overrides)}; batch {cfg.batch.size} (global), eval every "
        f"{cfg.eval.every_steps or 'epoch'}; torch {torch.__version__}, {os.cpu_count()} CPUs; threads per process: "
        f"{args.threads} (1-process run: {args.single_threads or args.threads}); {args.repeats} rotated rounds",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for round_ in range(args.repeats):
            order = RUNS[round_ % len(RUNS) :] + RUNS[: round_ % len(RUNS)]
            for side, nproc in order:
                threads = (args.single_threads or args.threads) if nproc == 1 else args.threads
                out = Path(tmp) / f"{side}-{nproc}-{round_}"
                result = launch(side, nproc, threads, spec, out)
                runs[names[side, nproc]].append(result)
                print(
                    f"  round {round_ + 1} {names[side, nproc]:16s}: train {result['wall_time_s']:.3f} s, "
                    f"step {1000 * result['step_s']:.2f} ms, command {result['command_s']:.1f} s, "
                    f"RSS {'/'.join(f'{m:.0f}' for m in result['rss'])} MB, threads {result['threads']}"
                    + (" (aborted in teardown after its work)" if result["exit_abort"] else ""),
                    flush=True,
                )
    steps = len(runs["gradwise 1 proc"][0]["losses"])
    print(f"\n{steps} optimizer steps per run; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    aborts = {name: sum(r["exit_abort"] for r in results) for name, results in runs.items()}
    print(f"jobs that aborted in teardown after finishing their work: {aborts}")
    table(runs, "gradwise 2 procs", "gradwise 1 proc", "1. gradwise: 2 processes (DDP) vs 1 process")
    table(runs, "gradwise 2 procs", "plain 2 procs", "2. 2 processes: gradwise DDP vs a plain hand-written DDP loop")
    ratio = statistics.median(r["wall_time_s"] for r in runs["gradwise 2 procs"]) / statistics.median(
        r["wall_time_s"] for r in runs["plain 2 procs"]
    )
    verdict = "met" if ratio <= 1.03 else "not met"
    print(f"\ngradwise DDP / plain DDP train wall time: {ratio:.3f} (target ≤ 1.03: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each launches all three runs once")
    parser.add_argument("--epochs", type=int, default=10, help="mlp: epochs of the digits train split")
    parser.add_argument("--steps", type=int, default=40, help="gpt: optimizer steps")
    parser.add_argument("--eval-every", type=int, default=None, help="eval.every_steps for both (default: recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--single-threads", type=int, default=None, help="OMP_NUM_THREADS of the 1-process run")
    parser.add_argument(
        "--plain-sync", action="store_true", help="the plain loop also makes gradwise's two per-step all_reduces"
    )
    parser.add_argument("--worker", choices=["gradwise", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
