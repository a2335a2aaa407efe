"""Dynamic sampling (DAPO, Yu et al., 2025): train only on groups that carry a learning signal.

A group whose valid rewards all tie (every sample right, or every sample wrong) has zero
group-relative advantage: it adds nothing to the policy gradient but still dilutes the loss's
normaliser. Dynamic sampling keeps the groups with

    0 < std_group(valid r)        (at least two valid rewards, not all equal)

and samples more prompts until the batch holds as many such groups as the loader's batch had
prompts:

    kept = informative groups of the batch
    for round in 1..max_rounds, while some process has fewer than target:
        draw prompts (fresh ones from the training set, or the batch's tied prompts again),
        sample and score them, add their informative groups to kept
    batch = the first `target` kept groups (in the order they were sampled), topped up, if the
            rounds ran out, with tied groups (the first set aside)

**Where the extra prompts come from.** ``prompts: fresh`` (DAPO's choice) draws new prompts
uniformly, without replacement within a round, from the DataModule's training set with a
generator seeded by (seed, rank, step, round): the draw depends on nothing a checkpoint does not
hold, so a resumed run draws what the uninterrupted run would have, and the training loader's
order and position (what an epoch means, what a checkpoint stores) stay exactly as without
dynamic sampling. ``prompts: repeat`` samples the loader batch's tied prompts again with a fresh
generator: no prompt outside the batch is seen, but a prompt the policy already always (or never)
solves seldom becomes informative by resampling. A DataModule without ``draw_prompts`` gets
``repeat``.

**Several processes.** Generation may run collectives (under FSDP and ZeRO-3 the parameters are
gathered for it), so every process runs every round: the rounds continue while *any* process
lacks groups, and a process that has its groups takes part without sampling. Topping up with tied
groups keeps every process at ``target`` groups, so the log-prob passes and the update see the
same batch shape as without dynamic sampling; a tied group has zero advantage under a group
baseline, and with GRPO's ``loss.filter_tied_groups`` it also leaves the normalisers (a smaller
batch of informative groups only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from grape_lightning.advantages import group_statistics
from grape_lightning.rollout.batch import Rollout

PromptSource = Literal["fresh", "repeat"]


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling: over-sample and keep groups whose rewards are not all equal.

    Args:
        enabled: filter tied groups and sample more (False: the batch as the loader gives it).
        max_rounds: extra generation rounds at most per training step, after the loader's batch
            (0: only filter and top up). When they run out the batch is topped up with tied groups.
        prompts: where the prompts of an extra round come from: ``fresh`` (drawn from the training
            set, seeded by seed, rank, step and round: resumable) or ``repeat`` (the loader batch's
            tied prompts, sampled again).
        prompts_per_round: prompts drawn per extra round with ``fresh`` (None: as many as the
            loader's batch holds, DAPO's generation batch).
    """

    enabled: bool = True
    max_rounds: int = 3
    prompts: PromptSource = "fresh"
    prompts_per_round: int | None = None

    def __post_init__(self) -> None:
        if self.max_rounds < 0:
            raise ValueError(f"dynamic_sampling.max_rounds must be >= 0, got {self.max_rounds}")
        if self.prompts not in ("fresh", "repeat"):
            raise ValueError(f"dynamic_sampling.prompts must be 'fresh' or 'repeat', got {self.prompts!r}")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ValueError(f"dynamic_sampling.prompts_per_round must be >= 1, got {self.prompts_per_round}")


def informative_groups(rewards: Tensor, groups: Tensor, valid: Tensor) -> Tensor:
    """[num_groups] bool: groups with at least two valid rewards that are not all equal
    (std_group > 0, :func:`~grape_lightning.advantages.group_statistics`)."""
    return ~group_statistics(rewards, groups, valid).tied


def select_groups(batch: dict[str, Any], groups: list[int]) -> dict[str, Any]:
    """The rows of the prompt batch ``batch`` that belong to ``groups``, renumbered 0..len-1."""
    ids = batch["groups"].tolist()
    position = {group: number for number, group in enumerate(groups)}
    rows = [row for group in groups for row, g in enumerate(ids) if g == group]
    selected = {key: [value[row] for row in rows] for key, value in batch.items() if isinstance(value, list) and len(value) == len(ids)}
    selected["groups"] = torch.tensor([position[ids[row]] for row in rows], dtype=torch.long)
    return selected


Sample = Callable[[dict[str, Any], int], Rollout]  # (prompt batch, round) -> the sampled, scored rollout
Draw = Callable[[int, int], dict[str, Any]]  # (prompts, round) -> a prompt batch of fresh prompts
SumAcross = Callable[[Tensor], Tensor]


def _this_process(tensor: Tensor) -> Tensor:
    return tensor


def dynamic_sample(
    config: DynamicSamplingConfig,
    batch: dict[str, Any],
    sample: Sample,
    draw: Draw | None = None,
    idle: Callable[[], None] = lambda: None,
    sum_across: SumAcross = _this_process,
    pad_id: int = 0,
) -> tuple[Rollout, dict[str, float]]:
    """The rollout of ``batch`` with dynamic sampling, and its statistics over every process.

    ``sample(prompt_batch, round)`` generates and scores (round 0: the loader's ``batch``);
    ``draw(prompts, round)`` gives fresh prompts (None: the batch's tied prompts are sampled
    again); ``idle()`` takes part in a round's collectives without sampling; ``sum_across`` sums
    over processes (every process makes the same calls). The statistics: ``rounds`` (generation
    rounds, the loader's batch included), ``prompts_generated`` (sample sets generated, every
    process's), ``kept_groups`` (the share of them with a signal), ``filled_groups`` (the share of
    the batch's groups that are tied ones topped up), ``sampled_reward`` and ``sampled_accuracy``
    (over every sampled response, before the filter, which favours groups of mixed outcomes).
    """
    target = len(set(batch["groups"].tolist()))
    rollout = sample(batch, 0)
    rounds: list[Rollout] = [rollout]
    informative = informative_groups(rollout.rewards, rollout.groups, rollout.valid)
    kept = int(informative.sum())
    first_tied = (~informative).nonzero().flatten().tolist()
    device = rollout.rewards.device
    extra = 0
    for round_number in range(1, config.max_rounds + 1):
        missing = max(target - kept, 0)
        if float(sum_across(torch.tensor([float(missing > 0)], dtype=torch.float64, device=device))) == 0:
            break
        extra = round_number
        if missing == 0:
            idle()
            continue
        if draw is not None:
            prompts = draw(config.prompts_per_round or target, round_number)
        else:
            prompts = select_groups(batch, first_tied)
        more = sample(prompts, round_number)
        rounds.append(more)
        kept += int(informative_groups(more.rewards, more.groups, more.valid).sum())

    every = Rollout.concat(rounds, pad_id=pad_id)
    informative = informative_groups(every.rewards, every.groups, every.valid)
    chosen = informative.nonzero().flatten()[:target].tolist()
    filled = (~informative).nonzero().flatten()[: target - len(chosen)].tolist()
    order = chosen + filled  # informative first: the first `target` in sampling order, then tied ones
    rows = torch.cat([(every.groups == group).nonzero().flatten() for group in order])
    number = torch.full((len(informative),), -1, dtype=torch.long, device=every.groups.device)
    number[torch.tensor(order, dtype=torch.long, device=number.device)] = torch.arange(len(order), device=number.device)
    result = every.select(rows, groups=number[every.groups[rows]])
    result.generated_tokens = float(every.response_mask.sum())
    # the samples of every round, before the filter: what the policy does on the prompts it is shown
    sampled_valid = every.rewards[every.valid]
    sampled_correct = float(every.correct.sum()) if every.correct is not None else 0.0
    totals = sum_across(torch.tensor(
        [float(len(informative)), float(informative.sum()), float(len(filled)), float(len(order)),
         float(sampled_valid.double().sum()), float(sampled_valid.numel()), sampled_correct, float(len(every))],
        dtype=torch.float64, device=device,
    ))
    generated, informative_count, filled_count, batch_groups, reward_sum, valid_count, correct_count, responses = totals.tolist()
    statistics = {
        "rounds": float(1 + extra),
        "prompts_generated": generated,
        "kept_groups": informative_count / max(generated, 1.0),
        "filled_groups": filled_count / max(batch_groups, 1.0),
        "sampled_reward": reward_sum / max(valid_count, 1.0),
    }
    if every.correct is not None:
        statistics["sampled_accuracy"] = correct_count / max(responses, 1.0)
    return result, statistics
