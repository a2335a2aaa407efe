"""GRAPEModule: the GRPO special case, off-policy members of the sample set, learning."""

import math
import statistics
import zlib

import lightning as L
import pytest
import torch

from grape_lightning.advantages import compute_advantages
from grape_lightning.algorithms import (
    AdvantageConfig, GRAPEModule, GRPOModule, OffPolicyConfig, OptimizerConfig, SurrogateConfig, UpdateConfig,
)
from grape_lightning.algorithms.grape import trained_members
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.models import ModelSpec
from grape_lightning.rewards import NumericMatch, PythonCallable
from grape_lightning.rewards.critics import CallableCritic
from grape_lightning.rollout import Rollout, RolloutDataModule, SamplingParams
from tests.conftest import tiny_spec

ONE_ITEM = """\
default_category: math
categories:
  math:
    - {name: correct, weight: 1.0, kind: verifiable, check: numeric_match}
"""
MIXED = """\
default_category: math
categories:
  math:
    - {name: correct, weight: 1.0, kind: verifiable, check: numeric_match}
    - {name: plain_number, weight: 0.5, kind: judged, critic: digits, question: "Is the response just a number?"}
"""

FLAKY = """\
default_category: math
categories:
  math:
    - {name: flaky, weight: 1.0, kind: verifiable, check: python, function: "tests.modules.test_grape:flaky_verifier"}
"""


def flaky_verifier(prompt, response, metadata):
    """A deterministic verifier with scores spread over [0, 1] that cannot score about a third of
    the responses (returns None)."""
    code = zlib.crc32(f"{prompt}|{response}".encode())
    return None if code % 3 == 0 else (code % 1009) / 1008


def digits(request):
    """A deterministic critic: sure when the response is a plain number, unsure otherwise."""
    plain = request.response.strip().isdigit()
    return (1.0 if plain else 0.0, 0.9 if plain else 0.3, "a number" if plain else "not a plain number")


def _write(tmp_path, text):
    path = tmp_path / "rubric.yaml"
    path.write_text(text)
    return str(path)


def _datamodule(**kwargs):
    return RolloutDataModule(**{"task": ArithmeticTask(num_train=64, num_val=8), "group_size": 4, "batch_size": 4, **kwargs})


def _trainer(tmp_path, max_steps):
    return L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )


def test_one_verifiable_item_with_std_scaling_is_exactly_grpo(tmp_path):
    options = dict(sampling=SamplingParams(max_new_tokens=4, temperature=1.0), optimizer=OptimizerConfig(lr=1e-3),
                   advantage=AdvantageConfig("mean", "group"), loss=SurrogateConfig(beta=0.02),
                   update=UpdateConfig(epochs=2, mini_batch_size=8))
    L.seed_everything(0)
    grape = GRAPEModule(tiny_spec(), rubric=_write(tmp_path, ONE_ITEM), **options)
    L.seed_everything(0)
    grpo = GRPOModule(tiny_spec(), rewards=[NumericMatch()], **options)

    datamodule = _datamodule()
    datamodule.set_tokenizer(grape.tokenizer)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    # Make some responses right so the advantages are not all zero.
    batch["metadata"] = [{**m, "answer": "1"} if i % 3 == 0 else m for i, m in enumerate(batch["metadata"])]
    ours, theirs = grape.collect_rollout(batch), grpo.collect_rollout(batch)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.rewards, theirs.rewards) and torch.equal(_advantages(grape, ours), _advantages(grpo, theirs))

    _trainer(tmp_path / "a", 4).fit(grape, _datamodule())
    _trainer(tmp_path / "b", 4).fit(grpo, _datamodule())
    for a, b in zip(grape.policy.parameters(), grpo.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _rows(rollout, keep):
    """The rollout restricted to the rows ``keep``: what it would be had the others not been sampled."""
    index = keep.nonzero().flatten()

    def take(values):
        return None if values is None else values[index]

    return Rollout(
        input_ids=take(rollout.input_ids), attention_mask=take(rollout.attention_mask), response_mask=take(rollout.response_mask),
        old_logprobs=take(rollout.old_logprobs), rewards=take(rollout.rewards), valid=take(rollout.valid),
        groups=take(rollout.groups), prompts=[rollout.prompts[i] for i in index.tolist()],
        responses=[rollout.responses[i] for i in index.tolist()], metadata=[rollout.metadata[i] for i in index.tolist()],
        ref_logprobs=take(rollout.ref_logprobs), off_policy=take(rollout.off_policy),
    )


def _advantages(module, rollout):
    return compute_advantages(module.advantage, rollout.rewards, rollout.groups, rollout.valid).advantages


def _evaluated_update(module, rollout, logged=None):
    """Run ``module.update`` with each step evaluated instead of taken: per step, the loss and the
    gradient of every parameter (the micro-batches' sum, as the optimizer would see it). The
    logged metrics go to ``logged`` (a dict) when given."""
    steps, loss = [], [0.0]

    class Evaluate:
        def zero_grad(self, set_to_none=True):
            module.policy.zero_grad(set_to_none=False)
            loss[0] = 0.0

        def step(self):
            steps.append((loss[0], [p.grad.detach().clone() for p in module.policy.parameters()]))

    def backward(value):
        value.backward()
        loss[0] += float(value.detach())

    module.optimizers = Evaluate
    module.manual_backward = backward
    module.clip_gradients = lambda *args, **kwargs: None
    module.lr_schedulers = lambda: None
    module.log_metrics = lambda metrics, prefix="train/": (logged if logged is not None else {}).update(metrics)
    module.update(rollout)
    return steps


def _hand_advantages(rewards, groups, baseline, scaling):
    """Float64 loops over the scored members of each group (an unscored response is not there)."""
    out = [0.0] * len(rewards)
    for g in set(groups):
        members = [i for i in range(len(rewards)) if groups[i] == g and not math.isnan(rewards[i])]
        values = [rewards[i] for i in members]
        std = statistics.stdev(values) if len(values) >= 2 else 0.0
        for i in members:
            others = [rewards[j] for j in members if j != i]
            b = math.fsum(values) / len(values) if baseline == "mean" else (math.fsum(others) / len(others) if others else rewards[i])
            out[i] = (rewards[i] - b) / (std + 1e-4 if scaling == "group" else 1.0)
    return out


@pytest.mark.parametrize("baseline, scaling", [("mean", "group"), ("mean", "none"), ("leave_one_out", "none"), ("leave_one_out", "group")])
def test_unscored_responses_leave_the_update_as_in_grpo(tmp_path, baseline, scaling):
    """One verifiable item of weight 1 whose verifier returns None for some responses: GRAPE's
    advantages, loss and gradients are those of the rollout without those responses (GRPO's
    semantics), and with the mean baseline exactly GRPOModule's (float64, to 1e-12)."""
    options = dict(sampling=SamplingParams(max_new_tokens=4, temperature=1.0), loss=SurrogateConfig(beta=0.05), update=UpdateConfig(micro_batch_size=6))
    L.seed_everything(0)
    grape = GRAPEModule(tiny_spec(dtype="float64"), rubric=_write(tmp_path, FLAKY), advantage=AdvantageConfig(baseline, scaling), **options)
    datamodule = _datamodule(group_size=5)
    datamodule.set_tokenizer(grape.tokenizer)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    rollout = grape.collect_rollout(batch)
    verified = [flaky_verifier(p, r, m) for p, r, m in zip(rollout.prompts, rollout.responses, rollout.metadata)]
    rewards, groups = [math.nan if v is None else v for v in verified], rollout.groups.tolist()
    assert rollout.rewards.tolist() == pytest.approx(rewards, nan_ok=True, abs=1e-15)
    unscored = ~rollout.valid
    assert unscored.any() and any(  # a set with an unscored member and at least two scored ones
        unscored[rollout.groups == g].any() and (~unscored[rollout.groups == g]).sum() >= 2 for g in range(4)
    )

    advantages = _advantages(grape, rollout)
    torch.testing.assert_close(advantages, torch.tensor(_hand_advantages(rewards, groups, baseline, scaling), dtype=torch.float64), rtol=0, atol=1e-12)
    assert (advantages[unscored] == 0).all()
    scored_only = _rows(rollout, rollout.valid)
    torch.testing.assert_close(advantages[rollout.valid], _advantages(grape, scored_only), rtol=0, atol=1e-12)

    steps = _evaluated_update(grape, rollout)
    expected_steps = _evaluated_update(grape, scored_only)
    if baseline == "mean":
        L.seed_everything(0)
        grpo = GRPOModule(
            tiny_spec(dtype="float64"), rewards=[PythonCallable("tests.modules.test_grape:flaky_verifier")], advantage=AdvantageConfig("mean", scaling), **options
        )
        theirs = grpo.collect_rollout(batch)
        assert torch.equal(theirs.input_ids, rollout.input_ids) and torch.equal(theirs.valid, rollout.valid)
        torch.testing.assert_close(_advantages(grpo, theirs), advantages, rtol=0, atol=1e-12)
        expected_steps += _evaluated_update(grpo, theirs)
    assert len(steps) == 1 and len(expected_steps) in (1, 2)
    (loss, gradients) = steps[0]
    for expected_loss, expected_gradients in expected_steps:
        assert abs(loss - expected_loss) < 1e-12
        for got, want in zip(gradients, expected_gradients):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert any(g.abs().max() > 1e-6 for g in gradients)  # the comparison is not between zeros


@pytest.mark.parametrize("algorithm", ["grpo", "grape"])
def test_k1_kl_in_the_loss_is_refused(tmp_path, algorithm):
    """k1's loss term has zero expected gradient (tests/losses/test_rl_losses.py); with beta = 0 the KL
    is not in the loss and any estimator is accepted."""
    def make(**options):
        if algorithm == "grpo":
            return GRPOModule(tiny_spec(), rewards=[NumericMatch()], **options)
        return GRAPEModule(tiny_spec(), rubric=_write(tmp_path, ONE_ITEM), **options)

    with pytest.raises(ValueError, match="'k1' cannot be a loss term.*Use 'k3'.*or 'k2'"):
        make(loss=SurrogateConfig(kl_estimator="k1", beta=0.04))
    assert make(loss=SurrogateConfig(kl_estimator="k1", beta=0.0)).reference is None
    assert make(loss=SurrogateConfig(kl_estimator="k2", beta=0.04)).loss.kl_estimator == "k2"


def test_reference_answers_join_the_sample_set(tmp_path):
    module = GRAPEModule(
        tiny_spec(), rubric=_write(tmp_path, ONE_ITEM), sampling=SamplingParams(max_new_tokens=4),
        off_policy=OffPolicyConfig(reference_answers=True, treatment="positive_only"), loss=SurrogateConfig(beta=0.0),
        update=UpdateConfig(epochs=2),  # a second pass needs pi_old's log-probs (one pass reads them off its own forward)
    )
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    rollout = module.collect_rollout(batch)
    assert len(rollout) == 16 + 4 and rollout.off_policy.sum() == 4
    extra = rollout.off_policy.nonzero().flatten()
    for row in extra.tolist():
        assert rollout.responses[row] == rollout.metadata[row]["answer"]
        assert rollout.rewards[row] == 1.0  # the reference answer is right
        ids = rollout.input_ids[row][rollout.response_mask[row]].tolist()
        assert ids[-1] == module.tokenizer.eos_token_id
        group = rollout.groups[row]
        on_policy_rows = ((rollout.groups == group) & ~rollout.off_policy).nonzero().flatten()
        assert torch.equal(rollout.input_ids[row, : 5], rollout.input_ids[on_policy_rows[0], : 5])
    # pi_old's log-probs of the off-policy responses come from a forward pass (ratio 1 at first).
    assert (rollout.old_logprobs[extra][rollout.response_mask[extra]] < 0).all()
    advantages = _advantages(module, rollout)
    trained = trained_members(rollout.valid, rollout.off_policy, advantages, "positive_only")
    assert torch.equal(trained[extra], advantages[extra] > 0) and trained[~rollout.off_policy].all()
    assert not trained_members(rollout.valid, rollout.off_policy, advantages, "baseline_only")[extra].any()
    assert trained_members(rollout.valid, rollout.off_policy, advantages, "all")[extra].all()


def test_off_policy_rows_have_no_sampler_logprobs_and_stay_out_of_the_kl_metric(tmp_path):
    """Reference answers join the sets (all trained): their sampler log-probs are NaN, the logged
    KL averages the policy's own samples only, and the loss still carries the off-policy rows'
    KL term (float64 loops at the first step, where every ratio is 1)."""
    L.seed_everything(0)
    beta = 0.05
    module = GRAPEModule(
        tiny_spec(dtype="float64"), rubric=_write(tmp_path, ONE_ITEM), sampling=SamplingParams(max_new_tokens=4),
        off_policy=OffPolicyConfig(reference_answers=True, treatment="all"), loss=SurrogateConfig(beta=beta),
    )
    with torch.no_grad():  # move the policy away from the reference: a KL of 0 would prove nothing
        for parameter in module.policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    batch["metadata"] = [{**m, "answer": "1"} if i % 3 == 0 else m for i, m in enumerate(batch["metadata"])]
    rollout = module.collect_rollout(batch)
    extra, mask = rollout.off_policy, rollout.response_mask
    assert extra.sum() == 4 and rollout.valid.all()
    assert torch.isnan(rollout.sampling_logprobs[extra][mask[extra]]).all()
    assert (rollout.sampling_logprobs[extra][~mask[extra]] == 0).all()
    assert torch.isfinite(rollout.sampling_logprobs[~extra]).all()

    logged = {}
    (loss, _), = _evaluated_update(module, rollout, logged)
    with torch.no_grad():
        index = torch.arange(len(rollout))
        inputs = rollout.model_inputs(index)
        logprobs = module.policy_logprobs(inputs, temperature=module.sampling.logprob_temperature).logprobs.tolist()
    ref, rows_mask = rollout.take("ref_logprobs", index).tolist(), inputs["response_mask"].tolist()
    advantages = _advantages(module, rollout).tolist()
    per_row_kl = []
    for row in range(len(rollout)):
        terms = [math.exp(r - l) - (r - l) - 1 for l, r, m in zip(logprobs[row], ref[row], rows_mask[row]) if m]
        per_row_kl.append(math.fsum(terms) / len(terms))
    on_policy = [row for row in range(len(rollout)) if not extra[row]]
    expected_kl = math.fsum(per_row_kl[row] for row in on_policy) / len(on_policy)
    all_rows_kl = math.fsum(per_row_kl) / len(rollout)
    assert abs(logged["kl"] - expected_kl) < 1e-12 and abs(expected_kl - all_rows_kl) > 1e-4
    expected_loss = math.fsum(-a + beta * k for a, k in zip(advantages, per_row_kl)) / len(rollout)
    assert abs(loss - expected_loss) < 1e-12


def test_per_item_metrics_sample_details_and_the_end_of_fit_table(tmp_path, caplog):
    module = GRAPEModule(
        tiny_spec(), rubric=_write(tmp_path, MIXED), critics={"digits": CallableCritic("tests.modules.test_grape:digits")},
        sampling=SamplingParams(max_new_tokens=4), loss=SurrogateConfig(beta=0.0),
    )
    trainer = _trainer(tmp_path, 2)
    with caplog.at_level("INFO"):
        trainer.fit(module, _datamodule())
    metrics = trainer.callback_metrics
    for name in ("score", "confidence", "spread", "failures", "omega"):
        assert f"rubric/math/plain_number/{name}" in metrics and f"rubric/math/correct/{name}" in metrics
    for name in ("agreement", "calibration_error", "reliability"):  # of the judged item only: the verifier is the reference
        assert f"rubric/math/plain_number/{name}" in metrics and f"rubric/math/correct/{name}" not in metrics
    assert "critic_failures" in metrics
    assert metrics["rubric/math/correct/confidence"] == 1.0 and metrics["rubric/math/correct/omega"] == 1.0
    assert 0.3 <= metrics["rubric/math/plain_number/confidence"] <= 0.9
    row = module.last_samples[0]
    assert "math/plain_number" in row and "plain_number:" in row["critiques"]
    # the table at the end of fit: every item, its statistics averaged over the fit's two steps
    assert len(module.item_history) == 2
    (table,) = [record.getMessage() for record in caplog.records if "rubric items over the 2 training steps" in record.getMessage()]
    lines = table.splitlines()
    assert lines[2].split()[:4] == ["item", "w", "score", "conf"]
    score = statistics.fmean(step["math/plain_number"]["score"] for step in module.item_history)
    assert lines[4].split()[:3] == ["math/plain_number", "0.500", f"{score:.3f}"]
    assert lines[3].startswith("math/correct ")


def test_reliability_weighting_uses_the_running_agreement_of_earlier_steps_and_checkpoints_keep_it(tmp_path):
    """Step 1 is weighted by confidence (nothing measured yet) and measures the judged item's
    agreement a = mean_i 1 - |s_plain - s_correct|; step 2's rewards weigh it w R f with R = a
    (float64 hand computation). A checkpoint carries R, and a resumed run starts from it."""
    L.seed_everything(0)
    module = GRAPEModule(
        tiny_spec(dtype="float64"), rubric=_write(tmp_path, MIXED), critics={"digits": CallableCritic("tests.modules.test_grape:digits")},
        sampling=SamplingParams(max_new_tokens=4, temperature=1.0), loss=SurrogateConfig(beta=0.0),
        weighting={"mode": "reliability", "momentum": 0.5},
    )
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    loader = iter(datamodule.train_dataloader())
    first = next(loader)
    first["metadata"] = [{**m, "answer": "1"} if i % 3 == 0 else m for i, m in enumerate(first["metadata"])]
    rollout = module.collect_rollout(first)
    correct, plain = rollout.reward_terms["math/correct"].tolist(), rollout.reward_terms["math/plain_number"].tolist()
    confidence = rollout.reward_confidences["math/plain_number"].tolist()
    for i, reward in enumerate(rollout.rewards.tolist()):  # by confidence: omega = (1, 0.5 mean c of the set)
        members = [j for j in range(len(rollout)) if rollout.groups[j] == rollout.groups[i]]
        omega = 0.5 * math.fsum(confidence[j] for j in members) / len(members)
        assert abs(reward - (correct[i] + omega * plain[i]) / (1 + omega)) < 1e-12
    logged = module.rubric_item_statistics(rollout, _advantages(module, rollout))
    agreement = math.fsum(1 - abs(p - c) for p, c in zip(plain, correct)) / len(rollout)
    assert abs(logged["rubric/math/plain_number/agreement"] - agreement) < 1e-12
    assert module.reliability.measured.tolist() == [False, True] and abs(module.reliability.value[1].item() - agreement) < 1e-12

    rollout = module.collect_rollout(next(loader))
    correct, plain = rollout.reward_terms["math/correct"].tolist(), rollout.reward_terms["math/plain_number"].tolist()
    expected = [(c + 0.5 * agreement * p) / (1 + 0.5 * agreement) for c, p in zip(correct, plain)]
    assert rollout.rewards.tolist() == pytest.approx(expected, abs=1e-12)
    second = math.fsum(1 - abs(p - c) for p, c in zip(plain, correct)) / len(rollout)
    module.rubric_item_statistics(rollout, _advantages(module, rollout))
    assert abs(module.reliability.value[1].item() - (0.5 * agreement + 0.5 * second)) < 1e-12

    # through a checkpoint: what a resumed run starts from
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
    )
    trainer.fit(module, _datamodule())
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(saved["reliability.value"], module.reliability.value) and saved["reliability.measured"].tolist() == [False, True]
    started_from = []

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            started_from.append(pl_module.reliability.value.clone())

    resumed = GRAPEModule(
        tiny_spec(dtype="float64"), rubric=_write(tmp_path, MIXED), critics={"digits": CallableCritic("tests.modules.test_grape:digits")},
        sampling=SamplingParams(max_new_tokens=4, temperature=1.0), loss=SurrogateConfig(beta=0.0),
        weighting={"mode": "reliability", "momentum": 0.5},
    )
    L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[AtStart()], enable_checkpointing=False,
    ).fit(resumed, _datamodule(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert torch.equal(started_from[0], saved["reliability.value"])


@pytest.mark.parametrize("rubric", ["one_item", "mixed"])
def test_grape_raises_verifier_accuracy(tmp_path, rubric):
    """From the warm tiny model (48% greedy accuracy on 200 held-out additions)."""
    L.seed_everything(0)
    module = GRAPEModule(
        ModelSpec(name_or_path="grape/tiny-addition-sft"),
        rubric=_write(tmp_path, ONE_ITEM if rubric == "one_item" else MIXED),
        critics={"digits": CallableCritic("tests.modules.test_grape:digits")},
        sampling=SamplingParams(max_new_tokens=6), optimizer=OptimizerConfig(lr=2e-4),
        advantage=AdvantageConfig("mean", "group"), loss=SurrogateConfig(beta=0.0), accuracy="math/correct",
    )
    datamodule = RolloutDataModule(
        task=ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200), group_size=8, batch_size=16, val_batch_size=200,
    )
    trainer = L.Trainer(
        max_steps=100, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, val_check_interval=1000, check_val_every_n_epoch=None, default_root_dir=tmp_path,
    )
    before = trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]
    trainer.fit(module, datamodule)
    after = trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]
    print(f"GRAPE ({rubric}): greedy val accuracy {before:.3f} -> {after:.3f}")
    assert after >= before + 0.08
