"""On-policy module mechanics: invalid rewards, first-iteration ratios, step counts, selection, resume."""

import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grape_lightning.algorithms import (
    AdvantageConfig, DynamicSamplingConfig, GRPOModule, MismatchCorrection, OptimizerConfig, REINFORCEModule, SurrogateConfig, UpdateConfig,
)
from grape_lightning.algorithms.rejection_sampling import select_best
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.rewards import NumericMatch, RewardFunction
from grape_lightning.rollout import RolloutDataModule, SamplingParams
from tests.conftest import tiny_spec


class SometimesMissing(RewardFunction):
    """Scores the length of the response but cannot score every third one."""

    def __call__(self, prompts, responses, metadata):
        return [None if i % 3 == 0 else float(len(r) % 2) for i, r in enumerate(responses)]


class LengthParityOnSomePrompts(RewardFunction):
    """Length parity on prompts whose first operand is even, 1 elsewhere: about half the groups
    tie, so dynamic sampling takes extra rounds."""

    def __call__(self, prompts, responses, metadata):
        return [float(len(r) % 2) if int(re.match(r"\d+", p).group()) % 2 == 0 else 1.0 for p, r in zip(prompts, responses)]


class LengthParity(RewardFunction):
    """A reward a random tiny model already varies on: 1 for responses of odd length."""

    def __call__(self, prompts, responses, metadata):
        return [float(len(r) % 2) for r in responses]


def _datamodule(**kwargs):
    options = {"task": ArithmeticTask(num_train=64, num_val=8), "group_size": 4, "batch_size": 4, **kwargs}
    return RolloutDataModule(**options)


def _trainer(tmp_path, max_steps, **kwargs):
    options = dict(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})


def test_invalid_rewards_are_masked_out_and_counted(tmp_path):
    module = GRPOModule(tiny_spec(), rewards=[SometimesMissing()], sampling=SamplingParams(max_new_tokens=4), loss=SurrogateConfig(beta=0.01))
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    rollout = module.collect_rollout(batch)
    assert (~rollout.valid).sum() == 6  # rows 0, 3, 6, 9, 12, 15
    assert torch.isnan(rollout.rewards[~rollout.valid]).all()
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, datamodule)
    assert trainer.callback_metrics["train/invalid_rewards"] == 6
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))


def test_first_iteration_ratio_is_one_and_old_logprobs_match_sampler():
    module = GRPOModule(tiny_spec(dtype="float64"), rewards=[NumericMatch()], sampling=SamplingParams(max_new_tokens=5, temperature=0.9))
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    rollout = module.collect_rollout(next(iter(datamodule.train_dataloader())))
    torch.testing.assert_close(rollout.old_logprobs, rollout.sampling_logprobs, rtol=1e-9, atol=1e-9)
    inputs = rollout.model_inputs(torch.arange(len(rollout)))
    current = module.policy_logprobs(inputs, temperature=0.9).logprobs
    ratio = torch.exp(current - rollout.take("old_logprobs", torch.arange(len(rollout))))
    assert torch.allclose(ratio[inputs["response_mask"]], torch.ones((), dtype=torch.float64), atol=1e-12)
    assert rollout.ref_logprobs is not None  # beta > 0 by default keeps a reference


def test_grpo_takes_iterations_times_minibatches_steps(tmp_path):
    module = GRPOModule(
        tiny_spec(), rewards=[NumericMatch()], sampling=SamplingParams(max_new_tokens=3),
        update=UpdateConfig(epochs=2, mini_batch_size=8, micro_batch_size=3), loss=SurrogateConfig(beta=0.0),
    )
    trainer = _trainer(tmp_path, 8)
    trainer.fit(module, _datamodule())  # 16 sequences a rollout: 2 iterations x 2 mini-batches
    assert trainer.global_step == 8
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2


def test_select_best_keeps_top_k_per_group_above_threshold():
    rewards = torch.tensor([0.1, 0.9, 0.5, float("nan"), 0.3, 0.3, 0.0, 0.2], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    valid = ~torch.isnan(rewards)
    assert select_best(rewards, groups, valid, 2, None).tolist() == [False, True, True, False, True, True, False, False]
    assert select_best(rewards, groups, valid, 2, 0.4).tolist() == [False, True, True, False, False, False, False, False]
    assert select_best(rewards, groups, valid, 1, None).tolist() == [False, True, False, False, True, False, False, False]


@pytest.mark.parametrize(
    "module_class, options",
    [
        (GRPOModule, {"loss": SurrogateConfig(beta=0.02)}),
        (REINFORCEModule, {"advantage": AdvantageConfig("moving_average", "none")}),
        # extra rounds draw fresh prompts seeded by (seed, rank, step, round): the same after a resume
        (GRPOModule, {"loss": SurrogateConfig(beta=0.02), "dynamic_sampling": DynamicSamplingConfig(max_rounds=2, prompts_per_round=2)}),
    ],
    ids=["grpo", "reinforce", "grpo_dynamic_sampling"],
)
def test_resume_mid_run_reproduces_the_uninterrupted_run(tmp_path, module_class, options):
    reward = LengthParityOnSomePrompts() if "dynamic_sampling" in options else LengthParity()

    def make():
        L.seed_everything(0)
        return module_class(
            tiny_spec(), rewards=[reward], sampling=SamplingParams(max_new_tokens=4),
            optimizer=OptimizerConfig(lr=1e-3), **options,
        )

    full = make()
    initial = [p.detach().clone() for p in full.policy.parameters()]
    _trainer(tmp_path / "full", 6).fit(full, _datamodule())
    if "dynamic_sampling" in options:  # the run did sample extra rounds
        assert full.dynamic_sampling_statistics["rounds"] >= 2
    assert any(not torch.equal(a, b) for a, b in zip(initial, full.policy.parameters()))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path / "a", 3, callbacks=[checkpoint], enable_checkpointing=True).fit(make(), _datamodule())
    resumed = make()
    _trainer(tmp_path / "b", 6).fit(resumed, _datamodule(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    for ours, reference in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    for ours, reference in zip(resumed.buffers(), full.buffers()):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_strategies_the_manual_update_cannot_run_under_are_refused_with_the_way_out():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from grape_lightning.algorithms import TRPOModule
    from grape_lightning.strategies import FSDP2Strategy

    def attached(module, strategy_class):
        module._trainer = SimpleNamespace(strategy=object.__new__(strategy_class))
        return module

    grpo = GRPOModule(tiny_spec(), rewards=[NumericMatch()], loss=SurrogateConfig(beta=0.0))
    with pytest.raises(ValueError, match="--trainer.strategy fsdp2"):
        attached(grpo, FSDPStrategy).check_strategy()
    attached(grpo, FSDP2Strategy).check_strategy()  # FSDP2 runs GRPO
    attached(grpo, DeepSpeedStrategy).check_strategy()  # and so does DeepSpeed
    trpo = TRPOModule(tiny_spec(), rewards=[NumericMatch()])
    for sharded in (FSDP2Strategy, DeepSpeedStrategy):
        with pytest.raises(ValueError, match="use ddp"):
            attached(trpo, sharded).check_strategy()
    attached(trpo, DDPStrategy).check_strategy()


@pytest.mark.parametrize("mode", ["none", "tis"])
def test_dynamic_sampling_logs_the_mismatch_only_where_pi_old_was_recomputed(tmp_path, mode):
    """Extra rounds select and concatenate rollouts, which copies the sampler's log-probs apart from
    pi_old's; without a correction, a one-step update still reads pi_old off its own pass and there
    is no second set to compare (no train/mismatch_*); with one, pi_old is recomputed and compared."""
    module = GRPOModule(
        tiny_spec(), rewards=[LengthParityOnSomePrompts()], sampling=SamplingParams(max_new_tokens=4), loss=SurrogateConfig(beta=0.0),
        dynamic_sampling=DynamicSamplingConfig(max_rounds=2, prompts_per_round=2), mismatch=MismatchCorrection(mode),
    )
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, _datamodule())
    assert module.dynamic_sampling_statistics["rounds"] >= 2
    logged = {name for name in trainer.callback_metrics if name.startswith("train/mismatch_")}
    if mode == "none":
        assert not module.needs_old_logprobs and logged == set()
    else:
        assert logged == {"train/mismatch_kl", "train/mismatch_ratio_max", "train/mismatch_abs_max", "train/mismatch_corrected"}
