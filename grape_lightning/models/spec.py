"""Where a model comes from: a hub id, a local directory, or a config for a model built from scratch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from grape_lightning.models.lora import LoRAConfig


@dataclass
class ModelSpec:
    """Everything needed to build a causal LM and its tokenizer.

    Exactly one of ``name_or_path`` and ``config`` is set:

    - ``name_or_path``: a Hugging Face hub id (``Qwen/Qwen2.5-0.5B-Instruct``) or a local directory
      written by ``save_pretrained``; both go through ``from_pretrained``.
    - ``config``: keyword arguments of a transformers config, with ``model_type`` naming the
      architecture (``{"model_type": "qwen2", "hidden_size": 64, ...}``). The model gets random
      weights drawn under ``init_seed``; ``vocab_size`` and the special token ids default to the
      tokenizer's, so a tiny model always fits its tokenizer.

    ``tokenizer`` defaults to ``name_or_path``; ``"grape/char"`` is the built-in character
    tokenizer used by the tiny models of the tests and the quickstart.
    ``lora``: train low-rank adapters (:class:`~grape_lightning.models.lora.LoRAConfig`, needs
    peft) instead of every weight; the reference is then the same network with adapters off.
    ``chat_template``: ``None`` uses the tokenizer's chat template when it has one, ``True``
    requires one, ``False`` always feeds prompts as plain text.

    Args:
        name_or_path: hub id or local directory of a pretrained model (exclusive with ``config``).
        config: transformers config keyword arguments with ``model_type``, for a randomly initialised
            model.
        tokenizer: tokenizer to load (default: ``name_or_path``; ``grape/char`` is the built-in
            character tokenizer).
        dtype: parameter dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ``flash_attention_2``,
            ``sdpa_varlen``: sdpa with variable-length attention for padding-free rows; None: its
            default, ``sdpa_varlen`` for a causal LM on CUDA).
        revision: hub revision (branch, tag or commit) of ``name_or_path``.
        trust_remote_code: allow model code shipped with the checkpoint to run.
        init_seed: seed of the random weights of a model built from ``config``.
        chat_template: None: use the tokenizer's chat template if it has one; True: require one; False:
            plain text.
        from_pretrained_kwargs: extra keyword arguments passed to ``from_pretrained``.
        lora: train LoRA adapters with this configuration instead of every weight (needs peft).
        compile: compile the decoder layers with ``torch.compile`` for training (fused elementwise
            kernels; the first step of each new shape compiles). None: on a CUDA device under a
            single-device or DDP strategy without LoRA; False: never; True: on any device.
    """

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    init_seed: int = 0
    chat_template: bool | None = None
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    lora: LoRAConfig | None = None
    compile: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # as stored in checkpoints
            self.lora = LoRAConfig(**self.lora)
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("ModelSpec needs exactly one of 'name_or_path' (hub id or directory) and 'config'")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("ModelSpec.config needs a 'model_type' key, for example 'qwen2' or 'llama'")
        if self.tokenizer is None and self.name_or_path is None:
            raise ValueError("a model built from 'config' needs 'tokenizer' (for example 'grape/char')")

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer if self.tokenizer is not None else self.name_or_path  # type: ignore[return-value]


TRAINED_MODEL_FIELDS = ("policy", "model")
"""The init argument of a grape module that holds the spec of the model it trains: ``policy``, or
``model`` for :class:`~grape_lightning.algorithms.RewardModelModule`."""


def trained_model_spec(arguments: Mapping[str, Any]) -> ModelSpec | None:
    """The spec of the trained model among a module's init ``arguments`` (its ``hparams``, or the
    ``init_args`` the ``grape`` command parsed); None when there is none or it is not a valid spec
    (the module itself reports that, with its own message)."""
    for name in TRAINED_MODEL_FIELDS:
        value = arguments.get(name)
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, Mapping):
            try:
                return ModelSpec(**value)
            except (TypeError, ValueError):
                return None
    return None
