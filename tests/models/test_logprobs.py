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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused chunk kernels are compiled for a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chunk_kernels_match_plain_tensor_code(dtype):
    """The compiled chunk statistics and logit gradient equal the plain code on the same inputs
    (float32: to rounding; bfloat16 logits: the gradient's one rounding to bfloat16), for a
    vocabulary and chunk shape of a real model, the last chunk shorter."""
    from grape_lightning.models.head_chunk import chunk_logit_grad, chunk_statistics, fused

    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    bound = 1e-5 if dtype == torch.float32 else 1e-2  # float32 rounding; one bfloat16 rounding of the gradient

    def relative_error(got, want):
        return ((got.double() - want.double()).norm() / want.double().norm()).item()

    for rows in (1024, 333):
        logits = (4 * torch.randn(rows, 151_936, device=device, generator=generator)).to(dtype)
        targets = torch.randint(0, 151_936, (rows,), device=device, generator=generator)
        grad_logprobs, grad_entropy = torch.randn(2, rows, device=device, generator=generator)
        for temperature in (1.0, 0.7):
            expected = chunk_statistics(logits, targets, temperature, True, True)
            got = fused(chunk_statistics, device)(logits, targets, temperature, True, True)
            for name, want, have in zip(("logprobs", "log_normaliser", "entropy"), expected[:3], got[:3]):
                assert relative_error(have, want) < 1e-5, (name, rows, temperature, relative_error(have, want))
            assert (got[3] != expected[3]).sum() <= 1  # a near-tie with the maximum may flip
            for upstream in ((grad_logprobs, expected[2], grad_entropy), (grad_logprobs, None, None)):
                want = chunk_logit_grad(logits, targets, expected[1], upstream[0], upstream[1], upstream[2], temperature)
                have = fused(chunk_logit_grad, device)(logits, targets, expected[1], upstream[0], upstream[1], upstream[2], temperature)
                assert have.dtype == dtype and relative_error(have, want) < bound, (rows, temperature, relative_error(have, want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused chunk kernels are compiled for a CUDA device")
def test_fused_linear_head_matches_float64_on_gpu():
    """Log-probs, entropies and gradients of the fused CUDA path against a float64 full log-softmax."""
    from grape_lightning.models.logprobs import LinearHeadLogprobs

    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(2500, 256, device=device, generator=generator, requires_grad=True)
    weight = (0.2 * torch.randn(30_000, 256, device=device, generator=generator)).requires_grad_()
    targets = torch.randint(0, 30_000, (2500,), device=device, generator=generator)
    upstream = torch.randn(2, 2500, device=device, generator=generator)
    logprobs, entropy, _ = LinearHeadLogprobs.apply(hidden, weight, targets, 0.8, 1024, True, False)
    (logprobs * upstream[0] + entropy * upstream[1]).sum().backward()

    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    log_p = torch.log_softmax(hidden64 @ weight64.t() / 0.8, dim=-1)
    logprobs64 = log_p.gather(-1, targets[:, None]).squeeze(-1)
    entropy64 = -(log_p.exp() * log_p).sum(-1)
    (logprobs64 * upstream[0] + entropy64 * upstream[1]).sum().backward()
    # float32 operands through the matrix units (tf32 off by default): relative error near 1e-6
    torch.testing.assert_close(logprobs.double(), logprobs64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), entropy64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [3, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_loss_gradient_in_the_forward_equals_autograd_through_the_log_probs(model64, chunk_size, temperature):
    """SFT's loss as sum_t w_t l_t with w = -mask/N: the head's in-forward gradient gives the same
    loss, log-probs, top-1 flags and parameter gradients as autograd through the log-probs with
    the plain loss, in float64."""
    from grape_lightning.losses.sft import sft_loss, sft_token_weights

    input_ids, attention_mask, response_mask = _random_batch(model64.config.vocab_size, seed=3)
    model64.zero_grad()
    plain = response_logprobs(model64, input_ids, response_mask, attention_mask, chunk_size=chunk_size, temperature=temperature, with_top1=True)
    plain_loss, _ = sft_loss(plain.logprobs, response_mask, num_tokens=11.0)
    plain_loss.backward()
    plain_grads = [p.grad.clone() for p in model64.parameters()]

    model64.zero_grad()
    weights = sft_token_weights(response_mask, 11.0)
    fused = response_logprobs(model64, input_ids, response_mask, attention_mask, chunk_size=chunk_size, temperature=temperature,
                              with_top1=True, linear_loss_weights=weights)
    assert not fused.logprobs.requires_grad  # the head's path: only the loss carries the gradient
    fused.linear_loss.backward()
    torch.testing.assert_close(fused.linear_loss, plain_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.logprobs, plain.logprobs.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(fused.top1, plain.top1)
    for got, want in zip((p.grad for p in model64.parameters()), plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_linear_loss_scales_its_stored_gradients_by_the_upstream_gradient():
    from grape_lightning.models.logprobs import LinearHeadLinearLoss

    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    row_weights = torch.randn(37, dtype=torch.float64, generator=generator)
    loss, logprobs, entropy, _ = LinearHeadLinearLoss.apply(hidden, weight, targets, row_weights, 0.9, 10, True, False)
    (-2.5 * loss).backward()
    hidden64, weight64 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    log_distribution = torch.log_softmax(hidden64 @ weight64.t() / 0.9, dim=-1)
    expected = log_distribution.gather(-1, targets[:, None]).squeeze(-1)
    (-2.5 * (row_weights * expected).sum()).backward()
    torch.testing.assert_close(logprobs, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, -(log_distribution.exp() * log_distribution).sum(-1).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, hidden64.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight.grad, weight64.grad, rtol=1e-12, atol=1e-12)
