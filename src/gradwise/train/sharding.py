"""How the model is spread over the ranks of a job: replicated (DDP) or fully sharded (FSDP2).

Under ``distributed.strategy: fsdp`` every *block* of the model and then the
model itself go through FSDP2's ``fully_shard``: each rank keeps 1/N of every
parameter (a DTensor sharded on dim 0), the optimizer built afterwards keeps
1/N of its state, a block's full weights exist only while it runs (all-gather
before its forward and backward, reduce-scatter of its gradients after).
Per-block units are what lets the next block's all-gather overlap this one's
compute, and what bounds the transient full-weight memory to one block.

References:
    Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models";
    Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from gradwise.config import DistributedConfig
from gradwise.errors import ConfigError, GradwiseWarning
from gradwise.train.distributed import Distributed

MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16}


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that become their own FSDP units: the items of the model's first stack of layers.

    The first ``ModuleList``/``Sequential`` (in definition order) with at least two children that hold
    parameters is the stack: a transformer's layers, an MLP's hidden blocks, a CNN's convolution stages.
    Whatever is left (embeddings, the head) belongs to the root unit.
    """
    for module in model.modules():
        if module is model or not isinstance(module, nn.ModuleList | nn.Sequential):
            continue
        holders = [child for child in module.children() if any(True for _ in child.parameters())]
        if len(holders) >= 2:
            return holders
    return []


def fully_shard_model(model: nn.Module, cfg: DistributedConfig, device: torch.device) -> nn.Module:
    """Apply FSDP2 to every block of ``model`` and to its root (in place; the same object is returned).

    The optimizer must be built after this: ``fully_shard`` replaces each parameter by a sharded one.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError(
            f"distributed.cpu_offload moves FSDP shards to CPU memory between uses; the model is already on {device}"
        )
    policy = (
        MixedPrecisionPolicy(param_dtype=MIXED_PRECISION_DTYPES[cfg.mixed_precision], reduce_dtype=torch.float32)
        if cfg.mixed_precision
        else MixedPrecisionPolicy()
    )
    options: dict[str, Any] = {
        "mp_policy": policy,
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, reshard_after_forward=cfg.reshard_after_forward, **options)
    # The root's parameters are gathered for the whole step anyway: keeping them saves one all-gather.
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward and not units, **options)
    return model


def is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of a micro-batch that is not a step's last one."""
    if enabled:
        yield
        return
    if is_fully_sharded(net):
        net.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)  # type: ignore[operator]
        return
    with net.no_sync() if hasattr(net, "no_sync") else nullcontext():  # type: ignore[operator]
        yield


def local_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes this rank holds for ``tensors`` (a sharded tensor counts only its local shard)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the training state: parameters and optimizer state, in bytes."""
    if is_fully_sharded(model):
        from torch.distributed.fsdp import FSDPModule

        # The root unit keeps its gathered weights after an evaluation forward (no backward frees them).
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    optimizer_tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"parameters": local_bytes(list(model.parameters())), "optimizer": local_bytes(optimizer_tensors)}


def wrap_for_ranks(model: nn.Module, ctx: Distributed, *, gradual_unfreezing: bool = False) -> nn.Module:
    """The module the forward passes go through: DistributedDataParallel around ``model`` on several ranks.

    A fully sharded model (``distributed.strategy: fsdp``, sharded by ``build_run``) is its own wrapper;
    one process uses the model itself.
    """
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if gradual_unfreezing:
        raise ConfigError(
            "finetune.unfreeze_every_epochs cannot run data-parallel: DDP fixes the trainable parameters when it "
            "wraps the model, so layers unfrozen later would never be synchronised; use one process"
        )
    device = next(model.parameters()).device
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if device.type == "cuda" and not is_fully_sharded(model):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics of the global batch, as on 1 GPU
        else:
            warnings.warn(
                "model.norm=batch under data parallel on CPU: each rank normalises with its own part of the batch "
                "(SyncBatchNorm needs CUDA), so the run is close to, not equal to, a single-process run",
                GradwiseWarning,
                stacklevel=3,
            )
    if is_fully_sharded(model):
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
