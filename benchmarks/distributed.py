"""gradwise data parallel on CPU (gloo): 1 process vs 2 (DDP, FSDP), and vs a plain hand-written DDP loop.

Up to four launches per round, each a separate ``torchrun --standalone`` job
(``python -m torch.distributed.run``) whose processes run this file in worker
mode; the order rotates every round so that machine noise hits all alike:

- gradwise, 1 process: ``gradwise.cli.main(["train", RECIPE, ...])``, what
  ``gradwise train RECIPE`` runs;
- gradwise DDP, 2 processes: the same call in each rank, what each rank of
  ``gradwise train RECIPE --nproc 2`` runs (``distributed.strategy: ddp``,
  the default);
- gradwise FSDP, 2 processes (``--strategies`` with ``fsdp``): the same with
  ``distributed.strategy=fsdp``: FSDP2 ``fully_shard`` on every block and on
  the root, so each rank holds half of the parameters, gradients and
  optimizer state, and all-gathers a block's weights before its forward and
  backward and reduce-scatters its gradients after;
- plain DDP, 2 processes: a hand-written loop: DistributedDataParallel, the
  same model and initial weights (gradwise's data and model builders after
  the same seed), the same seeded global batch per step (the shuffled epoch
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
measured): one all_reduce per *window* of the pending steps' losses together
with the stop flag (for its log, its NaN check and an agreed stop; at every
evaluation, checkpoint, epoch end and every 16th step — ``--plain-sync``
makes the plain loop do the same), a metrics.jsonl line per step and the
LR/batch bookkeeping; per evaluation, full metrics (loss, accuracy,
macro-F1, confusion) and an in-memory copy of a new best; fsynced
``last``/``best`` checkpoints at the first evaluation and at the end (FSDP:
sharded, written by every rank).

Measured: gradwise's ``wall_time_s``/``examples_per_s`` (summary.json, rank 0:
from after the DDP/FSDP wrap to after the final checkpoint) and the plain
loop's time over the same span; the median step time (gaps between
consecutive step ends: metrics.jsonl ``time`` for gradwise, the clock after
each ``optimizer.step()`` for plain); the whole command's time (torchrun,
imports, data, final evaluation); each process's peak RSS, VmHWM from
/proc/self/status read by the worker (this file) in every rank when its work
is done (= ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; the torchrun agent
process itself is not counted); and gradwise's ``state_mb_per_process``
(summary.json: the parameters and optimizer state one rank holds, the largest
over ranks, local shards only). Peak RSS is ~450 MB of torch, libraries and
data per process before any model, then activations (evaluation runs
``eval.batch_size`` rows per rank), the state, and transients: the tiny
models' state does not show in it, and ``--gpt-width``/``--gpt-layers`` grow
the GPT until it could (``--gpt-corpus-chars`` keeps its evaluations short).
Even then FSDP's halved state does not lower the *peak*: its sharded
checkpoint write adds a transient larger than the state it writes (see
benchmarks/RESULTS.md, "Data parallel").

    .venv/bin/python benchmarks/distributed.py                      # digits MLP, 10 epochs, 5 rounds, DDP + FSDP
    .venv/bin/python benchmarks/distributed.py --model gpt --repeats 3
    .venv/bin/python benchmarks/distributed.py --model gpt --repeats 2 --gpt-width 1024 --gpt-layers 4 \\
        --gpt-corpus-chars 50000 --steps 4                         # 51M parameters, 0.6 GB of state
    .venv/bin/python benchmarks/distributed.py --strategies ddp     # no FSDP run (3 launches per round)
    .venv/bin/python benchmarks/distributed.py --single-threads 2   # 1 process on both cores vs 2 processes
    .venv/bin/python benchmarks/distributed.py --plain-sync         # plain also settles losses as gradwise does
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

ONE, DDP, FSDP, PLAIN = "gradwise 1 proc", "gradwise DDP 2", "gradwise FSDP 2", "plain DDP 2"
# name -> (worker, processes, overrides on top of the common ones)
KINDS: dict[str, tuple[str, int, list[str]]] = {
    ONE: ("gradwise", 1, []),
    DDP: ("gradwise", 2, ["distributed.strategy=ddp"]),
    FSDP: ("gradwise", 2, ["distributed.strategy=fsdp"]),
    PLAIN: ("plain", 2, []),
}
CHECKPOINT = "plain-final.pt"
STOP_CHECK_STEPS = 16  # gradwise.train.loop.STOP_CHECK_STEPS: where --plain-sync settles, besides evals/epoch ends


def recipe_and_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The bundled recipe and the overrides every side trains with."""
    common = ["device=cpu", "log.progress=false", "log.plots=false"]
    if args.eval_every is not None:
        common.append(f"eval.every_steps={args.eval_every}")
    if args.model == "mlp":
        # No dropout (no RNG in the forward) and no early stopping: both sides run the same steps.
        return "digits-mlp", [*common, "model.dropout=0", "stop.patience=null", f"stop.epochs={args.epochs}"]
    gpt = [f"model.n_layer={args.gpt_layers}", f"model.n_embd={args.gpt_width}"]
    gpt += [f"data.corpus_chars={args.gpt_corpus_chars}", "data.vocab_size=512"]
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

    code = main(["train", spec["recipe"], *spec["overrides"], *spec["extra"], f"out_dir={out}", "name=run"])
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

    losses, ends, evals, examples, pending = [], [], [], 0, []
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
            ends.append(time.perf_counter() - start)
            epoch_ended = i + batch >= n
            every = cfg.eval.every_steps
            eval_due = step == total or (every is not None and step % every == 0) or (every is None and epoch_ended)
            if spec["plain_sync"] and world > 1:
                # --plain-sync: gradwise's settling, one all_reduce of the window's losses and a stop flag.
                pending.append(loss.detach())
                if eval_due or epoch_ended or step % STOP_CHECK_STEPS == 0:
                    packed = torch.cat([torch.stack(pending), torch.zeros(1, dtype=loss.dtype)])
                    dist.all_reduce(packed)
                    packed.tolist()
                    pending = []
            if eval_due:
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


def launch(kind: str, threads: int, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """One torchrun job of the ``kind``'s workers; what it measured, read back from ``out``."""
    side, nproc, extra = KINDS[kind]
    out.mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps({**spec, "extra": extra}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += [__file__, "--worker", side, "--result-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    command_s = time.perf_counter() - start
    finished = len(list(out.glob("rank*.json"))) == nproc  # every rank got past its work and wrote its file
    if done.returncode != 0 and not finished:
        sys.exit(f"{kind} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])
    result: dict[str, Any] = {"command_s": command_s, "rss": [r["peak_rss_mb"] for r in ranks]}
    result["exit_abort"] = done.returncode != 0  # died in teardown after the work (see leave_process_group)
    result["threads"] = [r["threads"] for r in ranks]
    if side == "gradwise":
        summary = json.loads((out / "run" / "summary.json").read_text())
        lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        train = [line for line in lines if line["kind"] == "train"]
        evals = [line for line in lines if line["kind"] == "eval"]
        expected = "single" if nproc == 1 else extra[0].split("=")[1]
        if (summary["processes"], summary["strategy"]) != (nproc, expected):
            sys.exit(f"{kind}: summary.json says {summary['processes']} processes, {summary['strategy']}")
        result.update(
            state_mb=summary["state_mb_per_process"],
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


def table(runs: dict[str, list[dict[str, Any]]], names: list[str], ratios: list[tuple[str, str]], title: str) -> None:
    """Medians (and every round's value) of ``names``' runs side by side, and the ratios of the given pairs."""
    rows = [
        ("train wall time s", lambda r: r["wall_time_s"], ".3f"),
        ("train examples/s", lambda r: r["examples_per_s"], ".0f"),
        ("median step ms", lambda r: 1000 * r["step_s"], ".2f"),
        ("whole command s", lambda r: r["command_s"], ".1f"),
        ("peak RSS MB, rank 0", lambda r: r["rss"][0], ".0f"),
        ("peak RSS MB, max over ranks", lambda r: max(r["rss"]), ".0f"),
        ("state MB/process: parameters", lambda r: r["state_mb"]["parameters"], ".2f"),
        ("state MB/process: optimizer", lambda r: r["state_mb"]["optimizer"], ".2f"),
        ("final train loss", lambda r: r["losses"][-1], ".6f"),
        ("final val loss", lambda r: r["evals"][-1]["val_loss"], ".6f"),
        ("final val accuracy", lambda r: r["evals"][-1]["val_accuracy"], ".4f"),
    ]
    print(f"\n{title}\n")
    heads = [f"{a} / {b}".replace("gradwise ", "") if PLAIN not in (a, b) else f"{a} / {b}" for a, b in ratios]
    print(f"| median (all rounds) | {' | '.join(names)} | {' | '.join(heads)} |")
    print("|---|" + "---|" * (len(names) + len(ratios)))
    for label, get, spec in rows:
        if any("state_mb" not in r for name in names for r in runs[name]) and label.startswith("state"):
            continue  # the plain loop does not report it
        meds, cells = {}, []
        for name in names:
            values = [get(r) for r in runs[name]]
            meds[name] = statistics.median(values)
            shown = f" ({', '.join(format(v, spec) for v in values)})" if len(set(values)) > 1 else ""
            cells.append(f"{meds[name]:{spec}}{shown}")
        quotients = [meds[a] / meds[b] if meds[b] else math.nan for a, b in ratios]
        print(f"| {label} | {' | '.join(cells)} | {' | '.join(f'{q:.3f}' for q in quotients)} |")
    print()
    for a_name, b_name in ratios:
        a, b = runs[a_name][0], runs[b_name][0]
        evals_a, evals_b = [e["val_loss"] for e in a["evals"]], [e["val_loss"] for e in b["evals"]]
        same_points = [e["step"] for e in a["evals"]] == [e["step"] for e in b["evals"]]
        print(
            f"loss agreement {a_name} vs {b_name} (round 1): max |Δ train loss| over {len(a['losses'])} steps "
            f"{max_diff(a['losses'], b['losses']):.3g}, max |Δ val loss| over {len(evals_a)} evaluations "
            f"{max_diff(evals_a, evals_b):.3g} (same evaluation steps: {same_points}); "
            f"bit-identical train losses: {a['losses'] == b['losses']}"
        )


def parent(args: argparse.Namespace) -> None:
    import torch

    recipe, overrides = recipe_and_overrides(args)
    cfg = load_config(recipe, overrides)
    spec = {"recipe": recipe, "overrides": overrides, "plain_sync": args.plain_sync}
    strategies = args.strategies.split(",")
    if not set(strategies) <= {"ddp", "fsdp"} or "ddp" not in strategies:
        sys.exit(f"--strategies: a comma-separated list of ddp (always run) and fsdp, got {args.strategies!r}")
    kinds = [ONE, DDP, *([FSDP] if "fsdp" in strategies else []), PLAIN]
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    load_before = os.getloadavg()[0]
    print(
        f"{recipe} {' '.join(overrides)}; batch {cfg.batch.size} (global), eval every "
        f"{cfg.eval.every_steps or 'epoch'}; torch {torch.__version__}, {os.cpu_count()} CPUs; threads per process: "
        f"{args.threads} (1-process run: {args.single_threads or args.threads}); {args.repeats} rotated rounds of "
        f"{', '.join(kinds)}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        for round_ in range(args.repeats):
            shift = round_ % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                threads = (args.single_threads or args.threads) if KINDS[kind][1] == 1 else args.threads
                out = Path(tmp) / f"{kind.replace(' ', '-')}-{round_}"
                result = launch(kind, threads, spec, out)
                runs[kind].append(result)
                state = result.get("state_mb")
                print(
                    f"  round {round_ + 1} {kind:16s}: train {result['wall_time_s']:.3f} s, "
                    f"step {1000 * result['step_s']:.2f} ms, command {result['command_s']:.1f} s, "
                    f"RSS {'/'.join(f'{m:.0f}' for m in result['rss'])} MB, threads {result['threads']}"
                    + (f", state {state['parameters']:.2f}+{state['optimizer']:.2f} MB" if state else "")
                    + (" (aborted in teardown after its work)" if result["exit_abort"] else ""),
                    flush=True,
                )
    steps = len(runs[ONE][0]["losses"])
    print(f"\n{steps} optimizer steps per run; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    aborts = {name: sum(r["exit_abort"] for r in results) for name, results in runs.items()}
    print(f"jobs that aborted in teardown after finishing their work: {aborts}")
    gradwise_kinds = [kind for kind in kinds if kind != PLAIN]
    pairs = [(DDP, ONE), *([(FSDP, ONE), (FSDP, DDP)] if FSDP in kinds else [])]
    table(runs, gradwise_kinds, pairs, "1. gradwise: 1 process vs 2 processes (" + " and ".join(strategies) + ")")
    table(runs, [DDP, PLAIN], [(DDP, PLAIN)], "2. 2 processes: gradwise DDP vs a plain hand-written DDP loop")
    ratio = statistics.median(r["wall_time_s"] for r in runs[DDP]) / statistics.median(
        r["wall_time_s"] for r in runs[PLAIN]
    )
    # Both runs of a round saw about the same machine load: their ratio is steadier than the ratio of medians.
    paired = [g["wall_time_s"] / p["wall_time_s"] for g, p in zip(runs[DDP], runs[PLAIN], strict=True)]
    verdict = "met" if ratio <= 1.03 else "not met"
    print(
        f"\ngradwise DDP / plain DDP train wall time: {ratio:.3f} (target ≤ 1.03: {verdict}); per round "
        f"{', '.join(f'{q:.2f}' for q in paired)}, median {statistics.median(paired):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each launches every run once")
    parser.add_argument("--epochs", type=int, default=10, help="mlp: epochs of the digits train split")
    parser.add_argument("--steps", type=int, default=40, help="gpt: optimizer steps")
    parser.add_argument("--gpt-width", type=int, default=64, help="gpt: model.n_embd (4 heads)")
    parser.add_argument("--gpt-layers", type=int, default=2, help="gpt: model.n_layer")
    parser.add_argument(
        "--gpt-corpus-chars", type=int, default=200_000, help="gpt: data.corpus_chars (val/test evaluation cost)"
    )
    parser.add_argument(
        "--strategies", default="ddp,fsdp", help="gradwise 2-process runs: ddp (always, vs plain) and fsdp"
    )
    parser.add_argument("--eval-every", type=int, default=None, help="eval.every_steps for both (default: recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--single-threads", type=int, default=None, help="OMP_NUM_THREADS of the 1-process run")
    parser.add_argument(
        "--plain-sync",
        action="store_true",
        help="the plain loop also settles its losses as gradwise does (one all_reduce per window)",
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
