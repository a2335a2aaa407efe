"""A scored rollout: the sampled sequences with everything the losses need."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """N sampled responses (``N = prompts x group size``) in the engine's layout.

    ``old_logprobs`` are pi_old's log-probs (the weights that sampled, recomputed by the training
    forward so that the first ratio is exactly 1); ``ref_logprobs`` the reference's and
    ``teacher_logprobs`` a distillation teacher's, when there is one. ``sampling_logprobs`` are the
    sampler's: NaN on the response tokens of ``off_policy`` rows, which no sampler of this run
    produced (and so are ``old_logprobs`` there until pi_old's are computed). ``rewards`` is NaN
    where ``valid`` is False (a reward could not be computed).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    old_logprobs: Tensor
    rewards: Tensor
    valid: Tensor
    groups: Tensor
    prompts: list[str]
    responses: list[str]
    metadata: list[dict[str, Any]]
    reward_terms: dict[str, Tensor] = field(default_factory=dict)  # raw value of each reward term, NaN where missing
    correct: Tensor | None = None  # [N] bool: the scorer's accuracy check passed (None: it has none)
    ref_logprobs: Tensor | None = None
    teacher_logprobs: Tensor | None = None  # a distillation teacher's log-probs of the sampled tokens
    sampling_logprobs: Tensor | None = None
    off_policy: Tensor | None = None  # [N] bool: responses not sampled from pi_old (GRAPE)
    details: list[dict[str, Any]] = field(default_factory=list)  # per-response extras for sample tables
    statistics: dict[str, float] = field(default_factory=dict)  # the scorer's statistics of the batch (logged)
    generation_seconds: float = 0.0
    generated_tokens: float | None = None  # response tokens generated for it, discarded samples included (None: its own)
    reward_confidences: dict[str, Tensor] = field(default_factory=dict)  # a term's confidence (GRAPE's rubric items), NaN where it does not apply

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    @property
    def trained_mask(self) -> Tensor:
        """Response tokens that enter the loss: those of responses with a valid reward."""
        return self.response_mask & self.valid[:, None]

    def model_inputs(self, index: Tensor) -> dict[str, Tensor]:
        """The rows ``index`` as a model batch, trimmed to their longest real sequence."""
        attention_mask = self.attention_mask[index]
        width = int(attention_mask.nonzero()[:, 1].max()) + 1 if attention_mask.any() else attention_mask.shape[1]
        return {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": attention_mask[:, :width],
            "response_mask": self.response_mask[index, :width],
        }

    def take(self, name: str, index: Tensor) -> Tensor:
        """A per-token tensor attribute (``old_logprobs``, ...) for the rows ``index``, trimmed like
        :meth:`model_inputs`."""
        width = self.model_inputs(index)["input_ids"].shape[1]
        return getattr(self, name)[index, :width]


    def select(self, rows: Tensor, groups: Tensor | None = None) -> Rollout:
        """The rows ``rows`` (in that order) as a rollout; ``groups`` replaces their group ids
        (default: the selected ids, as they are). Per-row tensors and lists, and each reward term
        and its confidence, are indexed; batch-level fields (``statistics``, timings) are kept."""
        rows = rows.to(self.input_ids.device)
        picked = rows.tolist()
        values: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Tensor):
                value = value[rows.to(value.device)]
            elif isinstance(value, list) and len(value) == len(self):
                value = [value[i] for i in picked]
            elif item.name in ("reward_terms", "reward_confidences"):
                value = {name: term[rows.to(term.device)] for name, term in value.items()}
            values[item.name] = value
        if groups is not None:
            values["groups"] = groups.to(self.groups.device)
        if self.sampling_logprobs is self.old_logprobs:  # pi_old's are the sampler's: still one tensor
            values["sampling_logprobs"] = values["old_logprobs"]
        return Rollout(**values)

    @staticmethod
    def concat(rollouts: list[Rollout], pad_id: int = 0) -> Rollout:
        """The rows of ``rollouts`` one after the other, right-padded to the widest (``pad_id`` in
        ``input_ids``, 0 / False elsewhere; positions follow the attention mask, so padding after
        the response changes no log-prob). Group ids are offset so the groups of different rollouts
        stay apart (0..K-1 for the first rollout's K groups, K.. for the next). ``statistics`` are the
        row-weighted means of the rollouts'; timings and generated tokens add up."""
        if not rollouts:
            raise ValueError("Rollout.concat: no rollouts")
        if len(rollouts) == 1:
            return rollouts[0]
        width = max(rollout.input_ids.shape[1] for rollout in rollouts)
        first = rollouts[0]

        def widen(tensor: Tensor, value: float | int | bool) -> Tensor:
            return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

        def per_token(name: str, value: float | int | bool) -> Tensor | None:
            tensors = [getattr(rollout, name) for rollout in rollouts]
            if any(tensor is None for tensor in tensors):
                if not all(tensor is None for tensor in tensors):
                    raise ValueError(f"Rollout.concat: {name} is set in some rollouts only")
                return None
            return torch.cat([widen(tensor, value) for tensor in tensors])

        def per_row(name: str) -> Tensor | None:
            tensors = [getattr(rollout, name) for rollout in rollouts]
            if any(tensor is None for tensor in tensors):
                if not all(tensor is None for tensor in tensors):
                    raise ValueError(f"Rollout.concat: {name} is set in some rollouts only")
                return None
            return torch.cat(tensors)

        offsets, groups = 0, []
        for rollout in rollouts:
            groups.append(rollout.groups + offsets)
            offsets += int(rollout.groups.max()) + 1 if len(rollout) else 0
        names = list(first.reward_terms)
        if any(list(rollout.reward_terms) != names for rollout in rollouts):
            raise ValueError("Rollout.concat: the rollouts have different reward terms")
        confidence_names = list(first.reward_confidences)
        if any(list(rollout.reward_confidences) != confidence_names for rollout in rollouts):
            raise ValueError("Rollout.concat: the rollouts have confidences of different reward terms")
        rows = [len(rollout) for rollout in rollouts]
        statistics: dict[str, float] = {}
        for name in {key for rollout in rollouts for key in rollout.statistics}:
            weighted = [(rollout.statistics[name], n) for rollout, n in zip(rollouts, rows) if name in rollout.statistics]
            statistics[name] = sum(value * n for value, n in weighted) / max(sum(n for _, n in weighted), 1)
        generated = [rollout.generated_tokens for rollout in rollouts]
        old_logprobs = per_token("old_logprobs", 0.0)
        # where every part's pi_old log-probs are its sampler's, the whole's are too: one tensor
        same = all(rollout.sampling_logprobs is rollout.old_logprobs for rollout in rollouts)
        return Rollout(
            input_ids=per_token("input_ids", pad_id),
            attention_mask=per_token("attention_mask", 0),
            response_mask=per_token("response_mask", False),
            old_logprobs=old_logprobs,
            rewards=torch.cat([rollout.rewards for rollout in rollouts]),
            valid=torch.cat([rollout.valid for rollout in rollouts]),
            groups=torch.cat(groups),
            prompts=[p for rollout in rollouts for p in rollout.prompts],
            responses=[r for rollout in rollouts for r in rollout.responses],
            metadata=[m for rollout in rollouts for m in rollout.metadata],
            reward_terms={name: torch.cat([rollout.reward_terms[name] for rollout in rollouts]) for name in names},
            reward_confidences={name: torch.cat([rollout.reward_confidences[name] for rollout in rollouts]) for name in confidence_names},
            correct=per_row("correct"),
            ref_logprobs=per_token("ref_logprobs", 0.0),
            sampling_logprobs=old_logprobs if same else per_token("sampling_logprobs", 0.0),
            off_policy=per_row("off_policy"),
            details=[d for rollout in rollouts for d in rollout.details] if all(rollout.details for rollout in rollouts) else [],
            statistics=statistics,
            generation_seconds=sum(rollout.generation_seconds for rollout in rollouts),
            generated_tokens=None if all(g is None for g in generated) else sum(
                float(rollout.response_mask.sum()) if g is None else g for rollout, g in zip(rollouts, generated)
            ),
        )


def minibatch_indices(size: int, minibatch_size: int, generator: torch.Generator | None = None, shuffle: bool = True) -> list[Tensor]:
    """Split ``range(size)`` into mini-batches (shuffled with ``generator`` when asked)."""
    order = torch.randperm(size, generator=generator) if shuffle else torch.arange(size)
    return list(order.split(minibatch_size))
