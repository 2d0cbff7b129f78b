"""What the checkpoint commit protocol costs: a `last` save and a load, before and after the manifest.

Before = commit 6439e8c's ``gradwise.train.checkpoint``: the step directory
written under a temporary name, every file fsynced, renamed, then the
``last``/``best`` links swapped and unreferenced directories pruned. After =
the current ``gradwise.store.checkpoint``: the same staging, then every file
of the named checkpoints measured and hashed (xxh3-128; SHA-256 until the first measurement below) into
``manifest.json``, which is fsynced and renamed (the commit point); then the
links are re-pointed and the rest pruned. The old module is imported from a
git worktree of 6439e8c (made under /tmp and removed at the end unless
``--before-tree`` names an existing one) into this same process, so both
sides save the very same tensors, alternated round by round (before first on
even rounds, after first on odd ones); ``os.sync()`` and a garbage collection
run, untimed, before every timed call.

Rows, per model:

* ``save_checkpoint(root, step, weights, state, ["last"])``, old vs new;
* ``CheckpointKeeper.save`` (what the loop calls), 6439e8c's keeper vs
  today's: a new best at the same step (one directory, tagged last + best)
  and a best kept from an earlier evaluation (a weights-only directory
  beside the full one; the old keeper wrote them as two link swaps, the new
  one stages both and commits them by one manifest rename);
* loading ``last`` as resume does (resolve the tag, read weights and
  training state): old (a link lookup, no check) vs new (the manifest read
  and every file's size and SHA-256 verified), with the files in the page
  cache (right after a save) and evicted from it (``POSIX_FADV_DONTNEED`` on
  each file: a resume in a later session), and the tag resolution alone.

Where the time goes: the file-writing and hashing functions of both modules
are wrapped with timers (``save_file`` = serialize + write, ``fsync`` =
every file and directory fsync, ``hash`` = the manifest's size + SHA-256 of
every file, ``manifest`` = writing manifest.json with its fsync, ``prune`` =
``shutil.rmtree`` of the replaced checkpoint), and ``hashlib.sha256`` over
the same files is timed on its own.

Models: the digits MLP of the ``digits-mlp`` recipe (optimizer AdamW, whose
state is the shape of the recipe's Adam) and the 51M-parameter GPT of
``benchmarks/distributed.py`` (``gpt-python`` with 4 layers of width 1024,
vocabulary 512, 64 tokens), each after one optimizer step, so the AdamW
state is complete.

    .venv/bin/python benchmarks/checkpoint_commit.py                       # both models, 9 rounds
    .venv/bin/python benchmarks/checkpoint_commit.py --models mlp --repeats 15
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

BEFORE_COMMIT = "6439e8c"
REPO = Path(__file__).resolve().parents[1]
MODELS: dict[str, tuple[str, list[str]]] = {
    "mlp": ("digits-mlp", ["optim.name=adamw"]),
    "gpt51m": (
        "gpt-python",
        [
            "model.n_layer=4",
            "model.n_embd=1024",
            "data.corpus_chars=50000",
            "data.vocab_size=512",
            "data.seq_len=64",
            "stop.max_steps=4",
            "schedule.warmup_steps=1",
        ],
    ),
}
COMMON = ["device=cpu", "log.progress=false", "log.plots=false"]
MiB = 2**20


# --------------------------------------------------------------------------- the two sides


def before_tree(path: Path | None) -> tuple[Path, bool]:
    """A worktree of BEFORE_COMMIT: the one named, or a new one under /tmp (True: remove it at the end)."""
    if path is not None:
        if not (path / "src/gradwise/train/checkpoint.py").is_file():
            sys.exit(f"{path}: no src/gradwise/train/checkpoint.py (not a worktree of {BEFORE_COMMIT}?)")
        return path, False
    path = Path(tempfile.mkdtemp(prefix="gw-before-", dir="/tmp"))
    path.rmdir()
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), BEFORE_COMMIT],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path, True


def remove_tree(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=True)


def _load_file(name: str, file: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_before(tree: Path) -> tuple[ModuleType, type]:
    """6439e8c's checkpoint module and its keeper (which imports the checkpoint module by its old name)."""
    old = _load_file("gradwise_before_checkpoint", tree / "src/gradwise/train/checkpoint.py")
    saved = sys.modules.get("gradwise.train.checkpoint")
    sys.modules["gradwise.train.checkpoint"] = old  # only while the old keeper is imported
    try:
        keeper = _load_file("gradwise_before_keeper", tree / "src/gradwise/train/keeper.py")
    finally:
        if saved is None:
            del sys.modules["gradwise.train.checkpoint"]
        else:
            sys.modules["gradwise.train.checkpoint"] = saved
    return old, keeper.CheckpointKeeper


# --------------------------------------------------------------------------- timers around the file work

ACC: dict[str, float] = defaultdict(float)


def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            ACC[key] += time.perf_counter() - start

    return wrapper


def instrument(old: ModuleType, new: ModuleType) -> None:
    """Wrap what both modules call to write, fsync, hash and prune (looked up at call time)."""
    for module in (old, new):
        module.save_file = timed("save_file", module.save_file)
        module.fsync_file = timed("fsync", module.fsync_file)
        module.fsync_dir = timed("fsync", module.fsync_dir)
    new._describe_files = timed("hash", new._describe_files)
    new.verify = timed("verify", new.verify)
    new.atomic_write_text = timed("manifest", new.atomic_write_text)
    shutil.rmtree = timed("prune", shutil.rmtree)


def measure(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Seconds one call takes, and its parts (from the timers); the disk and the heap settled first."""
    os.sync()
    gc.collect()
    ACC.clear()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, dict(ACC)


# --------------------------------------------------------------------------- models and states


def build(model: str) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """The run's parts after one optimizer step, its weights and its full training state (as the loop saves it)."""
    from gradwise.config import apply_overrides, read_yaml, validate
    from gradwise.experiments.recipes import find_recipe
    from gradwise.train.distributed import Distributed
    from gradwise.train.loop import Counters, _train_step, _training_state
    from gradwise.train.setup import build_run

    recipe, overrides = MODELS[model]
    path = find_recipe(recipe)
    cfg = validate(apply_overrides(read_yaml(path), [*COMMON, *overrides]), source=str(path))
    parts = build_run(cfg)
    x, y = parts.data.train.x, parts.data.train.y
    parts.model.train()
    _train_step(parts, 0, x, y, parts.model, Distributed())
    state = _training_state(parts, Counters(step=1, examples=cfg.batch.size), sharded=False)
    return parts, parts.model.state_dict(), state


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def evict(directory: Path) -> None:
    """Drop this checkpoint's pages from the page cache (only these files: the machine is shared)."""
    for path in files_of(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sha256_files(directory: Path) -> None:
    for path in files_of(directory):
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(8 * MiB):
                digest.update(chunk)
        digest.hexdigest()


# --------------------------------------------------------------------------- one model


def bench_model(model: str, repeats: int, work: Path, old: ModuleType, old_keeper: type) -> dict[str, Any]:
    import gradwise.store.checkpoint as new
    from gradwise.train.keeper import CheckpointKeeper

    t0 = time.perf_counter()
    parts, weights, state = build(model)
    n_params = sum(p.numel() for p in parts.model.parameters())
    print(
        f"# {model}: {n_params / 1e6:.2f}M parameters, built and stepped in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    # A copy of the weights is a pending best; the interval is never reached, so after_eval only records it.
    ckpt_cfg = parts.cfg.checkpoint.model_copy(update={"min_interval_s": 1e9})
    sides = {"before": old, "after": new}
    keeper_cls = {"before": old_keeper, "after": CheckpointKeeper}

    def run_dir(op: str, side: str) -> Path:
        return work / model / f"{op}-{side}"

    keepers = {
        (op, side): keeper_cls[side](run_dir(op, side) / "checkpoints", ckpt_cfg, parts.model, lambda: state)
        for op in ("keeper-same", "keeper-earlier")
        for side in sides
    }

    def save_op(op: str, side: str, step: int) -> Callable[[], Any]:
        if op == "save":
            module = sides[side]
            return lambda: module.save_checkpoint(run_dir(op, side) / "checkpoints", step, weights, state, ["last"])
        keeper = keepers[(op, side)]
        # Untimed: a new best remembered at this step's evaluation, or at an evaluation before it.
        keeper.after_eval(step if op == "keeper-same" else step - 5, improved=True)
        return lambda: keeper.save(step)

    def load_op(side: str) -> Callable[[], Any]:
        module, directory = sides[side], run_dir("save", side)

        def load() -> None:
            ckpt = module.resolve_checkpoint(directory, "last")
            module.load_model_state(ckpt)
            module.load_training_state(ckpt)

        return load

    ops = ["save", "keeper-same", "keeper-earlier"]
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    parts_of: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
    # Round -1 is a warm-up: every directory then holds a checkpoint for the next save to replace.
    for round_ in range(-1, repeats):
        step = 10 * (round_ + 2)
        order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for op in ops:
            for side in order:
                seconds, split = measure(save_op(op, side, step))
                if round_ >= 0:
                    times[op][side].append(seconds)
                    parts_of[op][side].append(split)
        for side in order:
            seconds, split = measure(load_op(side))
            if round_ >= 0:
                times["load-warm"][side].append(seconds)
                parts_of["load-warm"][side].append(split)
        for side in order:
            module, directory = sides[side], run_dir("save", side)
            seconds, _ = measure(lambda m=module, d=directory: m.resolve_checkpoint(d, "last"))
            if round_ >= 0:
                times["resolve"][side].append(seconds)
        for side in order:
            evict(run_dir("save", side) / "checkpoints" / f"step-{step:08d}")
            seconds, split = measure(load_op(side))
            if round_ >= 0:
                times["load-cold"][side].append(seconds)
                parts_of["load-cold"][side].append(split)
        latest = run_dir("save", "after") / "checkpoints" / f"step-{step:08d}"
        seconds, _ = measure(lambda d=latest: sha256_files(d))
        if round_ >= 0:
            times["sha256"]["after"].append(seconds)
        print(f"  round {round_ + 1}/{repeats} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    final = run_dir("save", "after") / "checkpoints" / f"step-{10 * (repeats + 1):08d}"
    best_dir = run_dir("keeper-earlier", "after") / "checkpoints" / f"weights-{10 * (repeats + 1) - 5:08d}"
    sizes = {
        "full": sum(p.stat().st_size for p in files_of(final)) / MiB,
        "best": sum(p.stat().st_size for p in files_of(best_dir)) / MiB,
    }
    shutil.rmtree(work / model, ignore_errors=True)
    return {"model": model, "params": n_params, "times": times, "parts": parts_of, "sizes": sizes}


# --------------------------------------------------------------------------- report


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def p90_ms(values: list[float]) -> float:
    if len(values) < 2:
        return 1000 * values[0]
    return 1000 * statistics.quantiles(values, n=10, method="inclusive")[-1]


def cell(values: list[float]) -> str:
    return f"{median_ms(values):.1f} ({p90_ms(values):.1f})"


LABELS = {
    "save": "`save_checkpoint` last",
    "keeper-same": "`CheckpointKeeper.save`, best = last",
    "keeper-earlier": "`CheckpointKeeper.save`, best from an earlier eval",
    "load-warm": "load last (resolve + weights + state), files cached",
    "load-cold": "load last, files evicted from the page cache",
    "resolve": "`resolve_checkpoint` alone, cached",
}
MODEL_NAMES = {"mlp": "digits MLP", "gpt51m": "51M GPT"}


def report(results: list[dict[str, Any]], repeats: int) -> None:
    print()
    print(
        f"Median ms (p90) over {repeats} alternated rounds; ratio = after/before of the medians "
        "[median of the per-round ratios]."
    )
    print()
    print("| model | operation | checkpoint MB | before ms | after ms | after/before |")
    print("|---|---|---|---|---|---|")
    for res in results:
        name = f"{MODEL_NAMES[res['model']]} ({res['params'] / 1e6:.2f}M)"
        for op, label in LABELS.items():
            before, after = res["times"][op]["before"], res["times"][op]["after"]
            mb = res["sizes"]["full"] + (res["sizes"]["best"] if op == "keeper-earlier" else 0)
            per_round = statistics.median(a / b for a, b in zip(after, before, strict=True))
            ratio = statistics.median(after) / statistics.median(before)
            print(f"| {name} | {label} | {mb:.2f} | {cell(before)} | {cell(after)} | {ratio:.3f} [{per_round:.3f}] |")
    print()
    print("Where the time goes (median ms of each part over the same rounds; `other` = the rest of the call):")
    print()
    keys = ["save_file", "fsync", "hash", "manifest", "prune", "verify"]
    print(f"| model | operation | side | total | {' | '.join(keys)} | other |")
    print("|---|---|---|---|" + "---|" * (len(keys) + 1))
    for res in results:
        for op in ("save", "keeper-same", "keeper-earlier", "load-warm", "load-cold"):
            for side in ("before", "after"):
                totals = res["times"][op][side]
                splits = res["parts"][op][side]
                cols = [median_ms([s.get(k, 0.0) for s in splits]) for k in keys]
                other = median_ms([t - sum(s.values()) for t, s in zip(totals, splits, strict=True)])
                shown = " | ".join(f"{c:.1f}" if c else "–" for c in cols)
                print(
                    f"| {MODEL_NAMES[res['model']]} | {op} | {side} | {median_ms(totals):.1f} | {shown} | {other:.1f} |"
                )
    print()
    for res in results:
        sha = res["times"]["sha256"]["after"]
        mb = res["sizes"]["full"]
        print(
            f"hashlib.sha256 over the {mb:.2f} MB of one full {MODEL_NAMES[res['model']]} checkpoint, cached: "
            f"{cell(sha)} ms ({mb / statistics.median(sha):.0f} MB/s)"
        )


def machine_note(work: Path) -> None:
    df = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True).stdout.strip().splitlines()[-1].split()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"# {work}: {df[1]} on {df[0]}; {os.cpu_count()} CPUs ({cpu}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; python {platform.python_version()}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    if df[1] == "tmpfs":
        print("# warning: tmpfs; fsync costs nothing there, use a disk-backed --dir", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="alternated rounds (after one warm-up round)")
    parser.add_argument("--models", default="mlp,gpt51m", help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the run directories go (a disk)")
    parser.add_argument(
        "--before-tree",
        type=Path,
        default=None,
        help=f"an existing worktree of {BEFORE_COMMIT} (default: make one under /tmp, remove it)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every round's timings here")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    tree, made = before_tree(args.before_tree)
    work = Path(tempfile.mkdtemp(prefix="gw-ckpt-bench-", dir=args.dir))
    try:
        old, old_keeper = load_before(tree)
        import gradwise.store.checkpoint as new

        instrument(old, new)
        print(
            f"# before: {tree}/src/gradwise/train/checkpoint.py ({BEFORE_COMMIT}); "
            f"after: {Path(new.__file__).relative_to(REPO)}",
            flush=True,
        )
        machine_note(work)
        start = time.perf_counter()
        results = [bench_model(model, args.repeats, work, old, old_keeper) for model in models]
        report(results, args.repeats)
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=1))
        print()
        print(
            f"# {time.perf_counter() - start:.0f} s; load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made:
            remove_tree(tree)


if __name__ == "__main__":
    main()
