"""The Gumbel-max sampler draws softmax(z / T) (after top-k / top-p) and returns the log-prob of
log softmax(z / T_lp), checked against float64 hand computations: a chi-square test of the
frequencies of many draws, whose power against a wrong temperature or an off-by-one token is
checked on the same counts."""

import pytest
import torch

from grape_lightning.rollout.sampling import SamplingParams, gumbel_max_next_token

VOCAB, DRAWS = 12, 40_000


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2_{k-1} >= sum (O - E)^2 / E) over the k tokens of non-zero probability."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    statistic = ((counts[keep] - expected) ** 2 / expected).sum()
    degrees = torch.tensor(float(keep.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(degrees / 2, statistic / 2))


def _draw(logits: torch.Tensor, params: SamplingParams, seed: int = 0):
    rows = logits.expand(DRAWS, -1).clone()
    return gumbel_max_next_token(rows, params, torch.Generator().manual_seed(seed))


def _logits() -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1.5


def _softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    weights = torch.exp(logits / temperature - (logits / temperature).max())
    return weights / weights.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frequencies_follow_the_tempered_softmax_and_a_wrong_one_is_rejected(dtype):
    logits, temperature = _logits(), 0.7
    tokens, logprobs = _draw(logits.to(dtype), SamplingParams(temperature=temperature))
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    probs = _softmax(logits, temperature)
    assert _chi_square_p_value(counts, probs) > 1e-3
    # the same counts reject a 10% wrong temperature and a distribution shifted by one token
    assert _chi_square_p_value(counts, _softmax(logits, temperature * 1.1)) < 1e-6
    assert _chi_square_p_value(counts, probs.roll(1)) < 1e-6
    # log-prob of each drawn token: log softmax(z / T)
    torch.testing.assert_close(logprobs.double(), probs.log()[tokens], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_top_k_and_top_p_draw_the_renormalised_nucleus():
    logits, temperature, top_k, top_p = _logits(), 1.3, 6, 0.75
    tokens, logprobs = _draw(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), seed=1)
    # by hand: keep the top_k most likely tokens, then the most likely of them until top_p of their mass
    probs = _softmax(logits, temperature)
    order = probs.argsort(descending=True)
    top = probs[order[:top_k]] / probs[order[:top_k]].sum()
    kept = order[:top_k][(top.cumsum(0) - top) < top_p]
    nucleus = torch.zeros_like(probs)
    nucleus[kept] = probs[kept] / probs[kept].sum()
    assert 1 < len(kept) < top_k  # both truncations cut something
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    assert counts[nucleus == 0].sum() == 0
    assert _chi_square_p_value(counts, nucleus) > 1e-3
    one_more = order[: len(kept) + 1]  # a nucleus cut one token later
    wider = torch.zeros_like(probs)
    wider[one_more] = probs[one_more] / probs[one_more].sum()
    assert _chi_square_p_value(counts, wider) < 1e-6
    # the log-prob is that of the untruncated tempered softmax (what the loss evaluates)
    torch.testing.assert_close(logprobs, probs.log()[tokens], rtol=0, atol=1e-12)


def test_greedy_is_the_argmax_with_its_temperature_one_log_prob():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tokens, logprobs = gumbel_max_next_token(logits, SamplingParams(temperature=0), torch.Generator().manual_seed(0))
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0], rtol=0, atol=1e-12)


def test_a_temperature_tensor_is_read_and_a_seed_repeats():
    logits = _logits().expand(64, -1).clone()
    params = SamplingParams(temperature=0.5)
    first = gumbel_max_next_token(logits, params, torch.Generator().manual_seed(4), torch.tensor([0.5], dtype=torch.float64))
    again = gumbel_max_next_token(logits, params, torch.Generator().manual_seed(4))
    other = gumbel_max_next_token(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
