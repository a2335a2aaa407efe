"""Optimizer and learning-rate schedule shared by every algorithm."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up, then a constant, linear or cosine schedule down to ``min_lr_ratio * lr``.

    Weight decay applies to matrices only (not to biases, norms or other vectors).

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay of the matrices.
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warm-up from lr / (warmup_steps + 1) to lr.
        schedule: after warm-up: ``constant``, ``linear`` or ``cosine`` decay to ``min_lr_ratio * lr``
            at max_steps.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (linear and cosine schedules).
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0


def lr_multiplier(step: int, total_steps: int, config: OptimizerConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant" or total_steps <= config.warmup_steps:
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    decay = 1.0 - progress if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def fused_optimizer_allowed(trainer) -> bool:
    """Lightning's mixed-precision plugins refuse to clip the gradients of a fused optimizer (it
    unscales them itself), so a fused AdamW is used only under other precisions."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return trainer is None or not isinstance(trainer.precision_plugin, MixedPrecision)


def build_optimizer(modules: list[nn.Module], config: OptimizerConfig, total_steps: int, fused: bool = True) -> dict:
    """The ``configure_optimizers`` return value for the trainable parameters of ``modules``
    (AdamW, fused into one kernel where ``fused`` and every parameter is a plain CUDA tensor)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    trained = decay + no_decay
    # one fused kernel for the whole update where every parameter is a plain CUDA tensor
    fused = fused and bool(trained) and all(p.is_cuda and type(p.data) is torch.Tensor for p in trained)
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, config))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
