from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import TokenLogprobs, response_logprobs
from grape_lightning.models.policy_mixin import PolicyModelsMixin
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.value import ValueHead, ValueModel

__all__ = [
    "ModelSpec", "PolicyModelsMixin", "TokenLogprobs", "ValueHead", "ValueModel",
    "load_causal_lm", "load_tokenizer", "response_logprobs",
]
