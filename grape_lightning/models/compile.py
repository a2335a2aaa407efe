"""Decoder layers compiled with ``torch.compile`` for training on a GPU.

A decoder layer run op by op launches a kernel for every normalisation, rotary embedding,
activation and dtype cast, each a pass over [tokens, hidden] or [tokens, intermediate] in memory;
compiled, each run of elementwise work between two matrix products (or attention) is one kernel,
and fewer intermediate activations are kept for the backward. The layers are compiled in place
(``nn.Module.compile``), so parameter names, checkpoints and sharding units are unchanged, and
the first step of each new sequence length compiles (then shapes are traced as dynamic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from grape_lightning.models.sharding import decoder_layers
from grape_lightning.models.spec import ModelSpec


def compile_wanted(spec: ModelSpec, device: torch.device, strategy: object) -> bool:
    """``spec.compile``, or when None: on a CUDA device, under one device or DDP, without LoRA
    (sharded and adapter-wrapped layers keep their eager forward unless asked)."""
    if spec.compile is not None:
        return spec.compile
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    return device.type == "cuda" and spec.lora is None and type(strategy) in (SingleDeviceStrategy, DDPStrategy)


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of a Hugging Face causal LM in place; returns how many."""
    layers = decoder_layers(model.base_model)
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)


@contextlib.contextmanager
def eager_layers() -> Iterator[None]:
    """Compiled functions run as plain Python inside the block (where torch has
    ``torch.compiler.set_stance``; nothing changes otherwise)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
