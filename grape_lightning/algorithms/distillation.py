"""On-policy distillation: the student samples, a frozen teacher scores every sampled token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.update_loop import LossOutput, UpdateConfig, run_update
from grape_lightning.losses.distillation import distillation_loss
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.teacher import load_teacher
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer, Scores
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams


def _unrewarded(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], groups: Tensor) -> Scores:
    """Distillation without a task reward: every response takes part, with reward 0."""
    count = len(responses)
    return Scores(rewards=torch.zeros(count, dtype=torch.float64), valid=torch.ones(count, dtype=torch.bool), terms={})


class OnPolicyDistillationModule(OnPolicyModule):
    """The student (the policy pi) samples responses y to the prompts; the teacher pi_T, another
    causal LM with the same tokenizer, scores each sampled token, once per rollout batch; the
    student follows the per-token reverse KL(pi || pi_T) on its own samples
    (:func:`~grape_lightning.losses.distillation.distillation_loss`):

        k_t = l_t - l^T_t                      l_t = log pi(y_t | x, y_<t),  l^T_t = log pi_T(y_t | x, y_<t)
        A_t = -sum_{t' >= t} gamma^(t' - t) sg[k_t']  +  alpha A_i
        L   = -sum_{i,t} A_it l_it / sum_i |y_i|

    over the response tokens of the global mini-batch. gamma (``discount``) 0, the default, is the
    per-token reverse KL at the states the student visits (lowest variance); gamma 1 the exact
    gradient of the reverse KL of whole responses. alpha (``reward_coef``) mixes in a task reward:
    A_i = scale(r_i - b_i) of the rewards (``advantage``, by default GRPO's group mean and std);
    alpha 0 is pure distillation, the reward functions then only measure (``train/reward``,
    ``val/accuracy``), and every response trains, scorable or not (with alpha > 0 only those with
    a valid reward). Both models' log-probs are at the sampling temperature T, so the KL is 0
    exactly when the student's logits are the teacher's (up to a constant). k_t reads l_t off the
    update's own forward pass: no pi_old pass is needed.

    One pass over each rollout batch (``update.epochs`` 1: the loss has no importance ratio for a
    second); one optimizer step per rollout batch, or one per mini-batch with
    ``update.mini_batch_size``. Logged: ``train/reverse_kl`` (the token-mean k, the estimate of the
    per-token reverse KL under the update's weights), ``train/policy_loss`` (the surrogate L),
    ``train/entropy``, and with alpha > 0 ``train/advantage_abs_mean`` (of the task advantages).

    The teacher is loaded when a Trainer first sets the module up (:meth:`configure_model`), not by
    ``load_from_checkpoint``, so ``grape export`` never reads it; it is a submodule, so it moves to
    the device with the student and is sharded (FSDP2) and compiled as the reference would be, and
    it never enters checkpoints: a resumed run rebuilds it from ``teacher``. Its tokenizer must
    encode and decode as the student's (checked, with the first differences in the error).

    Args:
        policy: the student, the model to train.
        teacher: the frozen teacher (:class:`ModelSpec`: hub id, local directory, ``grape/<name>``
            or a config); same tokenizer as the student, any architecture or size.
        rewards: reward functions, combined as sum_k w_k r_k (None: no task reward, no accuracy).
        accuracy: name of the reward function whose value 1 marks a correct response.
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        discount: gamma in [0, 1], the discount of the later tokens' KL in a token's advantage.
        reward_coef: alpha, the weight of the task-reward advantage (0: pure distillation).
        advantage: baseline and scaling of the task-reward advantage (default: group mean, group std).
        update: mini- and micro-batches, clipping (one epoch).
        seed: seeds sampling (per rank and step, so a resumed run samples the same).
    """

    def __init__(
        self,
        policy: ModelSpec,
        teacher: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        discount: float = 0.0,
        reward_coef: float = 0.0,
        advantage: AdvantageConfig | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
    ) -> None:
        if reward_coef != 0 and not rewards:
            raise ValueError("reward_coef > 0 mixes in a task reward: pass the reward functions (rewards)")
        if accuracy is not None and not rewards:
            raise ValueError(f"accuracy {accuracy!r} names a reward function, but there are none (rewards)")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {discount}")
        scorer = RewardScorer(list(rewards), accuracy) if rewards else _unrewarded
        super().__init__(policy, scorer, sampling, optimizer, update, reference=False, seed=seed)
        if self.update_config.epochs != 1:
            raise ValueError(
                "on-policy distillation takes one pass over each rollout (update.epochs: 1): its loss has no ratio for a second"
            )
        self.teacher_spec: ModelSpec = as_dataclass(teacher, ModelSpec)
        self.teacher: PreTrainedModel | None = None  # loaded by configure_model
        self.keep_out_of_checkpoints("teacher")
        self.discount = discount
        self.reward_coef = reward_coef
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="mean", scaling="group")

    @property
    def needs_old_logprobs(self) -> bool:
        return False  # k_t reads the student's log-probs off the update's own forward pass

    # -- the teacher ----------------------------------------------------------------------------
    def frozen_models(self) -> list[nn.Module]:
        teacher = getattr(self, "teacher", None)
        return super().frozen_models() + ([teacher] if isinstance(teacher, nn.Module) else [])

    def configure_model(self) -> None:
        if self._trainer is not None and self.teacher is None:  # before the strategy moves, wraps or shards the module
            self.teacher = load_teacher(self.teacher_spec, self.tokenizer)
        super().configure_model()

    def collect_rollout(self, batch: dict[str, Any], sampling: SamplingParams | None = None) -> Rollout:
        """The rollout of :class:`OnPolicyModule`; for training (not greedy) with the teacher's
        log-probs of the sampled tokens, at the sampling temperature."""
        rollout = super().collect_rollout(batch, sampling)
        if not (sampling or self.sampling).greedy:
            if self.teacher is None:
                raise RuntimeError("the teacher is loaded by configure_model: train the module with a Trainer")
            rollout.teacher_logprobs = self.collector.logprobs(
                rollout, self.teacher, like=rollout.old_logprobs, temperature=self.sampling.logprob_temperature
            )
        return rollout

    # -- the update -----------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> None:
        mixed = self.reward_coef != 0
        trained = rollout.valid if mixed else torch.ones_like(rollout.valid)
        task_advantages = None
        if mixed:
            task_advantages = compute_advantages(
                self.advantage, rollout.rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes
            ).advantages
        trained_tokens = rollout.response_mask & trained[:, None]

        def normalisers(index: Tensor) -> Tensor:
            return torch.stack([trained[index].sum(), trained_tokens[index].sum()])

        def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
            inputs = rollout.model_inputs(micro)
            token = self.token_logprobs(inputs, with_entropy=True)
            mask = inputs["response_mask"] & trained[micro, None]
            loss, metrics = distillation_loss(
                token.logprobs, rollout.take("teacher_logprobs", micro), mask, discount=self.discount,
                task_advantages=None if task_advantages is None else task_advantages[micro], reward_coef=self.reward_coef,
                num_tokens=float(totals[1]),
            )
            tokens = float(mask.sum())
            entropy = (token.entropy.detach() * mask).sum() / max(tokens, 1.0)
            return LossOutput(loss, terms=metrics, means={"entropy": entropy}, weight=tokens)

        metrics = run_update(self, trained.nonzero().flatten(), self.update_config, normalisers, micro_loss)
        if task_advantages is not None:
            totals = torch.stack([task_advantages[rollout.valid].abs().sum(), rollout.valid.sum()]).double()
            advantage_abs, count = self.sum_across_processes(totals).tolist()
            metrics["advantage_abs_mean"] = advantage_abs / max(count, 1.0)
        self.log_metrics(metrics)
