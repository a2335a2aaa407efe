"""Compiled decoder layers: when they are used, and that they compute what the eager layers do."""

import copy

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from grape_lightning.models.compile import compile_decoder_layers, compile_wanted
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.models.lora import LoRAConfig
from tests.conftest import tiny_spec

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_compile_by_default_only_for_plain_models_on_a_gpu():
    single, ddp = SingleDeviceStrategy(CUDA), DDPStrategy()
    assert compile_wanted(tiny_spec(), CUDA, single) and compile_wanted(tiny_spec(), CUDA, ddp)
    assert not compile_wanted(tiny_spec(), CPU, SingleDeviceStrategy(CPU))
    assert not compile_wanted(tiny_spec(), CUDA, FSDPStrategy())
    assert not compile_wanted(tiny_spec(lora=LoRAConfig(r=2)), CUDA, single)
    assert compile_wanted(tiny_spec(compile=True), CPU, SingleDeviceStrategy(CPU))
    assert not compile_wanted(tiny_spec(compile=False), CUDA, single)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled layers are for a CUDA device")
def test_compiled_layers_give_the_eager_log_probs_and_gradients():
    tokenizer = load_tokenizer(tiny_spec())
    eager = load_causal_lm(tiny_spec(), tokenizer).to(CUDA)
    compiled = copy.deepcopy(eager)
    assert compile_decoder_layers(compiled) == eager.config.num_hidden_layers
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    generator = torch.Generator().manual_seed(0)
    for time in (40, 57):  # a second length: the layers are traced again, then as dynamic shapes
        input_ids = torch.randint(4, eager.config.vocab_size, (3, time), generator=generator).to(CUDA)
        response_mask = torch.ones_like(input_ids, dtype=torch.bool)
        response_mask[:, :5] = False
        outputs = []
        for model in (eager, compiled):
            model.zero_grad()
            token = response_logprobs(model, input_ids, response_mask, with_entropy=True)
            (token.logprobs.sum() + token.entropy.sum()).backward()
            outputs.append((token.logprobs.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
        for got, want in zip(outputs[1][1], outputs[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_trpo_keeps_eager_layers_and_refuses_compiled_ones():
    """TRPO's Fisher-vector products differentiate twice through the policy, which compiled layers
    cannot: by default its layers stay eager; asked to compile, it says why not."""
    from grape_lightning.algorithms import TRPOModule
    from grape_lightning.rewards import ExactMatch

    assert TRPOModule.differentiates_twice
    with pytest.raises(ValueError, match="second derivatives"):
        TRPOModule(tiny_spec(compile=True), rewards=[ExactMatch()]).on_fit_start()


def test_eager_layers_runs_compiled_code_as_written():
    """The reference engine generates inside ``eager_layers``: a compiled function is not traced there."""
    from grape_lightning.models.compile import eager_layers

    def refusing_backend(graph, example_inputs):
        raise AssertionError("traced inside eager_layers")

    double = torch.compile(lambda x: 2 * x, backend=refusing_backend)
    with eager_layers():
        assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
