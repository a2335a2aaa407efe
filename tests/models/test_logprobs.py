"""The chunked log-prob helper equals the naive full log-softmax (float64, random inputs)."""

import pytest
import torch

from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import response_logprobs
from tests.conftest import tiny_spec


def _naive(model, input_ids, attention_mask, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = logits[:, :-1].argmax(-1) == input_ids[:, 1:]
    pad = torch.zeros(input_ids.shape[0], 1, dtype=torch.float64)
    return torch.cat([pad, token_logp], 1), torch.cat([pad, entropy], 1), torch.cat([pad.bool(), top1], 1)


@pytest.fixture(scope="module")
def model64():
    tokenizer = load_tokenizer(tiny_spec())
    return load_causal_lm(tiny_spec(dtype="float64"), tokenizer).eval()


def _random_batch(vocab, batch=5, time=23, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (batch, time), generator=generator)
    lengths = torch.randint(8, time + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(time)[None] < lengths[:, None]).long()
    prompt_lengths = torch.randint(1, 7, (batch,), generator=generator)
    response_mask = attention_mask.bool() & (torch.arange(time)[None] >= prompt_lengths[:, None])
    return input_ids, attention_mask, response_mask


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive_log_softmax(model64, chunk_size, temperature):
    input_ids, attention_mask, response_mask = _random_batch(model64.config.vocab_size)
    out = response_logprobs(
        model64, input_ids, response_mask, attention_mask,
        temperature=temperature, chunk_size=chunk_size, with_entropy=True, with_top1=True,
    )
    logp, entropy, top1 = _naive(model64, input_ids, attention_mask, temperature)
    mask = response_mask.clone()
    mask[:, 0] = False
    assert out.logprobs.dtype == torch.float64
    torch.testing.assert_close(out.logprobs, torch.where(mask, logp, 0.0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, torch.where(mask, entropy, 0.0), rtol=1e-10, atol=1e-10)
    assert torch.equal(out.top1, top1 & mask)
    assert (out.logprobs[~mask] == 0).all() and (out.logprobs[mask] < 0).all()


def test_gradients_match_naive(model64):
    input_ids, attention_mask, response_mask = _random_batch(model64.config.vocab_size, seed=3)
    mask = response_mask.clone()
    mask[:, 0] = False
    weights = torch.randn(input_ids.shape, dtype=torch.float64)

    model64.zero_grad()
    (response_logprobs(model64, input_ids, response_mask, attention_mask, chunk_size=5).logprobs * weights).sum().backward()
    chunked = [p.grad.clone() for p in model64.parameters()]
    model64.zero_grad()
    logp, _, _ = _naive(model64, input_ids, attention_mask)
    (torch.where(mask, logp, 0.0) * weights).sum().backward()
    for ours, reference in zip(chunked, (p.grad for p in model64.parameters())):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    model64.zero_grad()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_and_logprob_gradients_match_naive(model64, temperature):
    """An entropy bonus differentiates through the entropy: its gradient, with the log-probs', is exact."""
    input_ids, attention_mask, response_mask = _random_batch(model64.config.vocab_size, seed=4)
    mask = response_mask.clone()
    mask[:, 0] = False
    generator = torch.Generator().manual_seed(0)
    logprob_weights = torch.randn(input_ids.shape, dtype=torch.float64, generator=generator)
    entropy_weights = torch.randn(input_ids.shape, dtype=torch.float64, generator=generator)

    model64.zero_grad()
    out = response_logprobs(model64, input_ids, response_mask, attention_mask, temperature=temperature, chunk_size=6, with_entropy=True)
    (out.logprobs * logprob_weights + out.entropy * entropy_weights).sum().backward()
    chunked = [p.grad.clone() for p in model64.parameters()]
    model64.zero_grad()
    logp, entropy, _ = _naive(model64, input_ids, attention_mask, temperature)
    (torch.where(mask, logp, 0.0) * logprob_weights + torch.where(mask, entropy, 0.0) * entropy_weights).sum().backward()
    for ours, reference in zip(chunked, (p.grad for p in model64.parameters())):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-11)
    model64.zero_grad()


def test_packed_rows_equal_separate_sequences(model64):
    """Positions restarting at 0 and no attention mask keep each packed sequence independent."""
    generator = torch.Generator().manual_seed(5)
    first, second = torch.randint(4, 90, (1, 9), generator=generator), torch.randint(4, 90, (1, 6), generator=generator)
    packed_ids = torch.cat([first, second], 1)
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
    response_mask = torch.ones_like(packed_ids, dtype=torch.bool)
    response_mask[0, 9] = False  # the first token of a packed sequence has no prediction inside it
    packed = response_logprobs(model64, packed_ids, response_mask, None, position_ids).logprobs
    alone_first = response_logprobs(model64, first, torch.ones_like(first, dtype=torch.bool)).logprobs
    alone_second = response_logprobs(model64, second, torch.ones_like(second, dtype=torch.bool)).logprobs
    torch.testing.assert_close(packed[:, :9], alone_first, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[:, 10:], alone_second[:, 1:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows", ["some", "none"])
def test_a_head_gathered_per_call_is_called_once_whatever_the_number_of_rows(model64, rows):
    """Under ZeRO-3 each call of the head gathers its weight (a collective): every rank must call it
    equally often, so once per pass, also with more rows than a chunk and with no rows at all."""
    import copy

    input_ids, attention_mask, response_mask = _random_batch(model64.config.vocab_size, seed=5)
    if rows == "none":
        response_mask[:] = False
    model = copy.deepcopy(model64)
    head = model.get_output_embeddings()
    head.weight.ds_id = 0  # how DeepSpeed marks a ZeRO-3 parameter
    calls = []
    head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    out = response_logprobs(model, input_ids, response_mask, attention_mask, chunk_size=3)
    expected = response_logprobs(model64, input_ids, response_mask, attention_mask, chunk_size=3)
    assert calls == [int(response_mask[:, 1:].sum())]
    torch.testing.assert_close(out.logprobs, expected.logprobs, rtol=1e-12, atol=1e-12)
