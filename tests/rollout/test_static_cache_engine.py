"""The static-cache engine against the reference KV-cache engine: the same tokens and log-probs
for each supported architecture (float64 on CPU, where no graph is captured), the same stops,
the same result for any check interval, and a clean fallback for other models. The on-device
Gumbel-max sampler (the default on CUDA; forced with ``sampler="gumbel"`` on CPU) gives the
reference's greedy tokens and the log-probs of a fresh forward pass of what it sampled. On a CUDA
device the captured graphs are checked the same way, against a changed weight, and by the
frequencies of tokens drawn inside a graph."""

import pytest
import torch

from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.rollout.kv_cache_engine import KVCacheEngine
from grape_lightning.rollout.sampling import SamplingParams
from grape_lightning.rollout.static_cache_engine import StaticCacheEngine
from tests.conftest import TINY_CONFIG, tiny_spec
from tests.rollout.test_gumbel_sampling import _chi_square_p_value

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]


def _apply(marks):
    def decorate(function):
        for mark in reversed(marks):
            function = mark(function)
        return function
    return decorate

PROMPTS = ["12+7=", "3+4=", "reverse abcde:", "99+99=", "1+1=", "reverse xy:"]

ARCHITECTURES = {
    "qwen2": dict(TINY_CONFIG),
    "llama": {**TINY_CONFIG, "model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "qwen3": {**TINY_CONFIG, "model_type": "qwen3", "head_dim": 16},
    "mistral": {**TINY_CONFIG, "model_type": "mistral", "sliding_window": None},
}


def _model(architecture: str, dtype: str = "float64", device: str = "cpu"):
    spec = tiny_spec(config=ARCHITECTURES[architecture], dtype=dtype, init_seed=3)
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, tokenizer).to(device).eval()
    with torch.no_grad():  # larger weights than the initialiser's, so that the logits are far from flat
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.mul_(8.0)
    return model, tokenizer, [tokenizer(p)["input_ids"] for p in PROMPTS]


def _assert_same(ours, reference, atol: float) -> None:
    assert ours.prompt_width == reference.prompt_width
    assert torch.equal(ours.input_ids, reference.input_ids)
    assert torch.equal(ours.attention_mask, reference.attention_mask)
    assert torch.equal(ours.response_mask, reference.response_mask)
    assert torch.equal(ours.finished, reference.finished)
    torch.testing.assert_close(ours.logprobs, reference.logprobs, rtol=0, atol=atol)


PARAMS = {
    "greedy": SamplingParams(max_new_tokens=12, temperature=0),
    "sampled": SamplingParams(max_new_tokens=12, temperature=1.0),
    "top_k_top_p": SamplingParams(max_new_tokens=12, temperature=0.7, top_k=10, top_p=0.9),
    "stop_string": SamplingParams(max_new_tokens=12, temperature=1.0, stop_strings=["9"]),
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("setting", list(PARAMS))
def test_same_generation_as_the_reference_engine(architecture, setting):
    model, tokenizer, prompt_ids = _model(architecture)
    params = PARAMS[setting]
    prompts = prompt_ids * 3
    reference = KVCacheEngine(tokenizer).generate(model, prompts, params, torch.Generator().manual_seed(1))
    ours = StaticCacheEngine(tokenizer).generate(model, prompts, params, torch.Generator().manual_seed(1))
    _assert_same(ours, reference, atol=1e-10)
    fresh = response_logprobs(model, ours.input_ids, ours.response_mask, ours.attention_mask, temperature=params.logprob_temperature)
    torch.testing.assert_close(ours.logprobs, fresh.logprobs, rtol=0, atol=1e-10)


def test_stops_are_honoured_and_the_check_interval_does_not_change_the_result():
    model, tokenizer, prompt_ids = _model("qwen2")
    model.generation_config.eos_token_id = list(range(1, len(tokenizer), 3))  # a third of the tokens end a row
    params = SamplingParams(max_new_tokens=20, temperature=1.5)
    prompts = prompt_ids * 4
    results = [
        StaticCacheEngine(tokenizer, check_every=every).generate(model, prompts, params, torch.Generator().manual_seed(5))
        for every in (1, 3, 8, 64)
    ]
    reference = KVCacheEngine(tokenizer).generate(model, prompts, params, torch.Generator().manual_seed(5))
    lengths = reference.response_lengths
    assert reference.finished.all() and lengths.max() < 20 and lengths.min() < lengths.max()  # ragged stops, all early
    for result in results:
        _assert_same(result, reference, atol=1e-10)


def test_prompt_padding_to_a_shared_width_is_invisible():
    model, tokenizer, prompt_ids = _model("qwen2")
    params = SamplingParams(max_new_tokens=8, temperature=0)
    narrow = StaticCacheEngine(tokenizer, width_multiple=1).generate(model, prompt_ids, params)
    wide = StaticCacheEngine(tokenizer, width_multiple=64).generate(model, prompt_ids, params)
    _assert_same(wide, narrow, atol=1e-10)


def test_unsupported_models_fall_back_to_the_reference_engine():
    spec = tiny_spec(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}, dtype="float64")
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, tokenizer).eval()
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    engine = StaticCacheEngine(tokenizer)
    with pytest.warns(UserWarning, match="gpt2"):
        ours = engine.generate(model, prompt_ids, params)
    _assert_same(ours, KVCacheEngine(tokenizer).generate(model, prompt_ids, params), atol=0)


def test_a_reused_cache_follows_in_place_weight_updates():
    """The engine keeps its cache (and fused projections) between calls; an optimizer step in between is seen."""
    model, tokenizer, prompt_ids = _model("qwen2")
    params = SamplingParams(max_new_tokens=8, temperature=0)
    engine = StaticCacheEngine(tokenizer)
    for _ in range(3):
        _assert_same(engine.generate(model, prompt_ids, params), KVCacheEngine(tokenizer).generate(model, prompt_ids, params), atol=1e-10)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    assert len(engine._decoders) == 1


@_apply(gpu)
@pytest.mark.parametrize("sampler", ["gumbel", "multinomial"])
@pytest.mark.parametrize("architecture", ["qwen2", "llama", "qwen3"])
def test_cuda_graphs_give_the_reference_tokens_and_follow_weight_updates(architecture, sampler):
    model, tokenizer, prompt_ids = _model(architecture, dtype="float32", device="cuda")
    params = SamplingParams(max_new_tokens=12, temperature=0)
    engine = StaticCacheEngine(tokenizer, sampler=sampler)
    for _ in range(2):  # the second call replays the graph recorded by the first
        ours = engine.generate(model, prompt_ids * 4, params)
        reference = KVCacheEngine(tokenizer).generate(model, prompt_ids * 4, params)
        _assert_same(ours, reference, atol=1e-4)
        with torch.no_grad():  # an in-place update, as an optimizer step makes it
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
    assert len(engine._decoders) == 1


@_apply(gpu)
@pytest.mark.parametrize("sampler", ["gumbel", "multinomial"])
def test_a_failed_capture_decodes_without_a_graph(monkeypatch, sampler):
    """A capture invalidated by other work of the process is counted and warned about, and that
    batch shape decodes eagerly, with the reference tokens."""
    from grape_lightning.rollout.static_cache_decoder import StaticCacheDecoder

    model, tokenizer, prompt_ids = _model("qwen2", dtype="float32", device="cuda")
    params = SamplingParams(max_new_tokens=12, temperature=0)

    def invalidated(self, step, pool=None, generator=None):
        raise torch.AcceleratorError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(StaticCacheDecoder, "record", invalidated)
    engine = StaticCacheEngine(tokenizer, sampler=sampler)
    with pytest.warns(UserWarning, match="capture failed"):
        ours = engine.generate(model, prompt_ids, params)
    _assert_same(ours, KVCacheEngine(tokenizer).generate(model, prompt_ids, params), atol=1e-4)
    assert engine.capture_failures == 1 and next(iter(engine._decoders.values())).graph is None
    assert all(sampler.graph is None for sampler in engine._samplers.values())


# -- the on-device Gumbel-max sampler -------------------------------------------------------------------


def _assert_stops_well_formed(result, eos_ids: set[int], pad_id: int) -> None:
    """Each row: a run of masked tokens, EOS only as the last of them (exactly when finished), padding after."""
    responses, mask = result.response_ids, result.response_mask[:, result.prompt_width :]
    for row in range(responses.shape[0]):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()
        ends = [token in eos_ids for token in responses[row, :length].tolist()]
        assert not any(ends[:-1]) and ends[-1] == bool(result.finished[row])
        assert (responses[row, length:] == pad_id).all()


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_gumbel_sampler_greedy_gives_the_reference_tokens(architecture):
    model, tokenizer, prompt_ids = _model(architecture)
    params = PARAMS["greedy"]
    reference = KVCacheEngine(tokenizer).generate(model, prompt_ids * 3, params)
    ours = StaticCacheEngine(tokenizer, sampler="gumbel").generate(model, prompt_ids * 3, params)
    _assert_same(ours, reference, atol=1e-10)


@pytest.mark.parametrize("setting", ["sampled", "top_k_top_p"])
def test_gumbel_sampler_log_probs_are_those_of_a_fresh_forward_pass(setting):
    model, tokenizer, prompt_ids = _model("qwen2")
    params = PARAMS[setting]
    engine = StaticCacheEngine(tokenizer, sampler="gumbel")
    ours = engine.generate(model, prompt_ids * 3, params, torch.Generator().manual_seed(1))
    fresh = response_logprobs(model, ours.input_ids, ours.response_mask, ours.attention_mask, temperature=params.logprob_temperature)
    torch.testing.assert_close(ours.logprobs, fresh.logprobs, rtol=0, atol=1e-10)
    assert ours.response_lengths.max() == params.max_new_tokens
    again = engine.generate(model, prompt_ids * 3, params, torch.Generator().manual_seed(1))  # the sampler is reused
    other = engine.generate(model, prompt_ids * 3, params, torch.Generator().manual_seed(2))
    assert torch.equal(again.input_ids, ours.input_ids) and torch.equal(again.logprobs, ours.logprobs)
    assert not torch.equal(other.input_ids, ours.input_ids)


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_gumbel_sampler_checking_stops_every_k_steps_gives_the_every_step_result(temperature):
    model, tokenizer, prompt_ids = _model("qwen2")
    eos_ids = list(range(1, len(tokenizer), 3))  # a third of the tokens end a row
    model.generation_config.eos_token_id = eos_ids
    params = SamplingParams(max_new_tokens=20, temperature=temperature)
    prompts = prompt_ids * 2
    results = [
        StaticCacheEngine(tokenizer, sampler="gumbel", check_every=every).generate(model, prompts, params, torch.Generator().manual_seed(5))
        for every in (1, 3, 64)
    ]
    every_step = results[0]
    lengths = every_step.response_lengths
    assert every_step.finished.any() and lengths.min() < lengths.max()  # ragged stops
    _assert_stops_well_formed(every_step, set(eos_ids) | {tokenizer.eos_token_id}, tokenizer.pad_token_id)
    for result in results[1:]:
        _assert_same(result, every_step, atol=0)
    if temperature == 0:
        _assert_same(every_step, KVCacheEngine(tokenizer).generate(model, prompts, params), atol=1e-10)
    fresh = response_logprobs(model, every_step.input_ids, every_step.response_mask, every_step.attention_mask,
                              temperature=params.logprob_temperature)
    torch.testing.assert_close(every_step.logprobs, fresh.logprobs, rtol=0, atol=1e-10)


def test_stop_strings_take_the_multinomial_sampler():
    model, tokenizer, prompt_ids = _model("qwen2")
    params = PARAMS["stop_string"]
    ours = StaticCacheEngine(tokenizer, sampler="gumbel").generate(model, prompt_ids * 3, params, torch.Generator().manual_seed(1))
    reference = KVCacheEngine(tokenizer).generate(model, prompt_ids * 3, params, torch.Generator().manual_seed(1))
    _assert_same(ours, reference, atol=1e-10)


@_apply(gpu)
@pytest.mark.parametrize("setting", ["sampled", "top_k_top_p"])
def test_in_graph_sampling_log_probs_are_those_of_a_fresh_forward_pass(setting):
    model, tokenizer, prompt_ids = _model("qwen2", dtype="float32", device="cuda")
    params = PARAMS[setting]
    engine = StaticCacheEngine(tokenizer)  # on CUDA: Gumbel-max inside the graph
    results = [engine.generate(model, prompt_ids * 4, params, torch.Generator("cuda").manual_seed(seed)) for seed in (1, 1, 2)]
    (sampler,) = engine._samplers.values()
    assert sampler.graph is not None and engine.capture_failures == 0
    for ours in results:  # the first call records the graph, the others replay it
        fresh = response_logprobs(model, ours.input_ids, ours.response_mask, ours.attention_mask, temperature=params.logprob_temperature)
        mask = ours.response_mask
        assert float((ours.logprobs[mask] - fresh.logprobs[mask]).abs().max()) < 1e-4
        assert ours.response_lengths.max() == params.max_new_tokens
    assert torch.equal(results[0].input_ids, results[1].input_ids)  # a seed repeats
    assert not torch.equal(results[0].input_ids, results[2].input_ids)
    # each replay draws fresh noise: identical rows (the same prompt) part ways after their first token
    rows = results[0].response_ids[:, 1:]
    assert len({tuple(row) for row in rows.tolist()}) > len(PROMPTS)


@_apply(gpu)
def test_in_graph_token_frequencies_follow_the_softmax():
    """Many rows of one prompt: the second response token (drawn inside the graph) has, summed
    over rows, the frequencies softmax(z / T) of each row's own logits predict."""
    model, tokenizer, prompt_ids = _model("qwen2", dtype="float32", device="cuda")
    params = SamplingParams(max_new_tokens=2, temperature=2.0)
    rows = 4096
    engine = StaticCacheEngine(tokenizer, check_every=64)
    engine.generate(model, [prompt_ids[0]] * rows, params, torch.Generator("cuda").manual_seed(0))  # records the graph
    out = engine.generate(model, [prompt_ids[0]] * rows, params, torch.Generator("cuda").manual_seed(1))
    assert next(iter(engine._samplers.values())).graph is not None
    # rows whose first token ended them have no second one; which rows those are does not depend on the second draw
    drawn = out.response_mask[:, -1]
    assert drawn.sum() > rows // 2
    with torch.no_grad():
        logits = model(input_ids=out.input_ids[drawn, :-1], attention_mask=out.attention_mask[drawn, :-1]).logits[:, -1].double()
    expected = torch.softmax(logits / params.temperature, dim=-1).sum(0)
    counts = torch.bincount(out.input_ids[drawn, -1], minlength=expected.shape[0]).double()
    # tokens expected fewer than 5 times are pooled into one bin (the chi-square approximation needs counts)
    rare = expected < 5
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]]).cpu()
    counts = torch.cat([counts[~rare], counts[rare].sum()[None]]).cpu()
    assert _chi_square_p_value(counts, expected / expected.sum()) > 1e-3
    assert _chi_square_p_value(counts, (expected / expected.sum()).roll(1)) < 1e-6
