"""The update loop: the schedule every process follows, padding passes, skipped steps, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from grape_lightning.algorithms.update_loop import LossOutput, UpdateConfig, run_update, steps_per_epoch


@pytest.mark.parametrize("row_counts, mini_batch_size, micro_batch_size, expected", [
    ([13, 12], None, 4, [4]),  # REINFORCE's deadlock case: 4 and 3 micro-batches, both ranks run 4
    ([13, 12], 5, 4, [2, 2, 1]),
    ([0, 7], None, 4, [2]),  # a rank with no row in the loss still runs the step's passes
    ([3, 9], 4, 2, [2, 2, 1]),
    ([0, 0], None, 4, []),  # nothing anywhere: no step
])
def test_every_process_follows_the_longest_schedule(row_counts, mini_batch_size, micro_batch_size, expected):
    assert steps_per_epoch(row_counts, mini_batch_size, micro_batch_size) == expected


class OneProcessOf:
    """The module interface run_update uses, for one process of ``row_counts`` (its own first):
    records each backward's loss and each optimizer step's gradient."""

    def __init__(self, row_counts: list[int]) -> None:
        self.row_counts = row_counts
        self.device = torch.device("cpu")
        self.data_parallel_size = 1
        self.weight = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        self.backward_losses: list[float] = []
        self.step_gradients: list[torch.Tensor] = []

    def gather_counts(self, count: int) -> list[int]:
        assert count == self.row_counts[0]
        return self.row_counts

    def sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def minibatches(self, rows, size, salt=0):
        return list(rows.split(size or max(rows.numel(), 1))) if rows.numel() else []

    def optimizers(self):
        module = self

        class Recorder:
            def zero_grad(self, set_to_none=True):
                module.weight.grad = None

            def step(self):
                module.step_gradients.append(module.weight.grad.clone())

        return Recorder()

    def manual_backward(self, loss):
        self.backward_losses.append(float(loss))
        loss.backward()

    def clip_gradients(self, *args, **kwargs):
        pass

    def lr_schedulers(self):
        return None


def test_a_process_with_fewer_rows_pads_with_passes_that_add_nothing():
    """Rows 0..4 of this process in the loss, another process holding 9: the global loss
    L = (1/N) sum_i w . x_i over N = 14 rows; this process takes the passes of the longest schedule
    (3 micro-batches of 4, its third a zero-weighted padding pass) and its gradient is its share."""
    features = torch.randn(6, 3, dtype=torch.float64)
    module = OneProcessOf([5, 9])
    rows = torch.arange(5)

    def micro_loss(micro, totals):
        loss = (features[micro] @ module.weight).sum() / totals[0]
        return LossOutput(loss, terms={"policy_loss": loss.detach()}, means={"rows": float(micro.numel())}, weight=float(micro.numel()))

    metrics = run_update(module, rows, UpdateConfig(micro_batch_size=4), lambda index: torch.tensor([index.numel() + 9.0]), micro_loss)
    assert len(module.backward_losses) == 3 and module.backward_losses[2] == 0.0
    (gradient,) = module.step_gradients
    torch.testing.assert_close(gradient, features[:5].sum(0) / 14, rtol=0, atol=1e-15)
    assert metrics["update_steps"] == 1.0
    assert metrics["rows"] == pytest.approx((4 * 4 + 1 * 1) / 5)  # the padding pass has weight 0
    assert math.isclose(metrics["loss"], metrics["policy_loss"], rel_tol=0, abs_tol=1e-15)


def test_a_process_without_a_row_in_the_loss_runs_padding_passes_only():
    """Another process holds 6 rows (2 micro-batches of 4); this one none (dynamic sampling with
    ``filter_tied_groups`` can leave a process only tied groups): two zero-weighted passes over
    the padding row, never a pass over an empty micro-batch, and a zero gradient."""
    module = OneProcessOf([0, 6])
    seen = []

    def micro_loss(micro, totals):
        seen.append(micro.tolist())
        return LossOutput((module.weight * micro.numel()).sum() / totals[0], weight=float(micro.numel()))

    metrics = run_update(module, torch.arange(0), UpdateConfig(micro_batch_size=4), lambda index: torch.tensor([index.numel() + 6.0]), micro_loss)
    assert seen == [[0], [0]] and module.backward_losses == [0.0, 0.0]
    (gradient,) = module.step_gradients
    assert torch.equal(gradient, torch.zeros(3, dtype=torch.float64)) and metrics["update_steps"] == 1.0


def test_a_step_without_a_row_in_any_process_is_skipped():
    module = OneProcessOf([0, 0])
    metrics = run_update(
        module, torch.arange(0), UpdateConfig(epochs=3), lambda index: torch.tensor([0.0]),
        lambda micro, totals: LossOutput(module.weight.sum()),
    )
    assert module.backward_losses == [] and module.step_gradients == [] and metrics["update_steps"] == 0.0


def test_update_config_refuses_empty_batches():
    with pytest.raises(ValueError, match="must be >= 1"):
        UpdateConfig(micro_batch_size=0)
