"""The sampler/trainer mismatch correction through the modules: on CPU in float64 the sampler's and
the trainer's log-probs coincide, so each test perturbs the sampler's; the update's gradient is then
that of the hand-weighted loss, and the logged mismatch is the hand-computed one."""

from __future__ import annotations

import math

import pytest
import torch

from grape_lightning.advantages import compute_advantages
from grape_lightning.algorithms import (
    AdvantageConfig, CISPOModule, GRPOModule, GSPOModule, MismatchCorrection, REINFORCEModule, SurrogateConfig, UpdateConfig,
)
from grape_lightning.rollout import SamplingParams
from tests.conftest import tiny_spec
from tests.modules.test_grape import _evaluated_update
from tests.modules.test_rl_modules import LengthParity, _datamodule

SAMPLING = SamplingParams(max_new_tokens=5, temperature=1.0)


def _module(name: str, mismatch: MismatchCorrection | None):
    common = dict(rewards=[LengthParity()], sampling=SAMPLING, mismatch=mismatch, update=UpdateConfig(micro_batch_size=5))
    if name == "grpo":
        return GRPOModule(tiny_spec(dtype="float64"), loss=SurrogateConfig(beta=0.0), **common)
    if name == "gspo":
        return GSPOModule(tiny_spec(dtype="float64"), **common)
    if name == "cispo":
        return CISPOModule(tiny_spec(dtype="float64"), **common)
    return REINFORCEModule(tiny_spec(dtype="float64"), advantage=AdvantageConfig("mean", "none"), **common)


def _perturbed_rollout(module, seed: int = 0):
    """A rollout whose sampler log-probs differ from pi_old's by a shift per row and noise per
    token (ratios leave [1/2, 2]); the rest as collected."""
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    rollout = module.collect_rollout(next(iter(datamodule.train_dataloader())))
    generator = torch.Generator().manual_seed(seed)
    shift = torch.empty(len(rollout), 1, dtype=torch.float64).uniform_(-0.9, 0.9, generator=generator)
    noise = torch.empty(rollout.old_logprobs.shape, dtype=torch.float64).uniform_(-0.6, 0.6, generator=generator)
    rollout.sampling_logprobs = torch.where(rollout.response_mask, rollout.old_logprobs - shift - noise, 0.0)
    return rollout


def _hand_weights(rollout, mode: str, cap: float = 2.0) -> list[list[float]]:
    weights = []
    for orow, srow, mrow in zip(rollout.old_logprobs.tolist(), rollout.sampling_logprobs.tolist(), rollout.response_mask.tolist()):
        deltas = [o - s for o, s, m in zip(orow, srow, mrow) if m]
        sequence_ratio = math.exp(math.fsum(deltas) / max(len(deltas), 1))
        row = []
        for o, s, m in zip(orow, srow, mrow):
            ratio = math.exp(o - s)
            if not m or mode == "none":
                row.append(1.0)
            elif mode == "tis":
                row.append(min(ratio, cap))
            elif mode == "token_mask":
                row.append(1.0 if 1 / cap <= ratio <= cap else 0.0)
            else:
                row.append(1.0 if 1 / cap <= sequence_ratio <= cap else 0.0)
        weights.append(row)
    return weights


def _hand_gradient(module, name: str, rollout, weights: list[list[float]]):
    """The gradient of the first step by hand: the weights that sampled, so every ratio is 1 and each
    algorithm's gradient is that of -sum_{i,t} c_i w_it A_i l_it, with c_i = 1 / (B |y_i|) (GRPO's
    sequence aggregation, GSPO), 1 / N (CISPO) or 1 / B (REINFORCE)."""
    advantages = compute_advantages(module.advantage, rollout.rewards, rollout.groups, rollout.valid).advantages.tolist()
    index = torch.arange(len(rollout))
    inputs = rollout.model_inputs(index)
    module.policy.zero_grad(set_to_none=True)
    logprobs = module.policy_logprobs(inputs, temperature=SAMPLING.logprob_temperature).logprobs
    mask = inputs["response_mask"].tolist()
    valid = rollout.valid.tolist()
    rows = sum(valid)
    tokens = sum(sum(m) for m, v in zip(mask, valid) if v)
    terms = []
    for i, (mrow, a) in enumerate(zip(mask, advantages)):
        if not valid[i]:
            continue
        scale = {"grpo": 1 / (rows * sum(mrow)), "gspo": 1 / (rows * sum(mrow)), "cispo": 1 / tokens, "reinforce": 1 / rows}[name]
        for j, m in enumerate(mrow):
            if m:
                terms.append(-scale * weights[i][j] * a * logprobs[i, j])
    torch.stack(terms).sum().backward()
    return [p.grad.detach().clone() for p in module.policy.parameters()]


@pytest.mark.parametrize("name, mode", [("grpo", "tis"), ("grpo", "sequence_mask"), ("gspo", "tis"), ("cispo", "token_mask"), ("reinforce", "tis")])
def test_correction_changes_the_gradient_as_by_hand(name, mode):
    corrected = _module(name, MismatchCorrection(mode))
    assert corrected.needs_old_logprobs  # the ratio pi_old / pi_sampler needs both log-prob sets
    rollout = _perturbed_rollout(corrected)
    weights = _hand_weights(rollout, mode)
    assert any(w != 1.0 for row in weights for w in row)
    ((_, gradients),) = _evaluated_update(corrected, rollout)
    expected = _hand_gradient(corrected, name, rollout, weights)
    for got, want in zip(gradients, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    uncorrected = _hand_gradient(corrected, name, rollout, _hand_weights(rollout, "none"))
    assert max(float((got - plain).abs().max()) for got, plain in zip(gradients, uncorrected)) > 1e-6
    assert any(g.abs().max() > 1e-6 for g in gradients)  # the comparison is not between zeros


def test_one_step_algorithms_read_pi_old_off_their_pass_only_without_the_correction():
    assert not _module("grpo", None).needs_old_logprobs
    assert _module("grpo", MismatchCorrection("tis")).needs_old_logprobs
    assert not _module("reinforce", None).needs_old_logprobs
    assert _module("reinforce", MismatchCorrection("token_mask")).needs_old_logprobs


@pytest.mark.parametrize("mode", ["none", "tis"])
def test_mismatch_is_logged_over_the_valid_sampled_tokens(mode):
    """k3 mean, ratio and |delta| maxima over the response tokens of the valid rows (an off-policy
    member's NaN sampler log-probs and an invalid row left out), the share corrected with a correction."""
    module = _module("grpo", MismatchCorrection(mode))
    module.update_config = UpdateConfig(micro_batch_size=5, epochs=2)  # pi_old recomputed even without the correction
    rollout = _perturbed_rollout(module)
    rollout.valid[3] = False
    rollout.sampling_logprobs[5] = math.nan
    logged = {}
    module.log_metrics = lambda metrics, prefix="train/": logged.update(metrics)
    module._log_mismatch(rollout)
    weights = _hand_weights(rollout, "tis")
    k3, ratios, deltas, corrected = [], [], [], 0
    for i, (orow, srow, mrow) in enumerate(zip(rollout.old_logprobs.tolist(), rollout.sampling_logprobs.tolist(), rollout.response_mask.tolist())):
        if i in (3, 5):
            continue
        for j, (o, s, m) in enumerate(zip(orow, srow, mrow)):
            if m:
                k3.append(math.exp(o - s) - 1 - (o - s))
                ratios.append(math.exp(o - s))
                deltas.append(abs(o - s))
                corrected += weights[i][j] != 1.0
    assert logged["mismatch_kl"] == pytest.approx(math.fsum(k3) / len(k3), rel=1e-12)
    assert logged["mismatch_ratio_max"] == pytest.approx(max(ratios), rel=1e-12)
    assert logged["mismatch_abs_max"] == pytest.approx(max(deltas), rel=1e-12)
    if mode == "none":
        assert "mismatch_corrected" not in logged
    else:
        assert logged["mismatch_corrected"] == pytest.approx(corrected / len(k3), rel=1e-12) and corrected > 0


def test_nothing_is_logged_when_pi_old_is_the_samplers():
    module = _module("grpo", None)  # one step per rollout: pi_old read off the update's pass
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    rollout = module.collect_rollout(next(iter(datamodule.train_dataloader())))
    logged = {}
    module.log_metrics = lambda metrics, prefix="train/": logged.update(metrics)
    module._log_mismatch(rollout)
    assert logged == {}


def test_correction_without_sampler_log_probs_is_refused():
    module = _module("cispo", MismatchCorrection("tis"))
    rollout = _perturbed_rollout(module)
    rollout.sampling_logprobs = None
    with pytest.raises(ValueError, match="needs the sampler's log-probs"):
        module.mismatch_weights(rollout, torch.arange(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 sampler/trainer mismatch needs a CUDA device")
@pytest.mark.parametrize("mode", ["tis", "sequence_mask"])
def test_a_bf16_run_on_a_gpu_measures_a_mismatch_and_trains_through_the_correction(tmp_path, mode):
    """bf16 on a GPU: the static-cache engine's log-probs differ from the trainer's forward, so the
    logged mismatch is positive; the corrected update keeps the weights finite (and, truncated
    rather than dropped, moves them)."""
    from tests.modules.test_rl_modules import _trainer

    module = GRPOModule(
        tiny_spec(dtype="bfloat16"), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=16, temperature=1.0),
        loss=SurrogateConfig(beta=0.0), mismatch=MismatchCorrection(mode, cap=1.05),
    )
    before = [p.detach().float().clone() for p in module.policy.parameters()]
    trainer = _trainer(tmp_path, 2, accelerator="gpu", devices=1)
    trainer.fit(module, _datamodule())
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if "mismatch" in name}
    print(f"\nbf16 {mode}: {metrics}")
    assert metrics["train/mismatch_abs_max"] > 0 and metrics["train/mismatch_ratio_max"] > 0
    assert metrics["train/mismatch_kl"] >= 0 and 0 <= metrics["train/mismatch_corrected"] <= 1
    after = [p.detach().float().cpu() for p in module.policy.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    if mode == "tis":
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
