"""Score every (response, rubric item) pair: verifiers, critics and reward models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grape_lightning.rewards.base import RewardFunction, is_missing
from grape_lightning.rewards.code_execution import UnitTests
from grape_lightning.rewards.confidence_weighting import WeightingConfig, item_weights, weighted_rewards
from grape_lightning.rewards.critics.base import Critic, JudgeRequest, checked
from grape_lightning.rewards.judge_reliability import ReliabilityEstimate
from grape_lightning.rewards.reward_model import RewardModelScore
from grape_lightning.rewards.rubric import Rubric, RubricItem
from grape_lightning.rewards.scorer import Scores, accuracy_term
from grape_lightning.rewards.verifiers import ExactMatch, JSONSchemaMatch, NumericMatch, PythonCallable, RegexMatch


@dataclass
class RubricScores:
    """Column k is ``keys[k]`` = "category/item"."""

    keys: list[str]
    weights: Tensor  # [K]
    scores: Tensor  # [N, K]
    confidences: Tensor  # [N, K]
    applicable: Tensor  # [N, K] bool
    failed: Tensor  # [N, K] bool
    critiques: list[dict[str, str]] = field(default_factory=list)  # per response: item -> critique


def verifier_for(item: RubricItem) -> RewardFunction:
    """The reward function behind a verifiable item (its confidence is always 1)."""
    params = item.params
    check = params["check"]
    if check == "exact_match":
        return ExactMatch(answer_key=params.get("answer_key", "answer"))
    if check == "numeric_match":
        return NumericMatch(answer_key=params.get("answer_key", "answer"), tolerance=params.get("tolerance", 1e-6))
    if check == "regex":
        return RegexMatch(params["pattern"])
    if check == "json_schema":
        return JSONSchemaMatch(params["schema"])
    if check == "python":
        return PythonCallable(params["function"])
    return UnitTests(
        tests=params.get("tests"), timeout=params.get("timeout", 10.0), memory_mb=params.get("memory_mb", 1024),
        allow_unsandboxed=params.get("allow_unsandboxed", False),
    )


class RubricScorer:
    """Evaluates a :class:`Rubric` on a batch of responses.

    Verifiable items: s = the check's value, c = 1 (a check that cannot run, e.g. no reference
    answer, or returns None, fails). Judged items: the named critic's score and confidence
    (failures and garbage: failed). Reward-model items: s = sigmoid(r(x, y)), c = 1. A failed
    (response, item) has no score: the response's reward aggregates over its other items, and a
    response with none left has no reward (it leaves the update).
    """

    def __init__(self, rubric: Rubric, critics: dict[str, Critic] | None = None) -> None:
        self.rubric = rubric
        self.critics = critics or {}
        self.columns = rubric.item_keys
        self.evaluators: list[Any] = []
        for category, item in self.columns:
            if item.kind == "verifiable":
                self.evaluators.append(verifier_for(item))
            elif item.kind == "judged":
                if item.params["critic"] not in self.critics:
                    raise ValueError(
                        f"{rubric.source}: item {category}/{item.name} needs critic {item.params['critic']!r}; "
                        f"configured critics: {sorted(self.critics)}"
                    )
                self.evaluators.append(self.critics[item.params["critic"]])
            else:
                self.evaluators.append(RewardModelScore(item.params["path"], tokenizer=item.params.get("tokenizer")))

    @property
    def keys(self) -> list[str]:
        return [f"{category}/{item.name}" for category, item in self.columns]

    @property
    def weights(self) -> Tensor:
        """[K] w_k, float64."""
        return torch.tensor([item.weight for _, item in self.columns], dtype=torch.float64)

    @property
    def verifiable(self) -> Tensor:
        """[K] bool: the verifiable items (the reference the others' agreement is measured against)."""
        return torch.tensor([item.kind == "verifiable" for _, item in self.columns], dtype=torch.bool)

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> RubricScores:
        n, k = len(responses), len(self.columns)
        scores = torch.zeros(n, k, dtype=torch.float64)
        confidences = torch.zeros(n, k, dtype=torch.float64)
        failed = torch.zeros(n, k, dtype=torch.bool)
        categories = [self.rubric.category_of(m) for m in metadata]
        applicable = torch.tensor([[c == column[0] for column in self.columns] for c in categories], dtype=torch.bool).reshape(n, k)
        critiques: list[dict[str, str]] = [{} for _ in responses]
        for column, ((category, item), evaluator) in enumerate(zip(self.columns, self.evaluators)):
            rows = applicable[:, column].nonzero().flatten().tolist()
            if not rows:
                continue
            sub_prompts, sub_responses = [prompts[i] for i in rows], [responses[i] for i in rows]
            sub_metadata = [metadata[i] for i in rows]
            if item.kind == "judged":
                requests = [
                    JudgeRequest(p, r, item.name, item.params["question"], None if m.get("answer") is None else str(m["answer"]))
                    for p, r, m in zip(sub_prompts, sub_responses, sub_metadata)
                ]
                for row, judgement in zip(rows, evaluator.judge(requests)):
                    judgement = checked(judgement)
                    if judgement is None:
                        failed[row, column] = True
                        continue
                    scores[row, column], confidences[row, column] = judgement.score, judgement.confidence
                    critiques[row][item.name] = judgement.critique
                continue
            values = evaluator(sub_prompts, sub_responses, sub_metadata)
            for row, value in zip(rows, values):
                if is_missing(value):
                    failed[row, column] = True
                    continue
                value = float(torch.sigmoid(torch.tensor(value))) if item.kind == "reward_model" else float(value)
                if not 0.0 <= value <= 1.0:  # a verifier must score in [0, 1]; anything else is garbage
                    failed[row, column] = True
                    continue
                scores[row, column], confidences[row, column] = value, 1.0
        return RubricScores(self.keys, self.weights, scores, confidences, applicable, failed, critiques)


class ConfidenceWeightedRubric:
    """GRAPE's scorer: every (response, item) of a rubric scored by :class:`RubricScorer`, then
    aggregated per sample set by confidence (by default; ``weighting``:
    :func:`~grape_lightning.rewards.confidence_weighting.item_weights`):

        omega_k = w_k * mean_i c_ik,        r_i = sum_{k in J_i} omega_k s_ik / sum_{k in J_i} omega_k

    The terms are the items ("category/item"), NaN where an item does not apply or failed; their
    confidences c_ik, NaN where the item does not apply (0 where it failed). The per-item
    statistics of a step are the module's, over every process
    (:mod:`~grape_lightning.rewards.rubric_statistics`).

    Args:
        rubric: the rubric.
        critics: critics by name, referred to by the rubric's judged items.
        accuracy: item key ("category/item") whose score 1 marks a correct response (None: no accuracy).
        weighting: how the item weights omega_gk are formed (default: by confidence).
        reliability: the running reliability estimate the ``reliability`` weighting reads (its
            owner updates it; None: a fresh, unmeasured one).
    """

    def __init__(
        self, rubric: Rubric, critics: dict[str, Critic] | None = None, accuracy: str | None = None,
        weighting: WeightingConfig | None = None, reliability: ReliabilityEstimate | None = None,
    ) -> None:
        self.items = RubricScorer(rubric, critics)
        if accuracy is not None and accuracy not in self.items.keys:
            raise ValueError(f"accuracy: {rubric.source} has no item {accuracy!r}; its items are {self.items.keys}")
        self.accuracy = accuracy
        self.weighting = weighting or WeightingConfig()
        self.reliability = reliability if reliability is not None else ReliabilityEstimate(len(self.items.keys))

    def omega(self, items: RubricScores, groups: Tensor) -> Tensor:
        """[num_groups, K] the item weights of the sample sets, as the rewards use them."""
        device = items.scores.device
        measured = self.reliability.measured.to(device) & ~self.items.verifiable.to(device)
        return item_weights(
            self.weighting.mode, items.weights, items.confidences, groups.to(device), items.applicable, items.failed,
            self.reliability.value.to(device), measured,
        )

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], groups: Tensor) -> Scores:
        items = self.items(prompts, responses, metadata)
        groups = groups.cpu()
        rewards = weighted_rewards(items.scores, self.omega(items, groups), groups, items.applicable & ~items.failed)
        scored = items.applicable & ~items.failed
        terms = {key: torch.where(scored[:, k], items.scores[:, k], float("nan")) for k, key in enumerate(items.keys)}
        confidences = {key: torch.where(items.applicable[:, k], items.confidences[:, k], float("nan")) for k, key in enumerate(items.keys)}
        details = [
            {
                **{key: f"s={float(items.scores[i, k]):.2f} c={float(items.confidences[i, k]):.2f}" + (" (failed)" if items.failed[i, k] else "")
                   for k, key in enumerate(items.keys) if items.applicable[i, k]},
                "critiques": "; ".join(f"{name}: {text}" for name, text in items.critiques[i].items()),
            }
            for i in range(len(responses))
        ]
        return Scores(
            rewards=rewards, valid=~torch.isnan(rewards), terms=terms, correct=accuracy_term(terms, self.accuracy, "the rubric"),
            details=details, confidences=confidences,
        )

    def scored_items(self, terms: dict[str, Tensor], confidences: dict[str, Tensor]) -> RubricScores:
        """The item matrices back from a rollout's ``reward_terms`` and ``reward_confidences``
        (as :meth:`__call__` wrote them), on their device; no critiques."""
        keys = self.items.keys
        missing = [key for key in keys if key not in terms or key not in confidences]
        if missing:
            raise ValueError(f"the rollout has no scores or confidences of the rubric items {missing}")
        score = torch.stack([terms[key] for key in keys], dim=1).double()
        confidence = torch.stack([confidences[key] for key in keys], dim=1).double()
        applicable = ~torch.isnan(confidence)
        failed = applicable & torch.isnan(score)
        return RubricScores(
            keys, self.items.weights.to(score.device), torch.nan_to_num(score, nan=0.0), torch.nan_to_num(confidence, nan=0.0),
            applicable, failed,
        )
