"""Padding-free batches: the same loss and gradients as the padded batch, attention kept inside
each sequence, for SFT and DPO, through transformers' sdpa (block-diagonal mask) and through
``sdpa_varlen`` (one attention per sequence on CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from grape_lightning.algorithms import DPOModule, SFTModule
from grape_lightning.data.collate import collate_prompt_completion, padding_free, sequence_sums
from grape_lightning.data.preference import collate_pairs
from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.models.varlen_attention import sequence_boundaries
from tests.conftest import TINY_CONFIG, tiny_spec

IMPLEMENTATIONS = ["sdpa", "sdpa_varlen"]


def _random_pairs(generator: torch.Generator, count: int, vocab: int) -> list[tuple[list[int], list[int]]]:
    """Prompt/completion pairs of random lengths (1..8 prompt, 1..12 completion tokens)."""
    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high + 1, (), generator=generator))
        return torch.randint(4, vocab, (length,), generator=generator).tolist()

    return [(ids(1, 8), ids(1, 12)) for _ in range(count)]


def _loss_and_gradients(module, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]


def _assert_same(padded, free):
    (loss_a, grads_a), (loss_b, grads_b) = padded, free
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-10)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_padding_free_batch_holds_only_real_tokens():
    rows = [([5, 6], [7]), ([8], [9, 10, 11]), ([12, 13, 14], [15, 16])]
    batch = padding_free(collate_prompt_completion(rows, pad_token_id=0))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1]]
    assert "attention_mask" not in batch and int(batch["num_tokens"]) == 12
    cumulative, longest = sequence_boundaries(batch["position_ids"])
    assert cumulative.tolist() == [0, 3, 7, 12] and longest == 5
    # every row starts a sequence; a restart inside a row starts another
    cumulative, longest = sequence_boundaries(torch.tensor([[0, 1, 2, 0], [0, 1, 2, 3]]))
    assert cumulative.tolist() == [0, 3, 4, 8] and longest == 4
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert sequence_sums(values, torch.tensor([0, 2, 0, 2]), 3).tolist() == [4.0, 0.0, 6.0]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sft_padding_free_gives_the_padded_loss_and_gradients(implementation):
    generator = torch.Generator().manual_seed(1)
    padded = SFTModule(tiny_spec(dtype="float64", attn_implementation=implementation), padding_free=False)
    free = SFTModule(tiny_spec(dtype="float64", attn_implementation=implementation), padding_free=True)
    free.policy.load_state_dict(padded.policy.state_dict())
    pairs = _random_pairs(generator, 7, padded.policy.config.vocab_size)
    batch = collate_prompt_completion(pairs, pad_token_id=padded.tokenizer.pad_token_id)
    result = _loss_and_gradients(padded, batch)
    # the hand value: token mean of -log pi over the completions, from each pair scored alone
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in pairs:
            logits = padded.policy(torch.tensor([prompt + completion])).logits[0]
            logprobs = F.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            nll -= logprobs.gather(-1, torch.tensor(completion)[:, None]).sum().item()
            count += len(completion)
    assert abs(result[0].item() - nll / count) < 1e-10
    _assert_same(result, _loss_and_gradients(free, batch))


@pytest.mark.parametrize("loss_type, sft_weight", [("sigmoid", 0.5), ("ipo", 0.0)])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dpo_padding_free_gives_the_padded_loss_and_gradients(implementation, loss_type, sft_weight):
    generator = torch.Generator().manual_seed(2)
    options = dict(loss_type=loss_type, sft_weight=sft_weight, beta=0.5)
    padded = DPOModule(tiny_spec(dtype="float64", attn_implementation=implementation), padding_free=False, **options)
    free = DPOModule(tiny_spec(dtype="float64", attn_implementation=implementation), padding_free=True, **options)
    with torch.no_grad():
        for parameter in padded.policy.parameters():  # a policy apart from its reference
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    free.policy.load_state_dict(padded.policy.state_dict())
    vocab = padded.policy.config.vocab_size
    items = []
    for pair_id, (prompt, chosen) in enumerate(_random_pairs(generator, 5, vocab)):
        rejected = _random_pairs(generator, 1, vocab)[0][1]
        items.append({"pair_id": pair_id, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "margin": 0.0})
    batch = collate_pairs(items, pad_token_id=padded.tokenizer.pad_token_id)
    result = _loss_and_gradients(padded, batch)
    free_batch = padding_free(batch)
    assert free_batch["input_ids"].shape == (1, int(batch["attention_mask"].sum()))
    _assert_same(result, _loss_and_gradients(free, batch))
    # sequence log-probs, policy and reference, from the packed row equal those of each sequence alone
    with torch.no_grad():
        logps = free.sequence_logps(free.policy_logprobs(free_batch).logprobs, free_batch)
        reference = free._reference_logps(free_batch, "train")
        for row, item in enumerate(items + items):
            response = item["chosen_ids"] if row < len(items) else item["rejected_ids"]
            ids = torch.tensor([item["prompt_ids"] + response])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(item["prompt_ids"]) :] = True
            for model, values in ((free.policy, logps), (free.reference, reference)):
                alone = response_logprobs(model, ids, mask).logprobs.sum()
                if free.length_normalize:
                    alone = alone / len(response)
                assert abs(values[row].item() - alone.item()) < 1e-10


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_attention_stays_inside_each_sequence_of_a_packed_row(implementation):
    """Changing one sequence's tokens leaves every other sequence's log-probs as they were."""
    module = SFTModule(tiny_spec(dtype="float64", attn_implementation=implementation), padding_free=True)
    generator = torch.Generator().manual_seed(3)
    pairs = _random_pairs(generator, 4, module.policy.config.vocab_size)
    changed = list(pairs)
    changed[1] = (changed[1][0], [(t + 1) % 60 + 4 for t in changed[1][1]])
    with torch.no_grad():
        values = []
        for rows in (pairs, changed):
            batch = padding_free(collate_prompt_completion(rows, pad_token_id=module.tokenizer.pad_token_id))
            values.append((module.policy_logprobs(batch).logprobs[0], batch["sequence_ids"][0]))
    (before, ids), (after, _) = values
    torch.testing.assert_close(after[ids != 1], before[ids != 1], rtol=0, atol=0)
    assert (after[ids == 1] - before[ids == 1]).abs().max() > 1e-3


def test_padding_free_by_default_only_with_sequence_wise_attention():
    """None (the default) flattens batches where the policy's attention runs a packed row sequence
    by sequence (sdpa_varlen, the default on CUDA), not under sdpa's block-diagonal mask (the CPU
    default: padded batches as before)."""
    from grape_lightning.models.varlen_attention import padding_free_wanted

    plain, varlen = SFTModule(tiny_spec()), DPOModule(tiny_spec(attn_implementation="sdpa_varlen"))
    assert plain.padding_free is None and varlen.padding_free is None
    if not torch.cuda.is_available():
        assert plain.policy.config._attn_implementation == "sdpa"
    assert padding_free_wanted(None, plain.policy) is torch.cuda.is_available()
    assert padding_free_wanted(None, varlen.policy) is True
    assert padding_free_wanted(False, varlen.policy) is False and padding_free_wanted(True, plain.policy) is True
    # the batch each module's step hands to the policy: padded [2, 3] under sdpa (off CUDA), one
    # row of the 5 real tokens under sdpa_varlen
    sft_batch = collate_prompt_completion([([5, 6], [7]), ([8], [9])], pad_token_id=0)
    dpo_batch = collate_pairs([{"pair_id": 0, "prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7, 8], "margin": 0.0}], 0)
    seen = []

    class Seen(Exception):
        pass

    def record(batch, **kwargs):
        seen.append(tuple(batch["input_ids"].shape))
        raise Seen

    for module, batch in ((plain, sft_batch), (varlen, dpo_batch)):
        module.policy_logprobs = record
        with pytest.raises(Seen):
            module._step(batch, "train")
    assert seen == [(1, 5) if torch.cuda.is_available() else (2, 3), (1, 5)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_varlen_attention_matches_per_sequence_sdpa_on_cuda():
    from grape_lightning.models.varlen_attention import varlen_attention

    torch.manual_seed(0)
    lengths = [37, 300, 1, 129]
    cumulative = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    query = torch.randn(sum(lengths), 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key = torch.randn(sum(lengths), 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    value = torch.randn(sum(lengths), 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flash = varlen_attention(query, key, value, cumulative, max(lengths), None)
    exact = varlen_attention(*(x.double() for x in (query, key, value)), cumulative, max(lengths), None)
    torch.testing.assert_close(flash.double(), exact, rtol=0, atol=2e-2)
    grads = torch.autograd.grad(flash.float().square().sum(), (query, key, value))
    exact_grads = torch.autograd.grad(exact.square().sum(), (query, key, value))
    for a, b in zip(grads, exact_grads):
        assert (a.double() - b).abs().max() / b.abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_policy_loads_with_varlen_attention_and_matches_padded():
    config = {**TINY_CONFIG, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim 64
    module = SFTModule(tiny_spec(config=config, dtype="bfloat16")).cuda()
    assert module.policy.config._attn_implementation == "sdpa_varlen"
    generator = torch.Generator().manual_seed(4)
    pairs = _random_pairs(generator, 6, module.policy.config.vocab_size)
    batch = {k: v.cuda() for k, v in collate_prompt_completion(pairs, module.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        padded = module.policy_logprobs(batch).logprobs[batch["attention_mask"].bool()]
        free = module.policy_logprobs(padding_free(batch)).logprobs[0]
    torch.testing.assert_close(free.float(), padded.float(), rtol=0, atol=5e-2)


def test_varlen_attention_inside_compiled_decoder_layers():
    """Decoder layers compiled (as ModelSpec.compile does; dynamo with its eager backend here)
    call the packed attention outside their graphs and give the padded log-probs."""
    from grape_lightning.models.sharding import decoder_layers

    module = SFTModule(tiny_spec(dtype="float64", attn_implementation="sdpa_varlen"), padding_free=True)
    generator = torch.Generator().manual_seed(5)
    pairs = _random_pairs(generator, 5, module.policy.config.vocab_size)
    batch = collate_prompt_completion(pairs, pad_token_id=module.tokenizer.pad_token_id)
    with torch.no_grad():
        padded = module.policy_logprobs(batch).logprobs[batch["attention_mask"].bool()]
        torch._dynamo.reset()
        for layer in decoder_layers(module.policy.base_model):
            layer.compile(backend="eager", dynamic=None)
        free = module.policy_logprobs(padding_free(batch)).logprobs[0]
    torch._dynamo.reset()
    torch.testing.assert_close(free, padded, rtol=0, atol=1e-10)


def test_varlen_attention_only_for_full_causal_attention():
    from transformers import AutoConfig

    from grape_lightning.models.varlen_attention import supports_varlen

    assert supports_varlen(AutoConfig.for_model("qwen2", **{k: v for k, v in TINY_CONFIG.items() if k != "model_type"}))
    assert supports_varlen(AutoConfig.for_model("llama", hidden_size=32, num_attention_heads=4))
    assert not supports_varlen(AutoConfig.for_model("mistral", hidden_size=32, num_attention_heads=4, sliding_window=16))
    assert not supports_varlen(AutoConfig.for_model("qwen2", hidden_size=32, num_attention_heads=4, use_sliding_window=True,
                                                    sliding_window=16, max_window_layers=0))
