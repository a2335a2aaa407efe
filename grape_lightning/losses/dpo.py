"""Direct preference optimisation and its variants, from sequence log-probs."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Preference losses on the implicit reward margin. With l(y) a sequence log-prob (sum over
    response tokens, or the per-token mean for length-normalised variants) and

        Delta = (l(y_w) - l_ref(y_w)) - (l(y_l) - l_ref(y_l)),    h = beta * Delta,

    the per-pair loss is

        sigmoid (DPO):            -log sigmoid(h)
        sigmoid, label smoothing: -(1 - s) log sigmoid(h) - s log sigmoid(-h)   (conservative DPO, s = label_smoothing)
        ipo:                      (Delta - 1 / (2 beta))^2
        hinge:                    max(0, 1 - h)

    averaged over pairs. Metrics: implicit rewards beta (l - l_ref) of chosen and rejected, their
    margin, accuracy (share of pairs whose chosen reward is higher), the log-probs l, and their
    drifts l - l_ref from the reference (``logps/chosen_drift``, ``logps/rejected_drift``). The
    loss only sees the margin: a chosen drift below 0 while the margin grows means both fall, the
    rejected faster, and probability leaves the preferred responses too.
    """
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    h = beta * delta
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - h)
    else:
        raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'hinge', got {loss_type!r}")
    chosen_rewards = (beta * (chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (rejected_logps - ref_rejected_logps)).detach()
    loss = losses.mean()
    return loss, {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "logps/chosen_drift": (chosen_logps - ref_chosen_logps).detach().mean(),
        "logps/rejected_drift": (rejected_logps - ref_rejected_logps).detach().mean(),
    }
