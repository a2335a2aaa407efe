"""One step per rollout with the sampling weights: every ratio is 1, the ratio losses are linear in
the log-probs there (REINFORCE's everywhere), and the pass that writes the head's gradient in the
forward must give the loss value and parameter gradients of autograd through the plain pass
(float64)."""

from __future__ import annotations

import pytest
import torch

from grape_lightning.algorithms import GRPOModule, SurrogateConfig
from grape_lightning.algorithms.policy_update import ratio_loss_pass
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.losses.cispo import cispo_loss
from grape_lightning.losses.grpo import grpo_loss
from grape_lightning.losses.gspo import gspo_loss
from grape_lightning.losses.reinforce import reinforce_loss
from grape_lightning.rewards import NumericMatch
from grape_lightning.rollout import RolloutDataModule, SamplingParams
from tests.conftest import tiny_spec


def _losses(advantages, mask):
    sequences, tokens = float(mask.any(-1).sum()), float(mask.sum())
    return {
        "grpo_sequence": lambda l, old: grpo_loss(l, old, advantages, mask, eps_low=0.2, eps_high=0.28, aggregation="sequence",
                                                  num_sequences=sequences, num_tokens=tokens),
        "grpo_token": lambda l, old: grpo_loss(l, old, advantages, mask, eps_low=0.1, eps_high=0.1, aggregation="token",
                                               num_sequences=sequences, num_tokens=tokens),
        "grpo_constant": lambda l, old: grpo_loss(l, old, advantages, mask, aggregation="constant", constant_length=7,
                                                  num_sequences=sequences, num_tokens=tokens),
        "gspo": lambda l, old: gspo_loss(l, old, advantages, mask, num_sequences=sequences),
        "gspo_token": lambda l, old: gspo_loss(l, old, advantages, mask, token_level=True, num_sequences=sequences),
        "cispo": lambda l, old: cispo_loss(l, old, advantages, mask, eps_low=0.2, eps_high=0.28, num_tokens=tokens),
        "reinforce": lambda l, old: reinforce_loss(l, advantages, mask, num_sequences=sequences),
    }


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    module = GRPOModule(tiny_spec(dtype="float64"), rewards=[NumericMatch()], sampling=SamplingParams(max_new_tokens=6),
                        loss=SurrogateConfig(beta=0.0))
    datamodule = RolloutDataModule(task=ArithmeticTask(num_train=16, num_val=4), group_size=3, batch_size=3)
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    rollout = module.collect_rollout(next(iter(datamodule.train_dataloader())))
    return module, rollout


@pytest.mark.parametrize("name", ["grpo_sequence", "grpo_token", "grpo_constant", "gspo", "gspo_token", "cispo", "reinforce"])
def test_the_linear_pass_at_ratio_one_gives_the_plain_pass_value_and_gradients(setup, name):
    module, rollout = setup
    assert not module.needs_old_logprobs  # one step per rollout: pi_old is read off the pass
    micro = torch.arange(len(rollout))
    inputs = rollout.model_inputs(micro)
    generator = torch.Generator().manual_seed(3)
    advantages = torch.randn(len(rollout), dtype=torch.float64, generator=generator)
    mask = inputs["response_mask"] & (torch.rand(len(rollout), generator=generator) > 0.2)[:, None]
    loss_of = _losses(advantages, mask)[name]

    module.policy.zero_grad()
    plain = module.token_logprobs(inputs, with_entropy=True)
    plain_loss, plain_metrics = loss_of(plain.logprobs, plain.logprobs.detach())
    plain_loss.backward()
    plain_grads = [p.grad.clone() for p in module.policy.parameters()]

    module.policy.zero_grad()
    token, loss, metrics = ratio_loss_pass(module, rollout, micro, inputs, loss_of)
    assert not token.logprobs.requires_grad  # the head's in-forward gradient, not autograd through the log-probs
    loss.backward()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token.logprobs, plain.logprobs.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(token.entropy, plain.entropy.detach(), rtol=1e-12, atol=1e-12)
    for key, value in plain_metrics.items():
        torch.testing.assert_close(metrics[key], value.detach(), rtol=1e-12, atol=1e-12)
    assert any(grad.abs().max() > 0 for grad in plain_grads)
    for got, want in zip((p.grad for p in module.policy.parameters()), plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_loss_with_a_kl_term_or_a_collected_pi_old_takes_the_plain_pass(setup):
    module, rollout = setup
    micro = torch.arange(len(rollout))
    inputs = rollout.model_inputs(micro)
    reference = rollout.old_logprobs[:, : inputs["input_ids"].shape[1]] - 0.1
    advantages = torch.ones(len(rollout), dtype=torch.float64)

    def with_kl(l, old):
        return grpo_loss(l, old, advantages, inputs["response_mask"], ref_logprobs=reference, beta=0.1)

    token, loss, _ = ratio_loss_pass(module, rollout, micro, inputs, with_kl, only_through_ratio=False)
    assert token.logprobs.requires_grad and loss.requires_grad
