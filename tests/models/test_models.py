"""Model mixin: loading paths, frozen reference kept out of checkpoints, value models on its policy."""

import lightning as L
import pytest
import torch

from grape_lightning.algorithms.value_function import build_value_model
from grape_lightning.models import ModelSpec, PolicyModelsMixin, load_causal_lm, load_tokenizer
from tests.conftest import TINY_CONFIG, tiny_spec


class Holder(PolicyModelsMixin, L.LightningModule):
    def __init__(self, spec, **kwargs):
        super().__init__()
        self.build_models(spec, **kwargs)


def test_spec_validation():
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec()
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(name_or_path="x", config=dict(TINY_CONFIG))
    with pytest.raises(ValueError, match="model_type"):
        ModelSpec(config={"hidden_size": 8}, tokenizer="grape/char")
    with pytest.raises(ValueError, match="tokenizer"):
        ModelSpec(config=dict(TINY_CONFIG))


def test_from_config_is_seeded_and_fits_tokenizer():
    tokenizer = load_tokenizer(tiny_spec())
    first, second = load_causal_lm(tiny_spec(), tokenizer), load_causal_lm(tiny_spec(), tokenizer)
    other = load_causal_lm(tiny_spec(init_seed=1), tokenizer)
    assert first.config.vocab_size == len(tokenizer)
    assert first.config.pad_token_id == tokenizer.pad_token_id == 0
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))


def test_local_directory_loads_through_from_pretrained(tmp_path):
    """A saved directory goes through the same from_pretrained path as a hub id."""
    holder = Holder(tiny_spec())
    holder.export_hf(tmp_path / "model")
    reloaded = Holder(ModelSpec(name_or_path=str(tmp_path / "model")))
    ids = torch.randint(4, 90, (2, 9))
    torch.testing.assert_close(reloaded.policy(ids).logits, holder.policy(ids).logits, rtol=0, atol=0)
    assert reloaded.tokenizer("3+4=")["input_ids"] == holder.tokenizer("3+4=")["input_ids"]


def test_reference_is_frozen_and_not_checkpointed():
    holder = Holder(tiny_spec(), reference=True)
    holder.train()
    assert not holder.reference.training
    assert all(not p.requires_grad for p in holder.reference.parameters())
    state = holder.state_dict()
    assert state and not any(key.startswith("reference.") for key in state)
    # Loading a checkpoint without reference keys stays strict for every other key.
    with torch.no_grad():
        for parameter in holder.policy.parameters():
            parameter.add_(1.0)
    fresh = Holder(tiny_spec(), reference=True)
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.policy.parameters(), holder.policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(fresh.reference.parameters(), holder.reference.parameters()))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if "lm_head" not in k}, strict=True)


def test_reference_logprobs_carry_no_graph():
    holder = Holder(tiny_spec(), reference=True)
    batch = {"input_ids": torch.randint(4, 90, (2, 7)), "response_mask": torch.ones(2, 7, dtype=torch.bool)}
    assert not holder.reference_logprobs(batch).requires_grad
    assert holder.policy_logprobs(batch).logprobs.requires_grad


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_value_models(kind):
    holder = Holder(tiny_spec())
    assert holder.value_model is None
    holder.value_model = build_value_model(holder.policy, holder.tokenizer, kind)
    ids = torch.randint(4, 90, (3, 8))
    values = holder.value_model(ids, torch.ones_like(ids))
    assert values.shape == (3, 8)
    values.sum().backward()
    assert (holder.value_model.trunk is holder.policy.base_model) == (kind == "head")
    policy_embedding_grad = holder.policy.base_model.embed_tokens.weight.grad
    assert (policy_embedding_grad is not None) == (kind == "head")
