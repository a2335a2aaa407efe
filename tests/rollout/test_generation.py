"""The reference KV-cache engine: greedy equals HF generate, log-probs equal a fresh forward pass,
left padding is harmless, sampling is reproducible, and stops are honoured."""

import pytest
import torch

from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.rollout.kv_cache_engine import KVCacheEngine
from grape_lightning.rollout.sampling import SamplingParams
from tests.conftest import tiny_spec

PROMPTS = ["12+7=", "3+4=", "reverse abcde:", "99+99="]


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer(tiny_spec())
    model = load_causal_lm(tiny_spec(dtype="float64"), tokenizer).eval()
    return model, tokenizer, KVCacheEngine(tokenizer), [tokenizer(p)["input_ids"] for p in PROMPTS]


def test_greedy_matches_hf_generate(setup):
    model, tokenizer, engine, prompt_ids = setup
    ours = engine.generate(model, prompt_ids, SamplingParams(max_new_tokens=12, temperature=0))
    for row, ids in enumerate(prompt_ids):
        reference = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        expected = reference[0, len(ids):].tolist()
        got = ours.response_ids[row][ours.response_mask[row, ours.prompt_width:]].tolist()
        assert got == expected


def test_batched_left_padding_equals_one_prompt_at_a_time(setup):
    model, _, engine, prompt_ids = setup
    params = SamplingParams(max_new_tokens=10, temperature=0)
    batched = engine.generate(model, prompt_ids, params)
    for row, ids in enumerate(prompt_ids):
        alone = engine.generate(model, [ids], params)
        n = int(alone.response_lengths[0])
        assert batched.response_ids[row, :n].tolist() == alone.response_ids[0, :n].tolist()
        torch.testing.assert_close(batched.logprobs[row, batched.prompt_width:][:n], alone.logprobs[0, alone.prompt_width:][:n])


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=9, temperature=0.8), SamplingParams(max_new_tokens=9, temperature=1.3, top_k=20, top_p=0.9)])
def test_sampling_logprobs_equal_a_fresh_forward_pass(setup, params):
    model, _, engine, prompt_ids = setup
    out = engine.generate(model, prompt_ids * 3, params, torch.Generator().manual_seed(0))
    fresh = response_logprobs(model, out.input_ids, out.response_mask, out.attention_mask, temperature=params.temperature)
    torch.testing.assert_close(out.logprobs, fresh.logprobs, rtol=1e-9, atol=1e-9)
    assert out.logprobs.dtype == torch.float64


def test_temperature_to_zero_is_greedy_and_seed_reproduces(setup):
    model, _, engine, prompt_ids = setup
    greedy = engine.generate(model, prompt_ids, SamplingParams(max_new_tokens=8, temperature=0))
    cold = engine.generate(model, prompt_ids, SamplingParams(max_new_tokens=8, temperature=1e-5), torch.Generator().manual_seed(3))
    assert torch.equal(greedy.input_ids, cold.input_ids)
    hot = SamplingParams(max_new_tokens=8, temperature=1.5)
    first = engine.generate(model, prompt_ids, hot, torch.Generator().manual_seed(7))
    second = engine.generate(model, prompt_ids, hot, torch.Generator().manual_seed(7))
    other = engine.generate(model, prompt_ids, hot, torch.Generator().manual_seed(8))
    assert torch.equal(first.input_ids, second.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_top_k_one_and_tiny_top_p_are_greedy(setup):
    model, _, engine, prompt_ids = setup
    greedy = engine.generate(model, prompt_ids, SamplingParams(max_new_tokens=8, temperature=0))
    for params in (SamplingParams(max_new_tokens=8, top_k=1), SamplingParams(max_new_tokens=8, top_p=1e-6)):
        sampled = engine.generate(model, prompt_ids, params, torch.Generator().manual_seed(0))
        assert torch.equal(sampled.input_ids, greedy.input_ids)


def test_eos_and_stop_strings_end_rows(setup):
    model, tokenizer, engine, prompt_ids = setup
    out = engine.generate(model, prompt_ids * 4, SamplingParams(max_new_tokens=20, temperature=3.0, stop_strings=["a", "1"]), torch.Generator().manual_seed(1))
    for row in range(out.input_ids.shape[0]):
        length = int(out.response_lengths[row])
        tokens = out.response_ids[row].tolist()
        text = tokenizer.decode(tokens[:length])
        mask = out.response_mask[row, out.prompt_width:].tolist()
        assert mask == [True] * length + [False] * (len(mask) - length)  # contiguous response
        assert all(t == tokenizer.pad_token_id for t in tokens[length:])
        if bool(out.finished[row]):
            last = tokens[length - 1]
            assert last == tokenizer.eos_token_id or text.endswith(("a", "1"))
            prefix = tokenizer.decode(tokens[: length - 1])
            assert "a" not in prefix and "1" not in prefix and tokenizer.eos_token_id not in tokens[: length - 1]
        else:
            assert length == 20
    assert out.finished.any()
