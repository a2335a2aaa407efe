"""The model half every algorithm shares: policy, frozen reference (and the slot of a value model)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grape_lightning.models.full_parameters import full_parameters
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import TokenLogprobs, response_logprobs
from grape_lightning.models.lora import LoRAPolicy
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.tokenizer_check import save_tokenizer
from grape_lightning.models.value import ValueModel

class PolicyModelsMixin:
    """Mix into a ``LightningModule`` and call :meth:`build_models` from ``__init__``.

    - ``self.policy``: the trained causal LM; ``self.tokenizer`` its tokenizer.
    - ``self.reference``: a frozen copy of the initial policy (eval mode, no gradients), or None.
      Its weights never enter checkpoints: they are the initial weights, rebuilt from the spec.
      With LoRA (``policy.lora``) only adapters train and the reference is the policy with its
      adapters switched off (:class:`AdaptersOff`, no second copy). Either way, reference
      log-probs go through :meth:`reference_model` (or :meth:`with_reference`).
    - ``self.value_model``: None here; an actor-critic algorithm sets it to its :class:`ValueModel`
      (built by :func:`~grape_lightning.algorithms.value_function.build_value_model`, the one way
      to build one), which sharding and the optimizer then take up with the policy.
    """

    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: PreTrainedModel | None
    value_model: ValueModel | None

    def build_models(
        self,
        policy: ModelSpec,
        *,
        reference: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        assert isinstance(self, nn.Module), "PolicyModelsMixin goes on a LightningModule"
        self.policy_spec = policy
        self.tokenizer = load_tokenizer(policy)
        self.policy = load_causal_lm(policy, self.tokenizer)
        self.lora: LoRAPolicy | None = None
        if policy.lora is not None:
            self.lora = LoRAPolicy(self.policy, policy.lora)  # self.policy keeps its identity, adapters inside
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy.config.use_cache = False  # training forward passes never need the KV cache
        self.policy.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds

        self.reference = None
        if reference and self.lora is not None:
            self.reference = AdaptersOff(self.lora)
        elif reference:
            self.reference = copy.deepcopy(self.policy)
            self.reference.requires_grad_(False)
            self.reference.eval()
            self.keep_out_of_checkpoints("reference")

        self.value_model = None  # an actor-critic algorithm sets it (see the class docstring)

    # -- frozen models: eval mode, out of checkpoints ---------------------------------------------
    def frozen_models(self) -> list[nn.Module]:
        """The frozen models held besides the policy: the reference copy, if any (an algorithm with
        another, a distillation teacher, adds it). They stay in eval mode, never enter checkpoints,
        and are sharded and compiled as the policy is."""
        reference = getattr(self, "reference", None)
        return [reference] if isinstance(reference, nn.Module) else []

    def keep_out_of_checkpoints(self, name: str) -> None:
        """The submodule ``name`` (a frozen model rebuilt from its spec with the module) never enters
        ``state_dict``; loading one keeps strict key checking for everything else by filling its
        keys from the weights in memory (none while it is not built yet)."""

        def prefix_of(prefix: str) -> str:
            return f"{prefix}{name}."

        def drop(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
            for key in [k for k in state_dict if k.startswith(prefix_of(prefix))]:
                del state_dict[key]

        def fill(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            model = getattr(self, name, None)
            if isinstance(model, nn.Module):
                for key, tensor in model.state_dict().items():
                    state_dict.setdefault(prefix_of(prefix) + key, tensor)

        self._register_state_dict_hook(drop)  # type: ignore[attr-defined]
        self._register_load_state_dict_pre_hook(fill)  # type: ignore[attr-defined]

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)  # type: ignore[misc]
        for model in self.frozen_models():
            model.eval()  # frozen models are always in eval mode (no dropout)
        return self

    # -- generation -----------------------------------------------------------------------------
    def generation_context(self) -> contextlib.AbstractContextManager[PreTrainedModel]:
        """``with self.generation_context() as policy:`` the policy with its full parameters, so the
        data-dependent number of decoding forwards runs no collective under FSDP or ZeRO-3
        (:mod:`grape_lightning.models.full_parameters`). Every rank must enter it."""
        return full_parameters(self, self.policy)  # type: ignore[arg-type]

    # -- log-probs ------------------------------------------------------------------------------
    def policy_logprobs(self, batch: dict[str, Tensor], **kwargs: Any) -> TokenLogprobs:
        """Log-probs of ``batch["response_mask"]`` tokens under the policy (with gradients)."""
        return response_logprobs(
            self.policy,
            batch["input_ids"],
            batch["response_mask"],
            batch.get("attention_mask"),
            batch.get("position_ids"),
            **kwargs,
        )

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """pi_ref as a model to call inside the ``with`` block: the frozen copy, or with LoRA the
        policy with its adapters off (in eval mode: no dropout, as the copy)."""
        if self.reference is None:
            raise RuntimeError("this module was built without a reference model (reference=False)")
        if self.lora is None:
            yield self.reference
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.lora.adapters_disabled() as base:
                yield base
        finally:
            self.policy.train(was_training)

    def with_reference(self, compute: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``compute(pi_ref, *args, **kwargs)``: one call under :meth:`reference_model`."""
        with self.reference_model() as reference:
            return compute(reference, *args, **kwargs)

    def reference_logprobs(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """Log-probs under the frozen reference, computed without a graph. (Not inference mode:
        FSDP2 keeps the parameters it gathers here for later calls under autograd, which inference
        tensors would refuse.)"""
        with torch.no_grad(), self.reference_model() as reference:
            logprobs = response_logprobs(
                reference,
                batch["input_ids"],
                batch["response_mask"],
                batch.get("attention_mask"),
                batch.get("position_ids"),
                **kwargs,
            ).logprobs
        return logprobs

    # -- export ---------------------------------------------------------------------------------
    def export_hf(self, directory: str | Path) -> Path:
        """Write the policy and tokenizer in Hugging Face format (``from_pretrained`` loads them).
        With LoRA the adapters are merged into the weights of a copy (training can go on)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self.policy if self.lora is None else self.lora.merged_copy()
        model.config.use_cache = True
        try:
            model.save_pretrained(directory, safe_serialization=True)
        finally:
            model.config.use_cache = False
        # A decoder-only model generates a batch from left-padded prompts; the saved tokenizer says so.
        padding_side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            save_tokenizer(self.tokenizer, directory)
        finally:
            self.tokenizer.padding_side = padding_side
        return directory


class AdaptersOff:
    """``self.reference`` of a LoRA policy: marks that a reference exists without holding weights.
    It is not a model; reference computations go through ``PolicyModelsMixin.reference_model``."""

    def __init__(self, lora: LoRAPolicy) -> None:
        self.lora = lora

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("with LoRA the reference is the policy with adapters off: use reference_model() or with_reference()")
