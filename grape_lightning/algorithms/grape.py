"""GRAPE: rubric-based, confidence-weighted rewards with group-relative advantages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from grape_lightning.advantages import RewardScaling, group_relative_advantages, group_statistics, leave_one_out_baseline
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.grpo import GRPOModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.data.collate import pad_right
from grape_lightning.losses.aggregation import Aggregation
from grape_lightning.losses.kl import KLEstimator
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.combined import RewardScores
from grape_lightning.rewards.confidence_weighting import confidence_weighted_rewards
from grape_lightning.rewards.critics.base import Critic
from grape_lightning.rewards.rubric import load_rubric
from grape_lightning.rewards.rubric_scorer import RubricScorer, RubricScores
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.engine import Generation
from grape_lightning.rollout.sampling import SamplingParams

OffPolicyTreatment = Literal["positive_only", "all", "baseline_only"]


@dataclass
class OffPolicyConfig:
    """Responses added to each prompt's sample set besides the policy's own samples.

    - ``reference_answers``: the dataset's reference answer (``metadata[answer_key]``);
    - ``responses_file``: JSONL rows ``{"prompt": ..., "response": ...}`` (outputs of another model
      or an earlier checkpoint); every row whose prompt matches is added.

    They are scored like the samples and always count in the baseline. In the update each enters
    the clipped surrogate according to ``treatment``:

    - ``positive_only`` (default): only with an advantage > 0: learn from off-policy answers that
      beat the policy's average, never push down an answer the policy did not produce;
    - ``all``: always;
    - ``baseline_only``: never (they only shape the baseline).

    Their ratio and its bias. An off-policy response y comes from a behaviour policy mu (the
    dataset, another model) whose probabilities are unknown, so no sampler log-probs exist for it
    (stored as NaN) and its ratio is formed against pi_old: rho_t = pi_theta(y_t) / pi_old(y_t),
    pi_old's log-probs computed by a forward pass (rho = 1 at the first step, as for the samples).
    Its surrogate gradient is A grad log pi_theta(y) (within the clip range): the row counts as if
    pi_old had sampled it, without the importance weight pi_old(y) / mu(y) that would make it an
    unbiased term of the policy gradient. The update is thus biased towards the off-policy
    answers by how often they are added, not how likely pi_old is to produce them: with
    ``positive_only`` it is advantage-weighted supervised learning on the answers that beat the
    set. The clip bounds pi_theta / pi_old, not pi_theta / mu: it limits how far one rollout moves
    pi on those tokens, however unlikely pi_old found them.

    With beta > 0 their tokens also carry the KL term in the loss. There it is no estimate of
    KL(pi || ref) (pi did not sample them) but a per-token penalty, 0 with 0 gradient where
    l = l_ref, that keeps pi's log-probs of those tokens near the reference's; ``train/kl``
    leaves them out and averages the policy's own samples only.

    Args:
        reference_answers: add the dataset's reference answer to each sample set.
        answer_key: metadata field that holds the reference answer.
        responses_file: JSONL of ``{"prompt", "response"}`` rows added to the sample sets of matching
            prompts.
        treatment: how off-policy members enter the update: ``positive_only``, ``all`` or
            ``baseline_only``.
    """

    reference_answers: bool = False
    answer_key: str = "answer"
    responses_file: str | None = None
    treatment: OffPolicyTreatment = "positive_only"


def _read_off_policy_file(path: str) -> dict[str, list[str]]:
    by_prompt: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, response = row["prompt"], row["response"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected {{'prompt': str, 'response': str}} ({error})") from error
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{path}:{number}: fields 'prompt' and 'response' must be strings")
        by_prompt.setdefault(prompt, []).append(response)
    return by_prompt


class GRAPEModule(GRPOModule):
    """Generalized Relative Advantage Policy Evolution.

    For each prompt x (category from ``metadata["category"]``), the sample set is the policy's G
    samples (``group_size``) plus optional off-policy responses. Each (response i, item k) of the
    category's rubric gets a score s_ik and a confidence c_ik (verifiable items c = 1; judged
    items from a critic; reward-model items s = sigmoid(r), c = 1). Then

        omega_k = w_k * mean_i c_ik,        r_i = sum_{k in J_i} omega_k s_ik / sum_{k in J_i} omega_k
        A_i     = r_i - b_i,  b_i = mean_j r_j ("mean") or the mean of the others ("leave_one_out"),
                  divided by the std of the set (``reward_scaling="group"``), of the batch, or not ("none")

    where J_i are the items that could be scored for response i (a verifier that returns None or
    a critic that fails scores nothing). A response with no scored item has no reward: like an
    unscored response in GRPO it leaves the update, takes no part in the set's mean, std or
    leave-one-out baselines, and adds neither KL nor normaliser weight (see
    :func:`~grape_lightning.rewards.confidence_weighting.confidence_weighted_rewards`). The stds
    are unbiased (n - 1), as GRPO's. The update is GRPO's clipped surrogate with KL to the
    reference (the same loss code). With one verifiable item of weight 1, mean baseline and group
    scaling it is exactly GRPO, also when the verifier fails on some responses.

    Logged per item (``rubric/<category>/<item>/...``): mean score, mean confidence, spread (std
    of scores within a sample set, averaged over sets), critic failures; per response, the sample
    table shows every item's score and confidence and the critiques.

    Args:
        rubric: YAML file of rubrics per prompt category (relative to the working directory).
        critics: critics by name, referred to by the rubric's judged items.
        baseline: ``mean`` of the sample set or ``leave_one_out`` (the mean of the others).
        off_policy: responses added to each sample set besides the policy's samples.
        beta: weight of the KL penalty to the reference (0: no reference model).
        eps_low: lower clip range: ratios below 1 - eps_low are clipped.
        eps_high: upper clip range: ratios above 1 + eps_high are clipped (clip-higher when > eps_low).
        reward_scaling: divide advantages by the std of the group (``group``), of the batch (``batch``),
            or not (``none``).
        aggregation: loss over tokens: ``sequence`` (mean per sequence, then over sequences), ``token``
            or ``constant``.
        kl_estimator: KL term of the loss: ``k3`` (its gradient is that of KL(ref || pi)) or ``k2``
            (that of KL(pi || ref)); ``k1`` is refused, its expected gradient being 0.
        num_iterations: passes over each rollout batch.
        mini_batch_size: sequences per optimizer step (None: the whole rollout batch).
        filter_tied_groups: drop groups whose rewards all tie from the loss.
    """

    def __init__(
        self,
        policy: ModelSpec,
        rubric: str,
        critics: Mapping[str, Critic] | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        baseline: Literal["mean", "leave_one_out"] = "mean",
        reward_scaling: RewardScaling = "none",
        off_policy: OffPolicyConfig | None = None,
        beta: float = 0.04,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        aggregation: Aggregation = "sequence",
        kl_estimator: KLEstimator = "k3",
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        filter_tied_groups: bool = False,
        micro_batch_size: int = 64,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(
            policy, None, sampling, optimizer, beta=beta, eps_low=eps_low, eps_high=eps_high,
            reward_scaling=reward_scaling, aggregation=aggregation, kl_estimator=kl_estimator,
            num_iterations=num_iterations, mini_batch_size=mini_batch_size, filter_tied_groups=filter_tied_groups,
            micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm,
            gradient_checkpointing=gradient_checkpointing, logprob_chunk_size=logprob_chunk_size, seed=seed,
        )
        if baseline not in ("mean", "leave_one_out"):
            raise ValueError(f"baseline must be 'mean' or 'leave_one_out', got {baseline!r}")
        self.scorer = RubricScorer(load_rubric(rubric), dict(critics or {}))
        self.baseline = baseline
        self.off_policy = as_dataclass(off_policy, OffPolicyConfig) or OffPolicyConfig()
        self.off_policy_responses = _read_off_policy_file(self.off_policy.responses_file) if self.off_policy.responses_file else {}
        self.last_rubric_scores: RubricScores | None = None

    # -- the sample set --------------------------------------------------------------------------
    def _off_policy_texts(self, prompt: str, metadata: dict[str, Any]) -> list[str]:
        texts = list(self.off_policy_responses.get(prompt, []))
        if self.off_policy.reference_answers and metadata.get(self.off_policy.answer_key) is not None:
            texts.append(str(metadata[self.off_policy.answer_key]))
        return texts

    def extend_sample_set(self, batch: dict[str, Any], generation: Generation) -> tuple[Generation, dict[str, Any]]:
        first_rows = {}
        for row, group in enumerate(batch["groups"].tolist()):
            first_rows.setdefault(group, row)
        extra_rows, extra_responses = [], []
        for group, row in first_rows.items():
            for text in self._off_policy_texts(batch["prompts"][row], batch["metadata"][row]):
                extra_rows.append(row)
                extra_responses.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id])
        if not extra_rows:
            return generation, batch
        width = generation.prompt_width
        rows = torch.tensor(extra_rows, device=generation.input_ids.device)
        responses = pad_right(extra_responses, self.tokenizer.pad_token_id).to(generation.input_ids.device)
        response_mask = pad_right([[1] * len(r) for r in extra_responses], 0, dtype=torch.bool).to(responses.device)
        total = max(generation.input_ids.shape[1], width + responses.shape[1])

        def widen(tensor: Tensor, value: float | int | bool) -> Tensor:
            return torch.nn.functional.pad(tensor, (0, total - tensor.shape[1]), value=value)

        extra_ids = torch.cat([generation.input_ids[rows, :width], responses], dim=1)
        extra_attention = torch.cat([generation.attention_mask[rows, :width], response_mask.long()], dim=1)
        extra_response_mask = torch.cat([torch.zeros_like(response_mask[:, :0]).new_zeros(len(rows), width), response_mask], dim=1)
        pad = self.tokenizer.pad_token_id
        # no sampler produced these responses: their sampling log-probs do not exist
        missing_logprobs = torch.where(widen(extra_response_mask, False), float("nan"), 0.0).to(generation.logprobs.dtype)
        extended = Generation(
            input_ids=torch.cat([widen(generation.input_ids, pad), widen(extra_ids, pad)]),
            attention_mask=torch.cat([widen(generation.attention_mask, 0), widen(extra_attention, 0)]),
            response_mask=torch.cat([widen(generation.response_mask, False), widen(extra_response_mask, False)]),
            logprobs=torch.cat([widen(generation.logprobs, 0.0), missing_logprobs]),
            prompt_width=width,
            finished=torch.cat([generation.finished, torch.ones(len(rows), dtype=torch.bool, device=rows.device)]),
        )
        off_policy = torch.cat([torch.zeros(len(batch["prompts"]), dtype=torch.bool), torch.ones(len(rows), dtype=torch.bool)])
        extended_batch = {
            **batch,
            "prompts": batch["prompts"] + [batch["prompts"][r] for r in extra_rows],
            "metadata": batch["metadata"] + [batch["metadata"][r] for r in extra_rows],
            "groups": torch.cat([batch["groups"], batch["groups"][rows.cpu()]]),
            "off_policy": off_policy,
        }
        return extended, extended_batch

    # -- rewards and advantages ------------------------------------------------------------------
    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], groups: Tensor) -> RewardScores:
        item_scores = self.scorer(prompts, responses, metadata)
        rewards, _ = confidence_weighted_rewards(
            item_scores.scores, item_scores.confidences, item_scores.weights, groups.cpu(),
            item_scores.applicable, item_scores.failed,
        )
        self.last_rubric_scores = item_scores
        per_item = {
            key: torch.where(item_scores.applicable[:, k] & ~item_scores.failed[:, k], item_scores.scores[:, k], float("nan"))
            for k, key in enumerate(item_scores.keys)
        }
        details = [
            {
                **{key: f"s={float(item_scores.scores[i, k]):.2f} c={float(item_scores.confidences[i, k]):.2f}"
                   + (" (failed)" if item_scores.failed[i, k] else "")
                   for k, key in enumerate(item_scores.keys) if item_scores.applicable[i, k]},
                "critiques": "; ".join(f"{name}: {text}" for name, text in item_scores.critiques[i].items()),
            }
            for i in range(len(responses))
        ]
        valid = ~torch.isnan(rewards)
        return RewardScores(total=rewards, valid=valid, per_function=per_item, details=details)

    def advantages(self, rollout: Rollout) -> Tensor:
        if self.baseline == "mean":
            return group_relative_advantages(rollout.rewards, rollout.groups, rollout.valid, self.reward_scaling)
        centred = rollout.rewards - leave_one_out_baseline(rollout.rewards, rollout.groups, rollout.valid)
        if self.reward_scaling == "group":
            centred = centred / (group_statistics(rollout.rewards, rollout.groups, rollout.valid).std[rollout.groups] + 1e-4)
        elif self.reward_scaling == "batch":
            centred = centred / (self.batch_reward_std(rollout) + 1e-4)  # over every rank's rewards
        return torch.where(rollout.valid, centred, 0.0)

    def trained_rows(self, rollout: Rollout, advantages: Tensor, tied_groups: Tensor) -> Tensor:
        trained = super().trained_rows(rollout, advantages, tied_groups)
        if rollout.off_policy is None or not rollout.off_policy.any():
            return trained
        treatment = self.off_policy.treatment
        if treatment == "baseline_only":
            return trained & ~rollout.off_policy
        if treatment == "positive_only":
            return trained & (~rollout.off_policy | (advantages > 0))
        return trained

    # -- evolution: per-item statistics ----------------------------------------------------------
    def update(self, rollout: Rollout) -> None:
        self._log_rubric(rollout)
        super().update(rollout)

    def _log_rubric(self, rollout: Rollout) -> None:
        scores = self.last_rubric_scores
        if scores is None:
            return
        groups = rollout.groups.cpu()
        metrics: dict[str, float] = {"critic_failures": float(scores.failed.sum())}
        if rollout.off_policy is not None:
            metrics["off_policy_responses"] = float(rollout.off_policy.sum())
        for k, key in enumerate(scores.keys):
            judged = scores.applicable[:, k] & ~scores.failed[:, k]
            if not scores.applicable[:, k].any():
                continue
            metrics[f"rubric/{key}/failures"] = float(scores.failed[:, k].sum())
            if judged.any():
                metrics[f"rubric/{key}/score"] = float(scores.scores[judged, k].mean())
                metrics[f"rubric/{key}/confidence"] = float(scores.confidences[scores.applicable[:, k], k].mean())
                spread = group_statistics(torch.where(judged, scores.scores[:, k], float("nan")), groups, judged)
                metrics[f"rubric/{key}/spread"] = float(spread.std[spread.count >= 2].mean()) if (spread.count >= 2).any() else 0.0
        self.log_metrics(metrics, prefix="")
