"""The update loop every on-policy algorithm optimises with.

    for epoch in epochs:
        for mini-batch of rows (shuffled):            one optimizer step each
            n = normalisers(mini-batch), summed over every process
            for micro-batch of the mini-batch:        gradients accumulate
                backward(micro_loss(micro-batch, n) x processes)
            clip, optimizer step, schedule step

An algorithm supplies only its maths: which rows enter the loss, the counts its loss is
normalised by, and the loss of a micro-batch given the global counts. The loop owns the rest:

- the loss of a step is the loss of the *global* mini-batch: normalisers are counted over every
  process, and each process's loss is multiplied by their number, since the strategy (DDP, FSDP,
  DeepSpeed) averages gradients;
- every process takes the same optimizer steps and the same number of backward passes (each
  backward is a collective under DDP): processes holding fewer rows than another pad with
  zero-weighted micro-batches, and a step none of whose processes has a row in its loss is skipped
  by all of them (Adam would still move the weights);
- metrics are reduced across processes: ``terms`` (additive pieces of the global loss, normalised
  by global counts) are summed over micro-batches and processes, giving the step's value, then
  averaged over steps; ``means`` are weighted means over every micro-batch of every process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from grape_lightning.algorithms.on_policy import OnPolicyModule


@dataclass
class UpdateConfig:
    """How the rollout batch is optimised.

    Args:
        epochs: passes over each rollout batch.
        mini_batch_size: sequences (per process) per optimizer step; None: the whole rollout batch.
        micro_batch_size: sequences per forward/backward (gradients accumulate up to a step).
        max_grad_norm: clip the global gradient norm before each step (None: no clipping).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        logprob_chunk_size: response tokens per chunk of the LM-head log-prob computation (bounds the
            [tokens, vocab] memory).
    """

    epochs: int = 1
    mini_batch_size: int | None = None
    micro_batch_size: int = 64
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 1024

    @property
    def one_step_per_rollout(self) -> bool:
        """One pass, one mini-batch: the update's weights are the sampling weights, so pi_old's
        log-probs are the detached ones of the update's own forward pass."""
        return self.epochs == 1 and self.mini_batch_size is None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.micro_batch_size < 1 or (self.mini_batch_size is not None and self.mini_batch_size < 1):
            raise ValueError(f"update: epochs, micro_batch_size and mini_batch_size must be >= 1, got {self}")


@dataclass
class LossOutput:
    """The loss of one micro-batch and its metrics.

    ``loss`` is the micro-batch's share of the step's global loss (normalised by global counts).
    ``terms`` are such shares too (they add up over micro-batches and processes); ``means`` are
    averages over the micro-batch, weighted by ``weight`` (its token count, say).
    """

    loss: Tensor
    terms: dict[str, Tensor | float] = field(default_factory=dict)
    means: dict[str, Tensor | float] = field(default_factory=dict)
    weight: float = 1.0


MicroLoss = Callable[[Tensor, Tensor], LossOutput]  # (rows of the micro-batch, global normalisers) -> loss
Normalisers = Callable[[Tensor], Tensor]  # rows of a mini-batch -> this process's counts; [0]: rows in the loss
StopRule = Callable[[dict[str, float]], bool]  # the step's global terms -> stop the update here


class WeightedSums:
    """sum_k w_k x_k and sum_k w_k per metric name."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add(self, metrics: dict[str, Tensor | float], weight: float = 1.0) -> None:
        for name, value in metrics.items():
            total = self.values.setdefault(name, [0.0, 0.0])
            total[0] += float(value) * weight
            total[1] += weight

    def reduced(self, sum_across: Callable[[Tensor], Tensor], device: torch.device) -> dict[str, tuple[float, float]]:
        """(sum_k w_k x_k, sum_k w_k) per name over every process (every process calls this, in the same order)."""
        names = sorted(self.values)
        if not names:
            return {}
        packed = sum_across(torch.tensor([self.values[name] for name in names], dtype=torch.float64, device=device))
        return {name: (total, weight) for name, (total, weight) in zip(names, packed.tolist())}

    def reduced_means(self, sum_across: Callable[[Tensor], Tensor], device: torch.device) -> dict[str, float]:
        """The weighted means over every process."""
        return {name: total / max(weight, 1e-300) for name, (total, weight) in self.reduced(sum_across, device).items()}


def steps_per_epoch(row_counts: list[int], mini_batch_size: int | None, micro_batch_size: int) -> list[int]:
    """Micro-batches per optimizer step of one epoch, the most any process needs: every process
    runs this schedule, whatever its own number of rows."""
    schedule: list[int] = []
    for rows in row_counts:
        size = mini_batch_size or max(rows, 1)
        sizes = [min(size, rows - start) for start in range(0, rows, size)]
        for step, step_rows in enumerate(sizes):
            micro = math.ceil(step_rows / micro_batch_size)
            if step < len(schedule):
                schedule[step] = max(schedule[step], micro)
            else:
                schedule.append(micro)
    return schedule


def run_update(
    module: OnPolicyModule,
    rows: Tensor,
    config: UpdateConfig,
    normalisers: Normalisers,
    micro_loss: MicroLoss,
    stop: StopRule | None = None,
) -> dict[str, float]:
    """Optimise the loss over ``rows`` (this process's rows of the rollout that enter the loss).
    Returns the metrics of the update, reduced over every process, and ``update_steps``."""
    device = module.device
    row_counts = module.gather_counts(rows.numel())
    schedule = steps_per_epoch(row_counts, config.mini_batch_size, config.micro_batch_size)
    padding = torch.zeros(1, dtype=torch.long, device=device)  # a row every rollout has: padded passes weigh 0
    scale = module.data_parallel_size
    terms, means = WeightedSums(), WeightedSums()
    steps = 0
    for epoch in range(config.epochs):
        minibatches = module.minibatches(rows, config.mini_batch_size, salt=epoch)
        stopped = False
        for step, num_micro in enumerate(schedule):
            index = minibatches[step] if step < len(minibatches) else rows[:0]
            totals = module.sum_across_processes(normalisers(index).to(device=device, dtype=torch.float64))
            if float(totals[0]) == 0:
                continue
            step_terms = WeightedSums()
            # (an empty tensor splits into one empty piece: a process without rows runs padded passes only)
            micros = list(index.split(config.micro_batch_size)) if index.numel() else []
            optimizer = module.optimizers()
            optimizer.zero_grad(set_to_none=True)
            for number in range(num_micro):
                if number < len(micros):
                    output = micro_loss(micros[number], totals)
                    module.manual_backward(output.loss * scale)
                    step_terms.add({"loss": output.loss.detach(), **output.terms})
                    means.add(output.means, weight=output.weight)
                else:  # this process has no rows left: a pass that adds nothing, so the collectives pair up
                    output = micro_loss(padding, totals)
                    module.manual_backward(output.loss * 0.0)
                    step_terms.add({"loss": 0.0, **{name: 0.0 for name in output.terms}})
                    means.add(output.means, weight=0.0)
            if config.max_grad_norm is not None:
                module.clip_gradients(optimizer, gradient_clip_val=config.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            scheduler = module.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
            steps += 1
            global_terms = {name: total for name, (total, _) in step_terms.reduced(module.sum_across_processes, device).items()}
            terms.add(global_terms)
            if stop is not None and stop(global_terms):
                stopped = True
                break
        if stopped:
            break
    metrics = {name: total / weight for name, (total, weight) in terms.values.items()}
    return {**metrics, **means.reduced_means(module.sum_across_processes, device), "update_steps": float(steps)}
