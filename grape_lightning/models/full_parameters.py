"""Full parameters for generation and export under strategies that shard them (FSDP, DeepSpeed ZeRO-3).

Decoding runs a data-dependent number of forward passes: a rank stops when all of its rows have
stopped. Under a sharded strategy a forward pass may gather parameters from every rank, a
collective that all ranks must join, so a rank that stops early would leave the others waiting
forever. :func:`full_parameters` gathers the full parameters once, on every rank in the same order,
and lets the forward passes inside run on them with no collective:

- DDP, DeepSpeed ZeRO-1/2, one device: parameters are whole already; nothing to do.
- FSDP (``strategy="fsdp"``, PyTorch ``FullyShardedDataParallel``): Lightning wraps the whole
  LightningModule as the root FSDP unit. Inside ``training_step`` and ``validation_step`` (which
  Lightning runs through the root's forward) its parameters are unsharded already; outside (the
  initial evaluation in ``on_train_start``, export) they are summoned with
  ``summon_full_params``. Forward passes of plain submodules (``self.policy``) inside run no FSDP
  hook. Policies split into nested FSDP units (an ``auto_wrap_policy``) gather and free each
  unit on every forward, so decoding under them is refused with an explanation instead of risking
  a hang.
- FSDP2 (``ModelParallelStrategy``, :mod:`grape_lightning.models.sharding`): every unit of the
  target is unsharded (in module order, the same on every rank) and kept unsharded across forward
  passes; resharded at the end of the block.
- DeepSpeed ZeRO-3: ``GatheredParameters`` over all parameters, with the ZeRO-3 module hooks
  (which fetch and release parameters around every submodule's forward) removed for the block and
  registered again after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from torch import nn


def _fsdp_root(module: L.LightningModule) -> nn.Module | None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = module.trainer.strategy.model
    return model if isinstance(model, FullyShardedDataParallel) else None


def _zero3_engine(module: L.LightningModule):  # -> deepspeed.DeepSpeedEngine | None
    strategy = module.trainer.strategy
    if "deepspeed" not in type(strategy).__name__.lower():
        return None
    engine = strategy.model
    optimizer = getattr(engine, "optimizer", None)
    return engine if optimizer is not None and hasattr(optimizer, "parameter_offload") else None


@contextmanager
def _fsdp_full_parameters(root: nn.Module, target: nn.Module, forward: bool) -> Iterator[None]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import TrainingState

    nested = [m for m in target.modules() if isinstance(m, FullyShardedDataParallel)]
    if nested and forward:
        raise RuntimeError(
            "generation under FSDP needs the policy inside the root FSDP unit: nested FSDP units (an "
            "auto_wrap_policy) gather and free their parameters on every forward, a collective that ranks "
            "decoding different numbers of tokens cannot all join. Use strategy 'fsdp' without auto_wrap_policy, "
            "or DeepSpeed ZeRO-3, or DDP with LoRA; see docs/scaling.md."
        )
    if root.training_state == TrainingState.IDLE:  # outside the root's forward: parameters are sharded
        with FullyShardedDataParallel.summon_full_params(root, recurse=True, writeback=False):
            yield
    else:  # inside training_step / validation_step: the root's forward has unsharded them
        yield


@contextmanager
def _zero3_full_parameters(engine, target: nn.Module, forward: bool) -> Iterator[None]:
    import deepspeed

    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params
    except ImportError:  # deepspeed < 0.16
        from deepspeed.runtime.zero.partition_parameters import iter_params

    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(target.parameters()), modifier_rank=None):
        if not forward:
            yield
            return
        for parameter in iter_params(offload.module, recurse=True):
            parameter.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            coordinator = getattr(offload, "param_coordinator", None)
            if coordinator is not None and not coordinator.is_invalid_trace():
                coordinator._invalidate_trace()  # the recorded fetch order no longer holds
            offload._register_deepspeed_module(offload.module)


@contextmanager
def _fsdp2_full_parameters(units: list[nn.Module], forward: bool) -> Iterator[None]:
    def reshards(unit: nn.Module) -> bool:
        group = unit._get_fsdp_state()._fsdp_param_group
        return group is not None and group.post_forward_mesh_info is not None

    groups = {}  # one module per unit: the modules of a grouped unit (tied embeddings) share its state
    for unit in units:
        groups.setdefault(id(unit._get_fsdp_state()), unit)
    units = list(groups.values())
    after_forward = [reshards(unit) for unit in units]
    for unit in units:
        unit.unshard()  # an all-gather per unit, in the same order on every rank
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit, reshard in zip(units, after_forward):
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


@contextmanager
def full_parameters(module: L.LightningModule, target: nn.Module, forward: bool = True) -> Iterator[nn.Module]:
    """``target`` (``module`` or a submodule, e.g. the policy) with its full parameters, for forward
    passes without collectives inside the block (``forward=False``: only to read them, e.g. to
    export). Every rank must enter it, in the same order (it may gather)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in target.modules() if isinstance(m, FSDPModule)]
    if not units and module._trainer is None:
        yield target
        return
    root = _fsdp_root(module) if not units else None
    engine = _zero3_engine(module) if root is None and not units else None
    if units:
        with _fsdp2_full_parameters(units, forward):
            yield target
    elif root is not None:
        with _fsdp_full_parameters(root, target, forward):
            yield target
    elif engine is not None:
        with _zero3_full_parameters(engine, target, forward):
            yield target
    else:
        yield target
