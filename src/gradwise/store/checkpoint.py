"""Checkpoints without pickle, committed by one manifest: safetensors for tensors, JSON for the rest.

Layout under ``runs/<name>/checkpoints/``::

    step-00000120/     model.safetensors  state.safetensors  state.json
    weights-00000100/  model.safetensors  (a best kept between two full writes)
    manifest.json      {"tags": {"last": "step-00000120", "best": "weights-00000100"}, "steps": …, "files": …}
    last -> step-00000120      (symlinks derived from the manifest, for people and other tools)
    best -> weights-00000100

A run with ``distributed.strategy: fsdp`` writes ``shards/`` (every rank's
shards of the weights and optimizer state, see :mod:`gradwise.store.sharded`)
in place of ``model.safetensors``.

The commit protocol. Checkpoint directories are *staged*: written under a
temporary name, every file fsynced, renamed into place. Then the manifest —
which checkpoint each tag names, at which step, and the size and xxh3-128 digest of
every file of those checkpoints — is written to a temporary file, fsynced
and renamed over ``manifest.json``: that rename is the single commit point.
``last`` and ``best`` are committed together, so they can never disagree
with each other or with the stopper state saved inside ``last``, whatever
instant the process dies at. Only after the commit are the tag links
re-pointed and unreferenced directories deleted; a process that dies in
between leaves stale links or leftovers, which the next writer repairs and
every reader ignores (readers resolve tags through the manifest and verify
the files it lists before loading them). Run directories written before the
manifest existed load through their links.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gradwise.errors import CheckpointError, StorageError
from gradwise.store.files import atomic_write_text, fsync_dir, fsync_file, read_text, storage_error, temporary_name
from gradwise.store.paths import CHECKPOINT_NAME, TAG_LINKS, checkpoint_link_target, inside

MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 8 * 2**20
DIGEST = "xxh3_128"  # the manifest's per-file digest


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


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class Manifest:
    """What is committed under a ``checkpoints/`` directory.

    Attributes:
        tags: Tag (``last``, ``best``) → checkpoint directory name.
        steps: Tag → the optimizer step of its checkpoint.
        files: Checkpoint directory name → relative file path → ``{"bytes": n, "xxh3_128": hex}``.
    """

    tags: dict[str, str] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    files: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {"format": MANIFEST_FORMAT, "tags": self.tags, "steps": self.steps, "files": self.files}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def read_manifest(root: Path) -> Manifest | None:
    """The committed manifest of ``root`` (a ``checkpoints/`` directory), or None for a run made before manifests.

    Raises:
        CheckpointError: the manifest is unreadable, of an unknown format, or names anything but plain
            checkpoint directories of ``root``.
    """
    file = root / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        raw = json.loads(read_text(file, what="manifest"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: corrupt ({exc}); the run's checkpoints cannot be trusted") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{file}: unknown manifest format {got!r}; this gradwise reads format {MANIFEST_FORMAT}")
    tags, steps, files = raw.get("tags"), raw.get("steps"), raw.get("files")
    if not (isinstance(tags, dict) and isinstance(steps, dict) and isinstance(files, dict)):
        raise CheckpointError(f"{file}: corrupt (tags, steps and files must be mappings)")
    for tag, name in tags.items():
        if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name) or not isinstance(files.get(name), dict):
            raise CheckpointError(f"{file}: tag {tag!r} names {name!r}, not a checkpoint of this run")
        if not isinstance(steps.get(tag), int) or isinstance(steps.get(tag), bool):
            raise CheckpointError(f"{file}: tag {tag!r} has no step")
        for relative, described in files[name].items():
            if not isinstance(relative, str) or relative.startswith("/") or ".." in Path(relative).parts:
                raise CheckpointError(f"{file}: file {relative!r} of {name} must be a relative path inside it")
            if not isinstance(described, dict):
                raise CheckpointError(f"{file}: file {relative!r} of {name} has no size and digest")
    return Manifest(tags=dict(tags), steps=dict(steps), files={k: files[k] for k in set(tags.values())})


def commit(root: Path, tags: Mapping[str, tuple[str, int]]) -> Manifest:
    """Commit ``tags`` (tag → (checkpoint name, step)) over the current manifest in one atomic rename.

    Tags not named keep what they named. The files of newly named checkpoints are measured and hashed
    (they were fsynced when staged); then the manifest is written, links re-pointed and unreferenced
    checkpoint directories deleted.
    """
    current = read_manifest(root) or _manifest_from_links(root)
    names = dict(current.tags)
    steps = dict(current.steps)
    for tag, (name, step) in tags.items():
        names[tag], steps[tag] = name, step
    files = {name: current.files.get(name) or _describe_files(root / name) for name in set(names.values())}
    manifest = Manifest(tags=names, steps=steps, files=files)
    try:
        atomic_write_text(root / MANIFEST_FILE, manifest.to_json())
        fsync_dir(root)  # the commit point is durable before anything it replaced is deleted
    except OSError as exc:
        raise storage_error(exc, root / MANIFEST_FILE) from None
    repair(root, manifest)
    return manifest


def add_to_manifest(ckpt: Path) -> None:
    """Re-describe the files of committed checkpoint ``ckpt`` after a file was added to it (consolidation)."""
    root = ckpt.parent
    manifest = read_manifest(root)
    if manifest is None or ckpt.name not in manifest.files:
        return  # a run made before manifests: nothing to update
    files = dict(manifest.files)
    files[ckpt.name] = _describe_files(ckpt)
    try:
        atomic_write_text(root / MANIFEST_FILE, Manifest(manifest.tags, manifest.steps, files).to_json())
    except OSError as exc:
        raise storage_error(exc, root / MANIFEST_FILE) from None


def repair(root: Path, manifest: Manifest) -> None:
    """Point the tag links at what ``manifest`` names and delete what it does not (writers only)."""
    for tag in TAG_LINKS:
        link = root / tag
        name = manifest.tags.get(tag)
        if name is None:
            continue
        if not (link.is_symlink() and os.readlink(link) == name):
            _point_link(link, name)
    fsync_dir(root)
    keep = set(manifest.tags.values())
    for child in root.iterdir():
        if child.name in keep or child.name == MANIFEST_FILE or child.name in TAG_LINKS:
            continue
        if child.name.startswith(".") and ".tmp-" in child.name:
            _remove(child)  # a dead writer's temporary file, link or directory
        elif CHECKPOINT_NAME.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)


def _manifest_from_links(root: Path) -> Manifest:
    """A run made before manifests: what its links name (the first commit replaces them by a manifest)."""
    tags: dict[str, str] = {}
    steps: dict[str, int] = {}
    for tag in TAG_LINKS:
        link = root / tag
        if link.is_symlink() and (root / os.readlink(link)).is_dir():
            name = checkpoint_link_target(link)
            tags[tag], steps[tag] = name, int(name.split("-")[1])
    return Manifest(tags=tags, steps=steps, files={})


def _describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    described: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            described[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, DIGEST: _digest(path)}
    return described


def _digest(path: Path) -> str:
    # xxh3-128, not SHA-256: the digest catches torn, truncated, bit-rotted or half-copied files; whoever can
    # alter a file can rewrite the manifest too, so a cryptographic hash buys nothing here and cost a 51M GPT
    # save 0.5 s (measured: 583 MB in 0.12 s vs 0.48 s, benchmarks/RESULTS.md).
    digest = xxhash.xxh3_128()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def verify(directory: Path, described: Mapping[str, Mapping[str, Any]]) -> None:
    """Check that every file the manifest lists for ``directory`` is there, a plain file, of its size and digest.

    Raises:
        CheckpointError: naming the first file that is missing, a link, truncated or altered.
    """
    if directory.is_symlink() or not directory.is_dir():
        raise CheckpointError(f"{directory}: missing or not a plain directory, but the manifest names it")
    for relative, expected in described.items():
        path = directory / relative
        if path.is_symlink():
            raise CheckpointError(f"{path}: a symbolic link; checkpoint files are never read through links")
        inside(directory, relative, source=directory.parent / MANIFEST_FILE)  # nor through a linked directory
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint is damaged")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {expected.get('bytes')}; damaged")
        if _digest(path) != expected.get(DIGEST):
            raise CheckpointError(f"{path}: contents differ from the manifest's digest; damaged or altered")


def _point_link(link: Path, target_name: str) -> None:
    tmp = temporary_name(link)
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------- staging and saving


def checkpoint_name(step: int, *, weights_only: bool = False) -> str:
    return f"{'weights' if weights_only else 'step'}-{step:08d}"


def committed_names(root: Path) -> set[str]:
    """The checkpoint directories the current manifest (or, for an old run, its links) names."""
    manifest = read_manifest(root) or _manifest_from_links(root)
    return set(manifest.tags.values())


def stage_checkpoint(
    root: Path, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any], *, weights_only: bool = False
) -> str:
    """Write checkpoint ``step`` as a complete directory under ``root`` (not yet committed); its name.

    A directory of that name that is already committed is reused; an uncommitted one (left by a killed
    writer, perhaps of another config) is rewritten. A failure (a full disk) leaves no temporary directory.
    """
    name = checkpoint_name(step, weights_only=weights_only)
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        if name in committed_names(root) and (final / STATE_FILE).exists():
            return name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        _remove(tmp)
        tmp.mkdir()
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
            fsync_file(tmp / MODEL_FILE)
            write_state_files(tmp, state)
            move_into_place(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
    except OSError as exc:
        raise storage_error(exc, root, f"checkpoint {name}") from None
    except SafetensorError as exc:  # safetensors reports a failed write (ENOSPC, EFBIG) as its own error type
        raise StorageError(f"{root / name}: could not write the checkpoint ({exc})") from None
    return name


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    tags: list[str],
    *,
    weights_only: bool = False,
) -> Path:
    """Stage the checkpoint of ``step`` and commit each of ``tags`` (``last``, ``best``) to it."""
    name = stage_checkpoint(root, step, model_state, state, weights_only=weights_only)
    commit(root, {tag: (name, step) for tag in tags})
    return root / name


def write_state_files(directory: Path, state: dict[str, Any]) -> None:
    """The training state beside the weights: tensors in safetensors, the rest in JSON; both fsynced."""
    tensors: dict[str, torch.Tensor] = {}
    meta = flatten_state(state, tensors)
    save_file(tensors, str(directory / TENSORS_FILE))
    (directory / STATE_FILE).write_text(json.dumps(meta))
    for file in (TENSORS_FILE, STATE_FILE):
        fsync_file(directory / file)


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename a fully written checkpoint directory to its final name (replacing an uncommitted leftover)."""
    if final.exists() or final.is_symlink():  # never committed (stage_checkpoint checked): safe to replace
        _remove(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically, replacing (never following) a link at ``path``."""
    tmp = temporary_name(path)
    try:
        _remove(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _remove(tmp)
        raise storage_error(exc, path) from None
    except SafetensorError as exc:
        _remove(tmp)
        raise StorageError(f"{path}: could not write ({exc})") from None


# --------------------------------------------------------------------------- load


def resolve_checkpoint(run_dir: Path, tag: str) -> Path:
    """The directory of checkpoint ``tag`` of a run, verified against the manifest; else one CheckpointError line.

    The manifest, not the ``last``/``best`` links, says which checkpoint a tag is: links may be stale after
    a kill. A run made before manifests resolves through its links, which must name a sibling checkpoint.
    """
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (it does not exist)")
    root = run_dir / "checkpoints"
    manifest = read_manifest(root)
    if manifest is not None:
        name = manifest.tags.get(tag)
        if name is None:
            raise CheckpointError(f"{run_dir}: no '{tag}' checkpoint in {root}")
        path = root / name
        verify(path, manifest.files[name])
        return path
    link = root / tag
    if not link.is_symlink() and not link.exists():
        raise CheckpointError(f"{run_dir}: no '{tag}' checkpoint in {root}")
    if link.is_symlink():
        path = root / checkpoint_link_target(link)
        if not path.is_dir() or path.is_symlink():
            raise CheckpointError(f"{link}: points to a missing checkpoint")
        planted = next((p for p in path.rglob("*") if p.is_symlink()), None)  # no manifest lists its files
        if planted is not None:
            raise CheckpointError(f"{planted}: a symbolic link; checkpoint files are never read through links")
        return path
    raise CheckpointError(f"{link}: not a link to a checkpoint (a run directory written by another tool?)")


def committed_step(run_dir: Path, tag: str) -> int | None:
    """The step the manifest records for ``tag`` (None for a run made before manifests, or no such tag)."""
    manifest = read_manifest(run_dir / "checkpoints")
    return None if manifest is None else manifest.steps.get(tag)


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint directory (safetensors, no pickle).

    A sharded (FSDP) checkpoint without a consolidated ``model.safetensors`` is assembled from its shards.
    """
    if not _listed(ckpt, MODEL_FILE):
        from gradwise.store.sharded import consolidated_model_state, is_sharded

        if is_sharded(ckpt):
            return consolidated_model_state(ckpt)
    return _load_tensors(ckpt / MODEL_FILE)


def _listed(ckpt: Path, relative: str) -> bool:
    """Whether ``relative`` is a committed file of ``ckpt`` (for a run made before manifests: whether it exists)."""
    if not (ckpt / relative).exists():
        return False
    manifest = read_manifest(ckpt.parent)
    if manifest is None:
        return True
    return relative in manifest.files.get(ckpt.resolve().name, {})


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """The full training state saved beside the weights."""
    file = ckpt / STATE_FILE
    try:
        meta = json.loads(read_text(file, what="checkpoint state file"))
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


class CheckpointFiles:
    """The writer of an ordinary (one-process or DDP rank-0) run: stage directories, then commit tags."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def stage(
        self, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any], *, weights_only: bool = False
    ) -> str:
        return stage_checkpoint(self.root, step, model_state, state, weights_only=weights_only)

    def commit(self, tags: Mapping[str, tuple[str, int]]) -> None:
        commit(self.root, tags)
