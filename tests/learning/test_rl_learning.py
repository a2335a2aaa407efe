"""Each on-policy algorithm raises the greedy validation accuracy of the SFT-warmed tiny model.

Starting point: grape/tiny-addition-sft answers 48% of the 200 held-out two-digit additions
correctly under greedy decoding. Each run takes 100 optimizer steps (100 rollout batches of
16 prompts x 8 samples), about ten seconds on two CPU cores.
"""

import lightning as L
import pytest

from grape_lightning.algorithms import (
    AdvantageConfig, CISPOModule, DynamicSamplingConfig, GRPOModule, GSPOModule, OptimizerConfig, REINFORCEModule, RejectionSamplingModule, SurrogateConfig,
    UpdateConfig,
)
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.models import ModelSpec
from grape_lightning.rewards import NumericMatch, OverlongPunishment
from grape_lightning.rollout import RolloutDataModule, SamplingParams

ALGORITHMS = {
    "grpo": (GRPOModule, {"loss": SurrogateConfig(beta=0.0)}),
    "grpo_kl_token": (GRPOModule, {"loss": SurrogateConfig(beta=0.01, aggregation="token", eps_high=0.28)}),
    # two steps per rollout batch (mini-batches of 64 of its 128 responses): the second step's
    # ratios differ from 1, so the clip acts
    "gspo": (GSPOModule, {"update": UpdateConfig(mini_batch_size=64)}),
    "cispo": (CISPOModule, {"update": UpdateConfig(mini_batch_size=64)}),
    "reinforce": (REINFORCEModule, {"advantage": AdvantageConfig("leave_one_out", "none")}),
    # configs/rloo.yaml and configs/reinforce_pp.yaml: the KL to the reference per sequence, or per
    # token as a reward-to-go with the advantages whitened over the global batch's tokens
    "rloo": (REINFORCEModule, {"advantage": AdvantageConfig("leave_one_out", "none"), "kl_coef": 0.01}),
    "reinforce_pp": (REINFORCEModule, {"advantage": AdvantageConfig("none", "whiten"), "kl_coef": 0.01, "kl_reward": "token"}),
    "rejection_sampling": (RejectionSamplingModule, {"keep_top_k": 1, "reward_threshold": 1.0}),
    # configs/dapo.yaml: clip-higher, token aggregation, no KL, dynamic sampling (4 fresh prompts
    # per extra round), the soft overlong punishment beside the task's reward
    "dapo": (GRPOModule, {
        "loss": SurrogateConfig(beta=0.0, eps_high=0.28, aggregation="token"),
        "dynamic_sampling": DynamicSamplingConfig(max_rounds=3, prompts_per_round=4),
    }),
}
EXTRA_REWARDS = {"dapo": lambda: [OverlongPunishment(max_length=6, cache_length=2)]}


def _val_accuracy(trainer, module, datamodule) -> float:
    return trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]


def train_from_sft_model(module_class, rewards, options: dict, max_steps: int, tmp_path):
    """Train ``module_class`` from grape/tiny-addition-sft on two-digit additions (16 prompts x 8
    samples per rollout batch); returns the trainer and the greedy val accuracy before and after."""
    L.seed_everything(0)
    module = module_class(
        policy=ModelSpec(name_or_path="grape/tiny-addition-sft"),
        rewards=rewards,
        accuracy="numeric_match",
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
        optimizer=OptimizerConfig(lr=2e-4),
        **options,
    )
    datamodule = RolloutDataModule(
        task=ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200),
        group_size=8, batch_size=16, val_batch_size=200,
    )
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0,
        val_check_interval=1000, check_val_every_n_epoch=None, default_root_dir=tmp_path,
    )
    before = _val_accuracy(trainer, module, datamodule)
    trainer.fit(module, datamodule)
    return trainer, before, _val_accuracy(trainer, module, datamodule)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_validation_accuracy_rises(name, tmp_path):
    module_class, options = ALGORITHMS[name]
    rewards = [NumericMatch(), *EXTRA_REWARDS.get(name, list)()]
    trainer, before, after = train_from_sft_model(module_class, rewards, options, 100, tmp_path)
    print(f"{name}: greedy val accuracy {before:.3f} -> {after:.3f}")
    assert trainer.global_step == 100
    if name == "dapo":  # extra rounds sampled fresh prompts (validation replaces callback_metrics: read the module)
        statistics = trainer.lightning_module.dynamic_sampling_statistics
        print(f"dapo, last step: {statistics}")
        assert statistics["prompts_generated"] >= 16 and 1 <= statistics["rounds"] <= 4
    assert after >= before + 0.08
