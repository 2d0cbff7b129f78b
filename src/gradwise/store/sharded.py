"""Sharded checkpoints of FSDP runs with torch.distributed.checkpoint, stored as safetensors.

Layout of one checkpoint (beside the usual ``state.json``/``state.safetensors``
that rank 0 writes for the counters, schedule, sampler, stopper and RNGs)::

    step-00000120/shards/shard-00001-model-00001-of-00002.safetensors   rank 0's shards, in files of
                         shard-00001-model-00002-of-00002.safetensors   about 64 MB of its data
                         shard-00002-model-00001-of-00002.safetensors   rank 1's shards
                         shard-00002-model-00002-of-00002.safetensors

Every rank writes its own shards of the weights (``model.<name>``) and of the
optimizer state (``optim.<name>.<key>``, keyed by parameter name, not by
position) in parallel. Each file records in its safetensors header where its
pieces sit in the full tensors, so ``torch.distributed.checkpoint`` reads them
back into any other layout: resuming with a different number of processes, or
with one process and no sharding at all, is a load like any other. DCP's
default file format keeps its index in a pickle; its Hugging Face storage
layer used here keeps everything in safetensors headers, so loading a
checkpoint never unpickles anything.

``consolidated_model_state`` assembles the full weights in one process (what
``gradwise consolidate`` writes as ``model.safetensors`` for eval, compress
and export).
"""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gradwise.errors import CheckpointError, StorageError
from gradwise.store.checkpoint import (
    STATE_FILE,
    checkpoint_name,
    commit,
    committed_names,
    load_training_state,
    move_into_place,
    write_state_files,
)


class Ranks(Protocol):
    """What a sharded save or load needs of the job (``gradwise.train.distributed.Distributed`` is one).

    A protocol, so the storage layer needs nothing from the training layer above it.
    """

    @property
    def is_main(self) -> bool: ...
    @property
    def active(self) -> bool: ...
    @property
    def world(self) -> int: ...
    def barrier(self) -> None: ...


SHARDS_DIR = "shards"
SHARD_INDEX_FILE = "shards.json"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
SHARD_REF = "__shard__"
# A rank's shards are written in files of about this many bytes (see _file_plan).
SHARD_FILE_BYTES = 64 * 2**20
# DCP says this whenever it runs without a process group, which one-process runs and consolidation do on purpose.
_SINGLE_PROCESS_NOTICE = ".*assuming the intent is to (save|load) in a single process.*"


def _dcp_failure() -> type[BaseException]:
    """DCP's CheckpointException: a BaseException, not an Exception, so it must be named to be caught."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / SHARDS_DIR).is_dir()


class ShardedCheckpointFiles:
    """The writer of an FSDP run: every rank stages its shards together; rank 0 commits the tags.

    Args:
        root: The run's ``checkpoints/`` directory (on a filesystem every rank sees).
        ctx: This process's place in the job.
    """

    def __init__(self, root: Path, ctx: Ranks) -> None:
        self.root = root
        self.ctx = ctx

    def stage(
        self, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any], *, weights_only: bool = False
    ) -> str:
        """Write checkpoint ``step`` with every rank's shards (not yet committed); all ranks call this together.

        Args:
            step: The optimizer step.
            model_state: The model's state dict (sharded DTensors under FSDP, plain tensors otherwise).
            state: The training state; its ``optimizer`` entry, when present, is the name-keyed optimizer
                state dict of ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``.
            weights_only: A ``best`` kept between two full writes: weights, no training state.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        ctx, root = self.ctx, self.root
        name = checkpoint_name(step, weights_only=weights_only)
        final = root / name
        # Every rank decides before the first barrier, so none can see rank 0's finished rename while another
        # did not. Only a committed directory is reused: an uncommitted one may be a killed writer's.
        if name in committed_names(root) and (final / STATE_FILE).exists():
            return name
        tmp = root / f".tmp-{name}-sharded"
        if ctx.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        ctx.barrier()
        shards = {MODEL_PREFIX + key: value for key, value in model_state.items()}
        rest = dict(state)
        if "optimizer" in rest:
            rest["optimizer"] = _shard_references(rest["optimizer"], shards)
        files = _file_plan(shards, ctx.world)
        writer = HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), fqn_to_index_mapping=files, save_distributed=True)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_NOTICE)
                dcp.save(shards, storage_writer=writer, no_dist=not ctx.active)  # returns once every rank has written
        except (OSError, _dcp_failure()) as exc:  # a full disk on any rank arrives as DCP's CheckpointException
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            first_line = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise StorageError(f"{tmp}: could not write the shards of checkpoint {name} ({first_line})") from None
        if ctx.is_main:
            write_state_files(tmp, rest)
            _write_manifest(tmp, shards)
            move_into_place(tmp, final)
        ctx.barrier()
        return name

    def commit(self, tags: Mapping[str, tuple[str, int]]) -> None:
        if self.ctx.is_main:
            commit(self.root, tags)
        self.ctx.barrier()  # nobody reads `last`/`best` before the manifest names complete files


def save_sharded_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    tags: list[str],
    *,
    ctx: Ranks,
    weights_only: bool = False,
) -> Path:
    """Stage checkpoint ``step`` with every rank's shards and commit ``tags`` to it; all ranks call this."""
    files = ShardedCheckpointFiles(root, ctx)
    name = files.stage(step, model_state, state, weights_only=weights_only)
    files.commit({tag: (name, step) for tag in tags})
    return root / name


def _write_manifest(directory: Path, shards: dict[str, torch.Tensor]) -> None:
    """The full shape of every stored tensor, so that a missing shard file is found, not read as garbage.

    The shard files alone cannot tell: their headers give each piece's offset, and a tensor whose first
    rank's file is gone still looks whole-sized from the last rank's piece.
    """
    import json
    import os

    manifest = {"tensors": {key: list(tensor.shape) for key, tensor in shards.items()}}
    with open(directory / SHARD_INDEX_FILE, "w") as handle:
        handle.write(json.dumps(manifest))
        handle.flush()
        os.fsync(handle.fileno())


def _file_plan(shards: dict[str, torch.Tensor], world: int) -> dict[str, int]:
    """Which file (1, 2, …) each tensor goes to: consecutive tensors, about SHARD_FILE_BYTES of a rank's data each.

    A rank serializes one file at a time and holds about twice that file in memory meanwhile (DCP copies each
    shard out of FSDP's padded buffer, then safetensors builds the file's bytes); bounded files bound that
    transient, which would otherwise be twice the rank's whole state. The plan is made from full tensor sizes,
    the same on every rank, as the writer requires.
    """
    plan: dict[str, int] = {}
    index, filled = 1, 0
    for key, tensor in shards.items():
        size = tensor.numel() * tensor.element_size() // max(world, 1)  # about one rank's part of it
        if filled and filled + size > SHARD_FILE_BYTES:
            index, filled = index + 1, 0
        plan[key] = index
        filled += size
    return plan


def _shard_references(optimizer_state: dict[str, Any], shards: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer state dict with each tensor moved into ``shards`` and replaced by a reference to its key."""
    state: dict[str, dict[str, Any]] = {}
    for param, entry in optimizer_state["state"].items():
        state[param] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                shard_key = f"{OPTIM_PREFIX}{param}.{key}"
                shards[shard_key] = value
                state[param][key] = {SHARD_REF: shard_key}
            else:
                state[param][key] = value
    return {"state": state, "param_groups": optimizer_state["param_groups"]}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (each tensor a shard under FSDP), for a sharded checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _torch_optimizers(optimizer))


def _torch_optimizers(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | tuple[torch.optim.Optimizer, ...]:
    """A composite optimizer (Muon with AdamW) is its inner torch optimizers for the state-dict API."""
    return getattr(optimizer, "inner_optimizers", optimizer)


def load_sharded_checkpoint(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *, ctx: Ranks
) -> dict[str, Any]:
    """Load the weights (and the optimizer state) of a sharded checkpoint into the model's current layout.

    All ranks call this together. Returns the rest of the training state (empty for a weights-only ``best``).
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = load_training_state(ckpt) if optimizer is not None else {}
    model_state = get_model_state_dict(model)
    targets = {MODEL_PREFIX + key: value for key, value in model_state.items()}
    saved_optimizer = state.pop("optimizer", None)
    if optimizer is not None:
        if saved_optimizer is None:
            raise CheckpointError(f"{ckpt}: no optimizer state in {STATE_FILE}; it is not a training checkpoint")
        # Creates the optimizer's state tensors (one zero step) so that there is a place to load them into.
        template = get_optimizer_state_dict(model, _torch_optimizers(optimizer))
        for param, entry in saved_optimizer["state"].items():
            for key, value in entry.items():
                if isinstance(value, dict) and SHARD_REF in value:
                    try:
                        targets[value[SHARD_REF]] = template["state"][param][key]
                    except KeyError:
                        raise CheckpointError(
                            f"{ckpt}: optimizer state {param}.{key} has no counterpart in this run's optimizer"
                        ) from None
    _read_shards(ckpt, targets, no_dist=not ctx.active)
    set_model_state_dict(model, model_state)
    if optimizer is not None and saved_optimizer is not None:
        loaded = {
            "state": {
                param: {key: _resolve(value, targets) for key, value in entry.items()}
                for param, entry in saved_optimizer["state"].items()
            },
            "param_groups": saved_optimizer["param_groups"],
        }
        set_optimizer_state_dict(model, _torch_optimizers(optimizer), loaded)
    return state


def load_full_checkpoint_into_sharded(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, ctx: Ranks
) -> dict[str, Any]:
    """Load an ordinary checkpoint (full weights, position-keyed optimizer state) into a fully sharded model.

    What lets a run started without FSDP continue with it. Every rank reads the whole files and keeps its
    shards. Returns the rest of the training state.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if hasattr(optimizer, "inner_optimizers"):
        raise CheckpointError(
            f"{ckpt}: an ordinary checkpoint of a composite optimizer (muon) cannot be resharded; resume it with "
            "distributed.strategy=ddp"
        )
    load_full_weights_into_sharded(ckpt, model)
    state = load_training_state(ckpt)
    saved = state.pop("optimizer")
    # Positions (torch's optimizer state keys) become parameter names through the same group order.
    named_groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    if [len(g["params"]) for g in named_groups] != [len(g["params"]) for g in saved["param_groups"]]:
        raise CheckpointError(f"{ckpt}: optimizer state does not match this run's parameter groups")
    name_of = {
        position: name
        for named, group in zip(named_groups, saved["param_groups"], strict=True)
        for position, name in zip(group["params"], named["params"], strict=True)
    }
    by_name = {
        "state": {name_of[position]: entry for position, entry in saved["state"].items()},
        "param_groups": [{**group, "params": [name_of[p] for p in group["params"]]} for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    return state


def load_full_weights_into_sharded(ckpt: Path, model: nn.Module) -> None:
    """Load an ordinary checkpoint's full weights into a fully sharded model (each rank keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from gradwise.store.checkpoint import load_model_state

    full = load_model_state(ckpt)
    own = {key: tuple(value.shape) for key, value in get_model_state_dict(model).items()}
    if set(own) != set(full) or any(own[key] != tuple(full[key].shape) for key in own):
        raise CheckpointError(f"{ckpt}: weights do not match the model (names or shapes differ)")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


def _resolve(value: Any, targets: dict[str, torch.Tensor]) -> Any:
    return targets[value[SHARD_REF]] if isinstance(value, dict) and SHARD_REF in value else value


def _read_shards(ckpt: Path, targets: dict[str, torch.Tensor], *, no_dist: bool) -> None:
    """Fill ``targets`` in place from the shards, checking names and full shapes first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shards = ckpt / SHARDS_DIR
    stored = _stored_tensors(ckpt)
    missing = sorted(set(targets) - set(stored))
    if missing:
        shown = ", ".join(key.removeprefix(MODEL_PREFIX) for key in missing[:5])
        raise CheckpointError(f"{shards}: does not match this run (missing: {shown})")
    for key, target in targets.items():
        if tuple(stored[key][0]) != tuple(target.shape):
            raise CheckpointError(
                f"{shards}: {key} has shape {tuple(stored[key][0])} in the checkpoint but {tuple(target.shape)} here"
            )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_NOTICE)
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(shards)), no_dist=no_dist)
    except (Exception, _dcp_failure()) as exc:  # DCP wraps every rank's failure in a CheckpointException
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise CheckpointError(f"{shards}: unreadable ({type(exc).__name__}: {first_line})") from None


def _stored_tensors(ckpt: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Full shape and dtype of every tensor in a checkpoint's shards (read from the safetensors headers)."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shards = ckpt / SHARDS_DIR
    if not any(shards.glob("*.safetensors")):
        raise CheckpointError(f"{shards}: no shard files; the checkpoint is incomplete")
    try:
        metadata = HuggingFaceStorageReader(str(shards)).read_metadata()
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{shards}: corrupt shard file ({type(exc).__name__}: {exc})") from None
    stored = metadata.state_dict_metadata
    for key, meta in stored.items():
        pieces = sum(math.prod(chunk.sizes) for chunk in meta.chunks)
        if pieces != math.prod(meta.size):
            raise CheckpointError(f"{shards}: {key} is incomplete ({pieces} of {math.prod(meta.size)} values stored)")
    manifest = _read_manifest(ckpt)
    if manifest is not None:
        for key, shape in manifest.items():
            if key not in stored or list(stored[key].size) != shape:
                raise CheckpointError(f"{shards}: {key} is missing or incomplete; a shard file is missing")
    return {key: (meta.size, meta.properties.dtype) for key, meta in stored.items()}


def _read_manifest(ckpt: Path) -> dict[str, list[int]] | None:
    import json

    file = ckpt / SHARD_INDEX_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())["tensors"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: corrupt ({exc})") from None


def consolidated_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full weights of a sharded checkpoint, assembled in this process (no process group needed)."""
    stored = _stored_tensors(ckpt)
    full = {
        key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in stored.items() if key.startswith(MODEL_PREFIX)
    }
    _read_shards(ckpt, full, no_dist=True)
    return {key.removeprefix(MODEL_PREFIX): value for key, value in full.items()}


def consolidate(ckpt: Path, out: Path | None = None) -> Path:
    """Write the full weights of sharded checkpoint ``ckpt`` as one safetensors file (default: its model.safetensors).

    The file is written under a temporary name and renamed, so a reader never sees half of it; written into
    the checkpoint, it is added to the manifest (readers trust only the files the manifest lists).
    """
    from gradwise.store.checkpoint import MODEL_FILE, add_to_manifest, save_tensors

    if not is_sharded(ckpt):
        raise CheckpointError(f"{ckpt}: not a sharded checkpoint (no {SHARDS_DIR}/ directory); nothing to consolidate")
    target = out if out is not None else ckpt / MODEL_FILE
    save_tensors(target, consolidated_model_state(ckpt))
    if out is None:
        add_to_manifest(ckpt)
    return target
