"""The value function of an actor-critic algorithm (PPO): its model, V_t read where y_t is
chosen, V_old of a rollout, and how well V_old predicted the returns.

    V_t     = V(state before y_t) = the value model's output at position t - 1
    V_old_t = V_t under the value model as it was at sampling time (eval mode: deterministic)

Values are aligned like log-probs: ``logprobs[b, t]`` is log pi(y_t | .) computed from the
hidden state at position t - 1, and V_t, the value of the state in which y_t is chosen, is read
at that same position. The first response token's value is thus read at the last prompt token.

The value model (``kind``):

- ``"head"``: a scalar head on the policy's own trunk (one network, shared features; one trunk
  pass gives log-probs and values);
- ``"separate"``: its own trunk, a copy of the initial policy, or, with ``init``, a
  sequence-classification model such as a reward model (trunk and scalar head: V starts as the
  reward model's score, the initialisation of Ziegler et al., 2019). ``init`` must use the
  policy's tokenizer.

The module keeps it as ``value_model``: its weights are then part of the ``state_dict`` (saved in
checkpoints), the optimizer trains it with the policy, and sharding strategies shard it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grape_lightning.advantages import SumAcross, explained_variance, masked_mean_std
from grape_lightning.models.loading import load_sequence_scorer, load_tokenizer
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.value import ValueModel
from grape_lightning.rollout.batch import Rollout

if TYPE_CHECKING:
    from grape_lightning.algorithms.on_policy import OnPolicyModule

ValueModelKind = Literal["head", "separate"]


def build_value_model(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    kind: ValueModelKind,
    init: ModelSpec | None = None,
    gradient_checkpointing: bool = False,
) -> ValueModel:
    """The value model of ``policy``: a ``head`` on its trunk or a ``separate`` one (a copy of its
    trunk, or the reward model ``init``), in training mode."""
    hidden_size = policy.config.get_text_config().hidden_size
    if kind == "head":
        if init is not None:
            raise ValueError("value_init needs value_model: separate (a head shares the policy's trunk)")
        return ValueModel(policy.base_model, hidden_size)
    if kind != "separate":
        raise ValueError(f"value_model must be 'head' or 'separate', got {kind!r}")
    if init is None:
        return ValueModel(copy.deepcopy(policy).base_model, hidden_size)
    if load_tokenizer(init).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"value_init {init.name_or_path or 'config'!r} has another tokenizer than the policy")
    scorer = load_sequence_scorer(init, tokenizer)
    if gradient_checkpointing:
        scorer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ValueModel.from_sequence_scorer(scorer).train()


def shares_trunk(value_model: ValueModel, policy: PreTrainedModel) -> bool:
    """A value head on the policy's own trunk: one trunk pass gives log-probs and values."""
    return value_model.trunk is policy.base_model


def token_values(value_model: ValueModel, inputs: dict[str, Tensor], hidden: Tensor | None = None) -> Tensor:
    """V[b, t] for the response tokens t of ``inputs``: the value model's output at position
    t - 1, whose hidden state chooses token t (the alignment of the log-probs); 0 elsewhere.
    ``hidden``: the policy trunk's hidden states of ``inputs`` when the value head shares it."""
    if hidden is not None:
        values = value_model.values_from_hidden(hidden)
    else:
        values = value_model(inputs["input_ids"], inputs["attention_mask"])
    before_token = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)
    return torch.where(inputs["response_mask"], before_token, 0.0)


@torch.no_grad()
def rollout_values(module: OnPolicyModule, rollout: Rollout) -> Tensor:
    """V_old of ``rollout`` under ``module.value_model``, micro-batch by micro-batch, in eval mode.
    With a shared trunk the same pass sets ``rollout.old_logprobs`` to pi_old's log-probs (the
    module then does not ask the collector for them)."""
    value_model = module.value_model
    shared = shares_trunk(value_model, module.policy)
    was_training = value_model.training
    value_model.eval()
    dtype = torch.promote_types(rollout.old_logprobs.dtype, torch.float32)
    old_values = torch.zeros_like(rollout.old_logprobs, dtype=dtype)
    old_logprobs = torch.zeros_like(old_values) if shared else None
    for index in torch.arange(len(rollout), device=old_values.device).split(module.update_config.micro_batch_size):
        inputs = rollout.model_inputs(index)
        width = inputs["input_ids"].shape[1]
        if old_logprobs is None:
            old_values[index, :width] = token_values(value_model, inputs)
            continue
        token = module.token_logprobs(inputs, with_hidden=True)
        old_logprobs[index, :width] = token.logprobs
        old_values[index, :width] = token_values(value_model, inputs, token.hidden)
    if old_logprobs is not None:
        rollout.old_logprobs = old_logprobs
    value_model.train(was_training)
    return old_values


def value_metrics(old_values: Tensor, returns: Tensor, mask: Tensor, sum_across: SumAcross) -> dict[str, float]:
    """Diagnostics of the value function over the masked tokens of every process: explained
    variance 1 - Var[R - V_old] / Var[R], and mean and (unbiased) std of the advantages R - V_old
    (before any scaling), of the returns R and of the values V_old."""
    metrics = {"explained_variance": explained_variance(old_values, returns, mask, sum_across)}
    for name, values in (("advantage", returns - old_values), ("return", returns), ("value", old_values)):
        metrics[f"{name}_mean"], metrics[f"{name}_std"] = masked_mean_std(values, mask, sum_across)
    return metrics
