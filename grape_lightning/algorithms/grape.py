"""GRAPE: rubric-based, confidence-weighted rewards with group-relative advantages."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.surrogate_update import SurrogateConfig, surrogate_update
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.losses.mismatch import MismatchCorrection
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.confidence_weighting import WeightingConfig
from grape_lightning.rewards.critics.base import Critic
from grape_lightning.rewards.judge_reliability import ReliabilityEstimate
from grape_lightning.rewards.rubric import load_rubric
from grape_lightning.rewards.rubric_scorer import ConfidenceWeightedRubric
from grape_lightning.rewards.rubric_statistics import item_statistics
from grape_lightning.rewards.rubric_table import mean_over_steps, rubric_table
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.off_policy import OffPolicyConfig, OffPolicyResponses
from grape_lightning.rollout.sampling import SamplingParams


class GRAPEModule(OnPolicyModule):
    """Generalized Relative Advantage Policy Evolution.

    For each prompt x (category from ``metadata["category"]``), the sample set is the policy's G
    samples (``group_size``) plus optional off-policy responses (:class:`OffPolicyConfig`). Each
    (response i, item k) of the category's rubric gets a score s_ik and a confidence c_ik
    (verifiable items c = 1; judged items from a critic; reward-model items s = sigmoid(r), c = 1).
    Then (:class:`~grape_lightning.rewards.rubric_scorer.ConfidenceWeightedRubric`)

        omega_k = w_k * mean_i c_ik,        r_i = sum_{k in J_i} omega_k s_ik / sum_{k in J_i} omega_k
        A_i     = scale(r_i - b_i)          (``advantage``; default: b the set's mean, no scaling)

    (``weighting`` may form omega_k otherwise: from the item's measured agreement with the
    verifiable items of its category, or from w_k alone;
    :func:`~grape_lightning.rewards.confidence_weighting.item_weights`)

    where J_i are the items that could be scored for response i (a verifier that returns None or
    a critic that fails scores nothing). A response with no scored item has no reward: like an
    unscored response in GRPO it leaves the update and every statistic of its set. The update is
    GRPO's clipped surrogate with KL to the reference, the same code
    (:func:`~grape_lightning.algorithms.surrogate_update.surrogate_update`): with one verifiable
    item of weight 1 and GRPO's advantage settings it is exactly GRPO.

    Off-policy members always count in the baseline; they enter the surrogate as
    ``off_policy.treatment`` says (``positive_only``: only with an advantage > 0).

    Logged per item and step (``rubric/<category>/<item>/...``, over every process's responses;
    definitions in :mod:`~grape_lightning.rewards.rubric_statistics`): ``score``, ``confidence``,
    ``spread`` (std of scores within a sample set, averaged over sets), ``failures``, ``omega``,
    ``reward_share``, ``advantage_share`` and, for items that are not verifiable, ``agreement``
    with the verifiable items of their category, ``calibration_error`` of the confidence against
    it, and ``reliability`` (the running agreement, :class:`ReliabilityEstimate`); per response,
    the sample table shows every item's score and confidence and the critiques. At the end of
    ``fit`` the run prints a table of every item's statistics averaged over the training steps of
    that ``fit`` (:func:`~grape_lightning.rewards.rubric_table.rubric_table`; ``grape
    rubric-report`` prints it from a run's logs and suggests weights for the next run).

    Args:
        policy: the model to train.
        rubric: YAML file of rubrics per prompt category (relative to the working directory).
        critics: critics by name, referred to by the rubric's judged items.
        accuracy: rubric item ("category/item") whose score 1 marks a correct response (None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        advantage: baseline (``mean`` or ``leave_one_out`` of the sample set, ...) and scaling.
        off_policy: responses added to each sample set besides the policy's samples.
        loss: clip range, KL penalty and token aggregation of the surrogate.
        update: epochs, mini- and micro-batches, clipping.
        mismatch: correction of the sampler/trainer mismatch (``tis``, ``token_mask``,
            ``sequence_mask``; default none), a stop-gradient weight on each token's policy term
            (:mod:`grape_lightning.losses.mismatch`).
        seed: seeds sampling (per rank and step, so a resumed run samples the same).
        dynamic_sampling: DAPO's dynamic sampling: groups whose rewards all tie are replaced by
            fresh ones (``{max_rounds: 3}``; None: off; :mod:`grape_lightning.rollout.dynamic_sampling`).
        weighting: how the rubric items' weights in a sample set are formed: ``{mode: confidence}``
            (the default, omega_k = w_k mean_i c_ik), ``{mode: reliability, momentum: 0.9}`` (w_k
            times the item's running agreement with the verifiable items of its category, by
            confidence until it is measured) or ``{mode: fixed}`` (omega_k = w_k).
    """

    reads_old_logprobs_off_its_pass = True  # off-policy members too, whose sampler log-probs do not exist

    def __init__(
        self,
        policy: ModelSpec,
        rubric: str,
        critics: Mapping[str, Critic] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        advantage: AdvantageConfig | None = None,
        off_policy: OffPolicyConfig | None = None,
        loss: SurrogateConfig | None = None,
        update: UpdateConfig | None = None,
        mismatch: MismatchCorrection | None = None,
        seed: int = 0,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        weighting: WeightingConfig | None = None,
    ) -> None:
        loss = as_dataclass(loss, SurrogateConfig) or SurrogateConfig()
        off_policy = as_dataclass(off_policy, OffPolicyConfig) or OffPolicyConfig()
        loaded = load_rubric(rubric)
        reliability = ReliabilityEstimate(len(loaded.item_keys))
        scorer = ConfidenceWeightedRubric(
            loaded, dict(critics or {}), accuracy, as_dataclass(weighting, WeightingConfig) or WeightingConfig(), reliability,
        )
        super().__init__(
            policy, scorer, sampling, optimizer, update, reference=loss.beta > 0, seed=seed, mismatch=mismatch,
            off_policy=OffPolicyResponses(off_policy), dynamic_sampling=dynamic_sampling,
        )
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="mean", scaling="none")
        self.check_dynamic_sampling(self.advantage.baseline)
        self.off_policy = off_policy
        self.loss = loss
        self.scorer = scorer
        self.reliability = reliability  # a buffer of the module: checkpoints carry it
        self.item_history: list[dict[str, dict[str, float]]] = []  # per training step of this fit, for the summary

    def update(self, rollout: Rollout) -> None:
        advantages = compute_advantages(self.advantage, rollout.rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes)
        trained = trained_members(rollout.valid, rollout.off_policy, advantages.advantages, self.off_policy.treatment)
        self.log_metrics({"off_policy_responses": float(rollout.off_policy.sum())}, prefix="")
        self.log_metrics(self.rubric_item_statistics(rollout, advantages.advantages), prefix="")
        self.log_metrics(surrogate_update(self, rollout, advantages.advantages, trained, self.loss))

    def rubric_item_statistics(self, rollout: Rollout, advantages: Tensor) -> dict[str, float]:
        """The step's per-item statistics over every process (the item weights recomputed as the
        rewards used them: the reliability estimate has not moved since the rollout was scored),
        then the reliability estimate folds in the step's agreement. Returns the metrics to log
        (none for a rollout that was not scored by the rubric, one put together by hand)."""
        if not rollout.reward_confidences:
            return {}
        device = rollout.rewards.device
        items = self.scorer.scored_items(
            {key: term.to(device) for key, term in rollout.reward_terms.items()},
            {key: value.to(device) for key, value in rollout.reward_confidences.items()},
        )
        omega = self.scorer.omega(items, rollout.groups)
        statistics = item_statistics(
            items.keys, items.scores, items.confidences, items.weights, items.applicable, items.failed,
            self.scorer.items.verifiable.to(device), rollout.groups, omega, advantages, self.advantage, self.sum_across_processes,
        )
        self.reliability.update(statistics.agreement, self.scorer.weighting.momentum)
        for column, key in enumerate(items.keys):
            if bool(self.reliability.measured[column]) and key in statistics.per_item:
                statistics.per_item[key]["reliability"] = float(self.reliability.value[column])
        self.item_history.append(statistics.per_item)
        return statistics.metrics()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.item_history = []

    def on_fit_end(self) -> None:
        """Print the rubric items' statistics averaged over this fit's training steps."""
        if not self.item_history:
            return
        weights = {f"{category}/{item.name}": item.weight for category, item in self.scorer.items.columns}
        table = rubric_table(mean_over_steps(self.item_history), keys=self.scorer.items.keys, weights=weights)
        rank_zero_info(
            f"\nrubric items over the {len(self.item_history)} training steps of this fit "
            f"(weighting: {self.scorer.weighting.mode}; %: share of the reward / of sum |A|):\n{table}"
        )


def trained_members(valid: Tensor, off_policy: Tensor, advantages: Tensor, treatment: str) -> Tensor:
    """[N] bool: the members of the sample sets that enter the surrogate: the valid samples, and the
    valid off-policy members as ``treatment`` says (``all``; ``positive_only``: advantage > 0;
    ``baseline_only``: none)."""
    if treatment == "all":
        return valid
    if treatment == "baseline_only":
        return valid & ~off_policy
    return valid & (~off_policy | (advantages > 0))
