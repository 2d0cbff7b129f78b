"""Data-parallel training on torch.distributed: who this process is, and the few collectives the loop needs.

A run under ``torchrun`` (or ``gradwise train --nproc N``, which launches it)
has ``WORLD_SIZE > 1`` in its environment. Every rank builds the same run
from the same config and seed, so the sampler draws the same *global* batch
on every rank; each rank then takes its stride of it (``rows[rank::world]``).
The global batch size is therefore the config's ``batch.size`` whatever the
world size, the sampler's state is the same two integers on every rank, and a
run saved with N processes resumes with M. Gradients are averaged by
DistributedDataParallel; metrics are summed from each rank's sufficient
statistics, never averaged averages. Only rank 0 writes the run directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gradwise.errors import ConfigError

# A rank that died makes the others fail a collective after this long instead of waiting forever
# (distributed.timeout_s in the config).
COLLECTIVE_TIMEOUT_S = 300.0

# How torch 2.13's backends word a collective that waited its timeout out: gloo "Timed out waiting 5000ms for
# recv operation to complete", NCCL's watchdog "... ran for 5012 milliseconds before timing out." and its
# blocking wait "... timed out in blocking wait", the c10d store "wait timeout after 5000ms". NCCL's
# "Some NCCL operations have failed or timed out" does not say which, so it does not count.
_TIMED_OUT = re.compile(r"(?<!failed or )timed out|timing out|wait timeout", re.IGNORECASE)
# The "[.../gloo/transport/tcp/unbound_buffer.cc:78] " or "[PG ID 0 PG GUID 0(default_pg) Rank 0] " prefixes.
_BRACKETED_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; ``world == 1`` is an ordinary single-process run."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes the run directory."""
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's stride of a global batch (or split) of row indices."""
        return rows[self.rank :: self.world] if self.active else rows

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks (returned on every rank)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``tensor`` over all ranks (returned on every rank)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.active:
            return tensor
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=op)
        return reduced

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (stop decisions must agree)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a run directory name, say)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Distributed:
    """The job this process belongs to, joining its process group on first call (torchrun's variables).

    Args:
        timeout_s: How long a collective waits for a peer before failing (only used when joining).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        # On GPUs NCCL carries the CUDA tensors and gloo the small CPU ones (stop flags, metric sums, sizes).
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before NCCL picks a device
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"torch.distributed: cannot join the job (WORLD_SIZE={world}, "
                f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): "
                f"{str(exc).splitlines()[0]}"
            ) from None
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size())


def lost_a_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank went away (gloo reports it as a plain RuntimeError)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        mark in text for mark in ("gloo", "NCCL", "c10d", "Connection reset by peer", "Connection closed by peer")
    )


def peer_failure_message(exc: BaseException, rank: int, step: int, kept: str) -> str:
    """The one line a rank reports when a collective failed under it (``lost_a_peer`` said so).

    A timeout means this rank waited ``distributed.timeout_s`` for a peer that neither answered nor went
    away (stopped, hung, or much slower): this rank only waited, so the line says so instead of calling
    it a failure; which peer it was only the launcher can tell. Anything else (a closed connection, ranks
    that diverged) keeps the general wording.

    Args:
        exc: The exception the collective raised.
        rank: This process's rank.
        step: The step the collective belonged to (the loop's ``counters.step + 1``).
        kept: What the run directory still holds, e.g. ``"checkpoint 'last' (step 40) is kept"``.
    """
    first = (str(exc).splitlines() or [""])[0]  # an exception with no text has no first line
    if isinstance(exc, TimeoutError) or _TIMED_OUT.search(first):
        cause = _BRACKETED_PREFIX.sub("", first)[:200]
        return f"rank {rank} timed out waiting for a peer at step {step} ({cause}); {kept}"
    return (
        f"rank {rank}: a collective failed at step {step} ({type(exc).__name__}: {first[:200]}); another rank "
        f"died or stopped answering, or the ranks diverged; {kept}"
    )


def shutdown() -> None:
    """Leave the process group (at the end of a distributed command)."""
    if dist.is_initialized():
        dist.destroy_process_group()
