"""Bradley-Terry loss of a scalar reward model on preference pairs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = -mean log sigmoid(r(x, y_w) - r(x, y_l) - m)

    with r the scalar score on the last real token and m an optional margin (a constant or one
    per pair, as in Llama 2's reward models; m = 0 is plain Bradley-Terry). Metrics: ``accuracy``
    (share of pairs ranked right, r_w > r_l) and the mean ``margin`` r_w - r_l.
    """
    difference = chosen_scores - rejected_scores
    loss = -F.logsigmoid(difference - margin).mean()
    return loss, {
        "loss": loss.detach(),
        "accuracy": (difference > 0).to(difference.dtype).mean().detach(),
        "margin": difference.mean().detach(),
        "chosen_score": chosen_scores.mean().detach(),
        "rejected_score": rejected_scores.mean().detach(),
    }
