"""DPO variants and the Bradley-Terry loss against float64 hand computations."""

import math

import pytest
import torch

from grape_lightning.losses.bradley_terry import bradley_terry_loss
from grape_lightning.losses.dpo import dpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference_dpo(c, r, rc, rr, beta, loss_type, smoothing):
    losses = []
    for i in range(len(c)):
        delta = (c[i] - rc[i]) - (r[i] - rr[i])
        h = beta * delta
        if loss_type == "sigmoid":
            losses.append(-(1 - smoothing) * _log_sigmoid(h) - smoothing * _log_sigmoid(-h))
        elif loss_type == "ipo":
            losses.append((delta - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - h))
    return math.fsum(losses) / len(losses)


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.15), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_variants_match_hand_computation(loss_type, smoothing, beta):
    generator = torch.Generator().manual_seed(3)
    c, r, rc, rr = (-torch.rand(16, dtype=torch.float64, generator=generator) * 20 for _ in range(4))
    loss, metrics = dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    lists = [t.tolist() for t in (c, r, rc, rr)]
    assert abs(float(loss) - _reference_dpo(*lists, beta, loss_type, smoothing)) < 1e-12
    chosen = [beta * (a - b) for a, b in zip(lists[0], lists[2])]
    rejected = [beta * (a - b) for a, b in zip(lists[1], lists[3])]
    assert abs(float(metrics["rewards/chosen"]) - math.fsum(chosen) / 16) < 1e-12
    assert abs(float(metrics["rewards/margins"]) - (math.fsum(chosen) - math.fsum(rejected)) / 16) < 1e-12
    assert float(metrics["rewards/accuracies"]) == sum(a > b for a, b in zip(chosen, rejected)) / 16
    assert abs(float(metrics["logps/chosen_drift"]) - math.fsum(a - b for a, b in zip(lists[0], lists[2])) / 16) < 1e-12
    assert abs(float(metrics["logps/rejected_drift"]) - math.fsum(a - b for a, b in zip(lists[1], lists[3])) / 16) < 1e-12


def test_dpo_gradient_matches_hand_derivative():
    """d/dl(y_w) of -log sigmoid(beta Delta) is -beta * sigmoid(-beta Delta) / B."""
    c = torch.tensor([-3.0, -7.5, -1.2], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-4.0, -2.5, -9.0], dtype=torch.float64, requires_grad=True)
    rc, rr = torch.tensor([-3.5, -6.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -3.0, -8.0], dtype=torch.float64)
    loss, _ = dpo_loss(c, r, rc, rr, beta=0.3)
    loss.backward()
    for i in range(3):
        h = 0.3 * ((c[i].item() - rc[i].item()) - (r[i].item() - rr[i].item()))
        expected = -0.3 * (1 / (1 + math.exp(h))) / 3
        assert abs(c.grad[i].item() - expected) < 1e-12 and abs(r.grad[i].item() + expected) < 1e-12


def test_unknown_dpo_loss_type_raises():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")


@pytest.mark.parametrize("margin", [0.0, 0.7, "per_pair"])
def test_bradley_terry_matches_hand_computation(margin):
    generator = torch.Generator().manual_seed(5)
    chosen, rejected = torch.randn(12, dtype=torch.float64, generator=generator), torch.randn(12, dtype=torch.float64, generator=generator)
    m = torch.rand(12, dtype=torch.float64, generator=generator) if margin == "per_pair" else margin
    loss, metrics = bradley_terry_loss(chosen, rejected, m)
    margins = m.tolist() if margin == "per_pair" else [margin] * 12
    expected = -math.fsum(_log_sigmoid(a - b - mm) for a, b, mm in zip(chosen.tolist(), rejected.tolist(), margins)) / 12
    assert abs(float(loss) - expected) < 1e-12
    assert float(metrics["accuracy"]) == sum(a > b for a, b in zip(chosen.tolist(), rejected.tolist())) / 12
    assert abs(float(metrics["margin"]) - math.fsum(a - b for a, b in zip(chosen.tolist(), rejected.tolist())) / 12) < 1e-12


@pytest.mark.parametrize("chosen, rejected, warns", [(-2.0, -5.0, True), (0.5, -5.0, False), (-2.0, -1.0, False)])
def test_dpo_warns_when_the_chosen_log_prob_falls_while_the_margin_rises(chosen, rejected, warns):
    import warnings

    from grape_lightning.algorithms import DPOModule
    from tests.conftest import tiny_spec

    module = DPOModule(tiny_spec())
    module._val_drifts = torch.tensor([chosen * 4, rejected * 4, 4.0], dtype=torch.float64)  # sums over 4 pairs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.on_validation_epoch_end()
    messages = [str(w.message) for w in caught if "chosen responses' log-prob fell" in str(w.message)]
    assert len(messages) == int(warns)
    if warns:
        assert f"fell by {-chosen:.3f} nats" in messages[0] and f"margin rose to {chosen - rejected:.3f}" in messages[0]
