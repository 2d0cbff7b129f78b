"""Checkpoints without pickle: safetensors for tensors, JSON for the rest.

Layout under ``runs/<name>/checkpoints/``::

    step-00000120/     model.safetensors  state.safetensors  state.json
    weights-00000100/  model.safetensors  (a best kept between two full writes)
    last -> step-00000120      (symlinks, replaced atomically)
    best -> weights-00000100

A run with ``distributed.strategy: fsdp`` writes ``shards/`` (every rank's
shards of the weights and optimizer state, see ``sharded_checkpoint``) in
place of ``model.safetensors``; ``gradwise consolidate`` adds the single file.

A step directory is written under a temporary name, every file fsynced, then
renamed into place; only then is the ``last``/``best`` link swapped with
``os.replace``. A run killed at any instant therefore leaves the previous
checkpoint loadable, and loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gradwise.errors import CheckpointError

MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"


# --------------------------------------------------------------------------- nested state <-> (json, tensors)


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in a nested structure by a reference, collecting the tensors.

    Dicts with non-string keys (torch optimizer state is keyed by int) and
    tuples are tagged so :func:`unflatten_state` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[k, flatten_state(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint without pickle")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# --------------------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _point_link(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    tags: list[str],
    *,
    weights_only: bool = False,
) -> Path:
    """Write the checkpoint of ``step`` (once) and point each tag (``last``, ``best``) at it.

    A ``weights_only`` checkpoint lives under its own name, so a full checkpoint
    of the same step can never be mistaken for it (``last`` must always hold
    the whole training state).
    """
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step, weights_only=weights_only)
    final = root / name
    if not (final / STATE_FILE).exists():
        tmp = root / f".tmp-{name}-{os.getpid()}"  # pruned by a later save if this process dies
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
        fsync_file(tmp / MODEL_FILE)
        write_state_files(tmp, state)
        move_into_place(tmp, final)
    point_tags(root, name, tags)
    return final


def checkpoint_name(step: int, *, weights_only: bool = False) -> str:
    return f"{'weights' if weights_only else 'step'}-{step:08d}"


def write_state_files(directory: Path, state: dict[str, Any]) -> None:
    """The training state beside the weights: tensors in safetensors, the rest in JSON; both fsynced."""
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten_state(state, tensors)
    save_file(tensors, str(directory / TENSORS_FILE))
    (directory / STATE_FILE).write_text(json.dumps(meta))
    for file in (TENSORS_FILE, STATE_FILE):
        fsync_file(directory / file)


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename a fully written checkpoint directory to its final name (replacing a half-written leftover)."""
    if final.exists():  # a half-written leftover from a killed run: never pointed to by a tag
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def point_tags(root: Path, name: str, tags: list[str]) -> None:
    """Point each tag (``last``, ``best``) at checkpoint ``name`` and delete what no tag points to."""
    for tag in tags:
        _point_link(root / tag, name)
    fsync_dir(root)
    _prune(root)


def _prune(root: Path) -> None:
    """Delete step directories no tag points to (and temporaries of dead writers)."""
    keep = {os.readlink(root / tag) for tag in ("last", "best") if (root / tag).is_symlink()}
    for child in root.iterdir():
        if child.is_symlink() or child.name in keep:
            continue
        if child.name.startswith(("step-", "weights-", ".tmp-")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def resolve_checkpoint(run_dir: Path, tag: str) -> Path:
    """The directory of checkpoint ``tag`` of a run, or a CheckpointError naming what is missing."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (it does not exist)")
    path = run_dir / "checkpoints" / tag
    if not path.exists():
        raise CheckpointError(f"{run_dir}: no '{tag}' checkpoint in {run_dir / 'checkpoints'}")
    return path


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint directory (safetensors, no pickle).

    A sharded (FSDP) checkpoint without a consolidated ``model.safetensors`` is assembled from its shards.
    """
    if not (ckpt / MODEL_FILE).exists():
        from gradwise.train.sharded_checkpoint import consolidated_model_state, is_sharded

        if is_sharded(ckpt):
            return consolidated_model_state(ckpt)
    return _load_tensors(ckpt / MODEL_FILE)


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """The full training state saved beside the weights."""
    file = ckpt / STATE_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt ({exc})") from None
    return unflatten_state(meta, _load_tensors(ckpt / TENSORS_FILE))


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt or not a safetensors file ({exc})") from None


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights strictly; a mismatch names the missing/unexpected keys or the first bad shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing: {', '.join(missing[:5]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensor.shape)} in the checkpoint but {tuple(own[key].shape)} "
                "in the model"
            )
    model.load_state_dict(state)
