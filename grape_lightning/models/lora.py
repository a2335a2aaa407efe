"""LoRA through peft: low-rank adapters on a frozen policy, whose adapters-off forward is the reference.

With W_0 a frozen weight of the policy, a LoRA layer computes

    h = W_0 x + (alpha / r) B A x,        A: [r, d_in], B: [d_out, r], B = 0 at the start,

so the initial policy equals the base model, only A and B (and ``modules_to_save``) train, and
switching the adapters off gives back pi_ref = the base model exactly: the reference costs no
second copy of the weights. Export merges W = W_0 + (alpha / r) B A into an ordinary Hugging Face
checkpoint.

``self.policy`` stays the Hugging Face model (with LoRA layers injected in place), so log-probs,
generation and the value head see the same interface with or without LoRA; the peft wrapper that
switches and merges the adapters is held by :class:`LoRAPolicy`, outside the module tree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# q/k/v/o attention and gate/up/down MLP projections of Qwen2, Llama, Mistral and Gemma shapes
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    """LoRA adapters of rank ``r`` and scale ``alpha / r`` on the modules named ``target_modules``
    (names or suffixes of ``nn.Linear`` submodules); ``modules_to_save`` lists modules trained in
    full (a copy trains, the original stays as the reference's), for example ``["lm_head"]``.

    Args:
        r: rank of the adapters.
        alpha: scale numerator: adapters are scaled by alpha / r.
        dropout: dropout on the adapters' input.
        target_modules: names or suffixes of the ``nn.Linear`` submodules that get adapters.
        modules_to_save: modules trained in full beside the adapters (for example ``["lm_head"]``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")


class LoRAPolicy:
    """The peft wrapper around a policy with injected adapters (not an ``nn.Module``, so it adds
    nothing to the owner's parameters or ``state_dict``)."""

    def __init__(self, model: PreTrainedModel, config: LoRAConfig) -> None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("LoRA needs peft: pip install 'grape-lightning[peft]'") from error
        self.config = config
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        )
        self.peft_model = get_peft_model(model, peft_config)  # freezes everything but the adapters

    @property
    def model(self) -> PreTrainedModel:
        """The Hugging Face model, adapters inside (the same object that was wrapped)."""
        return self.peft_model.get_base_model()

    @contextmanager
    def adapters_disabled(self) -> Iterator[PreTrainedModel]:
        """The model with every adapter switched off: the base model, pi_ref."""
        with self.peft_model.disable_adapter():
            yield self.model

    def merged_copy(self) -> PreTrainedModel:
        """A plain Hugging Face model with W_0 + (alpha / r) B A in every adapted layer; the
        training model is left as it is, so training can go on after an export."""
        return copy.deepcopy(self.peft_model).merge_and_unload()

    def adapter_parameter_names(self) -> list[str]:
        return [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]


def is_adapter_free(model: nn.Module) -> bool:
    """True when no peft tuner layer is left in ``model`` (a merged export)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(isinstance(module, BaseTunerLayer) for module in model.modules())
