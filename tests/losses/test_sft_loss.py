"""SFT loss masking against a float64 hand computation."""

import torch

from grape_lightning.losses.sft import sft_loss


def test_sft_loss_masks_prompt_and_padding():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 11, dtype=torch.float64, generator=generator) * 5
    mask = torch.rand(4, 11, generator=generator) > 0.4
    loss, metrics = sft_loss(logprobs, mask)
    total, count = 0.0, 0
    for b in range(4):
        for t in range(11):
            if mask[b, t]:
                total += -float(logprobs[b, t])
                count += 1
    assert abs(float(loss) - total / count) < 1e-12
    assert int(metrics["num_response_tokens"]) == count


def test_sft_loss_gradient_is_minus_mask_over_count():
    logprobs = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    sft_loss(logprobs, mask)[0].backward()
    torch.testing.assert_close(logprobs.grad, -mask.double() / mask.sum())


def test_sft_loss_empty_mask_is_zero_with_graph():
    logprobs = torch.randn(2, 3, requires_grad=True)
    loss, _ = sft_loss(logprobs, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logprobs.grad, torch.zeros(2, 3))
