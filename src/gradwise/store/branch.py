"""A run branched from another run's checkpoint, to continue it with a changed optimization.

A resumed run may change only its budget and logging (``rundir.check_resumable``): anything else would
make "resume" mean something other than "the same run, continued". After a divergence, though, the user
wants exactly that: the kept checkpoint with a lower learning rate or clipping. A branch is a new run
directory holding a copy of the checkpoint, the metrics up to it and a ``lineage.json`` that names the
parent, the checkpoint, its step and what changed; the parent is only read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gradwise.config import RunConfig, read_saved_config, validate
from gradwise.errors import CheckpointError
from gradwise.store import lock as run_lock
from gradwise.store.checkpoint import commit, move_into_place, read_manifest, resolve_checkpoint
from gradwise.store.files import atomic_write_text, fsync_dir, fsync_file, read_text
from gradwise.store.records import DATA_INFO_FILE, TOKENIZER_DIR, copy_file_into, copy_tree_into
from gradwise.store.rundir import CONFIG_FILE, METRICS_FILE, config_differences, new_run_dir, write_config

LINEAGE_FILE = "lineage.json"
# A branch continues the parent's training state with a changed optimization; what would make that state
# meaningless (other data, another model, another numeric format) may not change.
_BRANCH_FIXED = (
    "data.",
    "model.",
    "seed",
    "precision",
    "finetune.",
    "distill.",
    "prune.",
    "qat.",
    "distributed.mixed_precision",
)


def _copy_checkpoint(source: Path, root: Path) -> str:
    """Copy a checkpoint directory into ``root`` as a staged one: under a temporary name, fsynced, renamed."""
    tmp = root / f".tmp-{source.name}-{os.getpid()}"
    shutil.copytree(source, tmp)  # files, not links: a verified checkpoint holds none
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    move_into_place(tmp, root / source.name)
    return source.name


def branched_at(run_dir: Path) -> tuple[int, set[str]] | None:
    """The step a branched run started from and the config paths it changed (``lineage.json``); None if no branch."""
    file = run_dir / LINEAGE_FILE
    if not file.is_file():
        return None
    try:
        lineage = json.loads(read_text(file, what="lineage file"))
        step, changes = lineage.get("step"), set(lineage.get("changes", {}))
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{file}: corrupt ({exc})") from None
    return (step, changes) if isinstance(step, int) else None


def branch_run(parent: Path, tag: str, cfg: RunConfig, default_name: str) -> Path:
    """Start a new run directory from checkpoint ``tag`` of ``parent``, to continue with a changed config.

    The checkpoint (and the parent's best, which its stopper state refers to), the metrics up to it, the data
    record and the tokenizer are copied; ``config.yaml`` is the new config, and ``lineage.json`` records the
    parent, the checkpoint, its step and what changed. The parent is only read. Resuming the new directory
    then continues from the copied checkpoint with the new optimization (learning rate, clipping, schedule…).

    Raises:
        CheckpointError: ``tag`` is not a full checkpoint, or ``cfg`` changes what the state depends on.
    """
    saved_file = parent / CONFIG_FILE
    if not saved_file.exists():
        raise CheckpointError(f"{parent}: not a run directory ({CONFIG_FILE} is missing)")
    saved = validate(read_saved_config(saved_file), source=str(saved_file))
    changes = config_differences(saved.model_dump(mode="json"), cfg.model_dump(mode="json"))
    for path, (old, new) in changes.items():
        if path.startswith(_BRANCH_FIXED):
            raise CheckpointError(
                f"{parent}: a branch cannot change {path} ({old!r} → {new!r}); its checkpoint's weights and state "
                f"depend on it (fixed: {', '.join(_BRANCH_FIXED)})"
            )
    ckpt = resolve_checkpoint(parent, tag)
    if not (ckpt / "state.json").exists() or ckpt.name.startswith("weights-"):
        raise CheckpointError(
            f"{ckpt}: holds weights only (a best kept between two full checkpoints); branch from last"
        )
    manifest = read_manifest(parent / "checkpoints")
    steps = manifest.steps if manifest is not None else {}
    step = steps.get(tag, int(ckpt.name.split("-")[1]))
    target = new_run_dir(cfg.model_copy(update={"name": cfg.name if "name" in changes else None}), default_name)
    lineage = {
        "parent": str(parent.resolve()),
        "checkpoint": tag,
        "step": step,
        "changes": {path: {"from": old, "to": new} for path, (old, new) in sorted(changes.items())},
    }
    with run_lock.holding(target):
        # The config and lineage first, the commit last: a branch killed halfway is a run that never started.
        write_config(target, cfg.model_copy(update={"name": target.name, "out_dir": target.parent}))
        atomic_write_text(target / LINEAGE_FILE, json.dumps(lineage, indent=1) + "\n")
        for name in (METRICS_FILE, DATA_INFO_FILE):
            if (parent / name).is_file():
                copy_file_into(parent / name, target / name)
        copy_tree_into(parent / TOKENIZER_DIR, target / TOKENIZER_DIR)
        root = target / "checkpoints"
        root.mkdir()
        tags = {"last": (_copy_checkpoint(ckpt, root), step)}
        if tag == "best":
            tags["best"] = tags["last"]
        elif manifest is None or "best" in manifest.tags:  # the best the copied stopper state refers to
            best = parent / "checkpoints" / "best"
            if manifest is not None or best.is_symlink():
                best_dir = resolve_checkpoint(parent, "best")
                name = best_dir.name if best_dir.name == ckpt.name else _copy_checkpoint(best_dir, root)
                tags["best"] = (name, steps.get("best", int(best_dir.name.split("-")[1])))
        commit(root, tags)
    return target
