"""The LightningModule base every algorithm extends: models, optimizer, plain hyper-parameters."""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import lightning as L
import torch
from torch import Tensor

from grape_lightning.algorithms.optim import OptimizerConfig, build_optimizer, fused_optimizer_allowed
from grape_lightning.models.compile import compile_decoder_layers, compile_wanted
from grape_lightning.models.policy_mixin import PolicyModelsMixin
from grape_lightning.models.sharding import shard_causal_lm, shard_value_model


def as_dataclass(value: Any, cls: type) -> Any:
    """Accept a dataclass instance or its fields as a dict (as stored in checkpoints)."""
    return cls(**value) if isinstance(value, dict) else value


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """Checkpoints hold only plain types, so they load with ``torch.load(weights_only=True)``:
    dataclasses become dicts; other objects (reward functions, tasks) become None and are passed
    again when a checkpoint is loaded in Python (runs of the ``grape`` command store their config)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value if isinstance(value, _PLAIN_SCALARS) else None


def save_plain_hyperparameters(module: L.LightningModule, frame: types.FrameType | None = None, **values: Any) -> None:
    """``save_hyperparameters`` of the ``__init__`` arguments (of ``frame``, by default the caller's),
    made plain (see :func:`_plain`); ``values`` adds or replaces entries (resolved dataclasses)."""
    module.save_hyperparameters(frame=frame or inspect.currentframe().f_back)  # type: ignore[union-attr]
    module.hparams.update(values)
    for key, value in list(module.hparams.items()):
        module.hparams[key] = _plain(value)


def log_stage(
    module: L.LightningModule, stage: str, metrics: dict[str, Any], batch_size: int, prog_bar: tuple[str, ...] = ("loss",)
) -> None:
    """Log ``metrics`` as ``<stage>/<name>``: per step while training, as batch-size-weighted epoch
    means in validation; both averaged over the ranks, so a multi-process run logs statistics of
    its global batch (every rank's batch has the same size)."""
    training = stage == "train"
    for name, value in metrics.items():
        module.log(
            f"{stage}/{name}", value, prog_bar=name in prog_bar, on_step=training, on_epoch=not training,
            batch_size=max(batch_size, 1), sync_dist=True,
        )


class PolicyModule(PolicyModelsMixin, L.LightningModule):
    """Base of the algorithm modules. Subclasses call :meth:`build_models` and define the steps.

    Args:
        optimizer: AdamW and learning-rate schedule (:class:`OptimizerConfig`; defaults when None).
    """

    differentiates_twice = False
    """True for an algorithm whose step takes second derivatives through the model (TRPO's
    Fisher-vector products): compiled decoder layers have no double backward, so its layers stay
    eager."""

    def __init__(self, optimizer: OptimizerConfig | dict | None = None) -> None:
        super().__init__()
        self.optimizer_config: OptimizerConfig = as_dataclass(optimizer, OptimizerConfig) or OptimizerConfig()

    def save_plain_hyperparameters(self, **values: Any) -> None:
        save_plain_hyperparameters(self, inspect.currentframe().f_back, **values)  # type: ignore[union-attr]

    # -- across processes ------------------------------------------------------------------------
    def sum_across_processes(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes of the run (itself in one process or without
        a trainer). Every process must call it, in the same order."""
        if self._trainer is None:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def max_across_processes(self, tensor: Tensor) -> Tensor:
        """The elementwise maximum of ``tensor`` over the processes of the run (itself in one
        process or without a trainer). Every process must call it, in the same order."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="max")

    def gather_counts(self, count: int) -> list[int]:
        """``count`` of every process, in rank order (``[count]`` in one process or without a trainer).
        Every process must call it, in the same order."""
        if self._trainer is None or self.trainer.world_size == 1:
            return [count]
        gathered = self.trainer.strategy.all_gather(torch.tensor([count], device=self.device))
        return [int(value) for value in gathered.flatten().tolist()]

    @property
    def data_parallel_size(self) -> int:
        """Processes whose gradients the strategy averages (DDP, FSDP and DeepSpeed all average):
        a loss normalised by a global count is multiplied by it, so the average is the gradient
        of the global-batch loss."""
        return self.trainer.world_size if self._trainer is not None else 1

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``: shard the
        policy, the frozen models (the reference, a teacher) and the value model with FSDP2
        (:mod:`grape_lightning.models.sharding`). Other strategies leave the models as they are."""
        mesh = self._device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError("grape_lightning has no tensor-parallel plans: use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)")
        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        shard_causal_lm(self.policy, data_parallel)
        for model in self.frozen_models():
            shard_causal_lm(model, data_parallel)
        if self.value_model is not None:
            shard_value_model(self.value_model, data_parallel, trunk_sharded=self.value_model.trunk is self.policy.base_model)
        self._sharded = True

    def on_fit_start(self) -> None:
        """Compile the decoder layers of the policy and the frozen models (``ModelSpec.compile``)."""
        if self.differentiates_twice:
            if self.policy_spec.compile:
                raise ValueError(f"{type(self).__name__} takes second derivatives through the policy, which compiled "
                                 "layers do not support: leave policy.compile unset or false")
            return
        if compile_wanted(self.policy_spec, self.device, self.trainer.strategy):
            for model in (self.policy, *self.frozen_models()):
                compile_decoder_layers(model)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps the schedule spans (the Trainer's estimate unless a subclass knows better)."""
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self) -> dict:
        trained = [self.policy] + ([self.value_model] if self.value_model is not None else [])
        return build_optimizer(trained, self.optimizer_config, self.total_optimizer_steps(), fused=fused_optimizer_allowed(self._trainer))
