"""Every tokenizer the library builds or ships reloads, through ``AutoTokenizer`` and through the
library's loader, to one that encodes and decodes exactly as the one the model was trained with;
a model that does not fit its tokenizer is refused."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from grape_lightning.data.char_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_char_tokenizer
from grape_lightning.models import ModelSpec
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.tokenizer_check import check_model_fits_tokenizer, save_tokenizer, tokenizer_differences
from grape_lightning.rewards import RewardModelScore
from grape_lightning.rewards.critics import JudgeRequest, LocalLMCritic
from tests.conftest import TINY_CONFIG, tiny_spec

TEXTS = [
    "max 37 81 12 55 =",
    "  lead, trail and  double  spaces  ",
    "line one\n\nline three\n",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " ".join(SPECIAL_TOKENS) + " x</s>y<s>",
    *SPECIAL_TOKENS,
]


def assert_same_tokenizer(expected, actual):
    """Ids (with and without special tokens) and decoding of every text, special tokens, size."""
    for text in TEXTS:
        ids = expected(text)["input_ids"]
        assert actual(text)["input_ids"] == ids, text
        assert actual(text, add_special_tokens=True)["input_ids"] == expected(text, add_special_tokens=True)["input_ids"]
        assert actual.decode(ids) == expected.decode(ids) == text
    for role in ("pad", "bos", "eos", "unk"):
        assert getattr(actual, f"{role}_token_id") == getattr(expected, f"{role}_token_id"), role
    assert len(actual) == len(expected)
    assert tokenizer_differences(expected, actual) == []


def save_model_with(tokenizer, directory, model_type="qwen2"):
    """A tiny model of ``model_type`` saved with ``tokenizer``, as an export writes it."""
    fields = {**TINY_CONFIG, "model_type": model_type, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(**fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return str(directory)


def previous_char_tokenizer():
    """The character tokenizer as it was saved before: a WordLevel vocabulary with " " as a token,
    which transformers rebuilds as a Qwen2 byte-level tokenizer that drops every space."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(chr(c) for c in range(32, 127)) + ("\n",))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="right", clean_up_tokenization_spaces=False,
    )


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE])
def test_char_tokenizer_saved_with_a_model_reloads_identically(tmp_path, model_type, chat_template):
    tokenizer = build_char_tokenizer(chat_template=chat_template)
    directory = save_model_with(tokenizer, tmp_path, model_type)
    for reloaded in (AutoTokenizer.from_pretrained(directory), load_tokenizer(directory)):
        assert_same_tokenizer(tokenizer, reloaded)
        assert reloaded.padding_side == "right"
        assert reloaded.chat_template == chat_template


@pytest.mark.parametrize("name", ["grape/tiny-addition-sft", "grape/tiny-addition-rm", "grape/tiny-word_problem-sft", "grape/tiny-sort-sft"])
def test_shipped_models_reload_the_char_tokenizer_they_were_trained_with(name):
    from grape_lightning.models.loading import resolve_name

    for reloaded in (AutoTokenizer.from_pretrained(resolve_name(name)), load_tokenizer(name)):
        assert_same_tokenizer(build_char_tokenizer(), reloaded)
    assert load_tokenizer(name)("max 1 =")["input_ids"] == [81, 69, 92, 4, 21, 4, 33]


def test_char_tokenizer_keeps_the_ids_the_shipped_models_were_trained_with():
    tokenizer = build_char_tokenizer()
    # ids 0-3 special, then printable ASCII from " " (4) to "~" (98), then "\n" (99)
    assert tokenizer("max 1 =\n")["input_ids"] == [81, 69, 92, 4, 21, 4, 33, 99]
    assert tokenizer("".join(chr(c) for c in range(32, 127)))["input_ids"] == list(range(4, 99))


def test_library_loader_reads_an_older_export_as_saved_and_warns(tmp_path):
    old = previous_char_tokenizer()
    config = AutoConfig.for_model(**{**TINY_CONFIG, "vocab_size": len(old), "eos_token_id": 2})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    old.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("max 1 =")["input_ids"] == [81, 69, 92, 21, 33]  # the fault
    with pytest.warns(UserWarning, match="differs from its tokenizer.json"):
        reloaded = load_tokenizer(str(tmp_path))
    assert_same_tokenizer(old, reloaded)


def test_export_warns_when_auto_tokenizer_would_reload_another_tokenizer(tmp_path):
    with pytest.warns(UserWarning, match="does not reload the tokenizer"):
        save_model_with(previous_char_tokenizer(), tmp_path)


def test_export_of_a_trained_module_round_trips(tmp_path):
    from grape_lightning.algorithms import SFTModule

    module = SFTModule(tiny_spec())
    module.export_hf(tmp_path)
    assert_same_tokenizer(module.tokenizer, AutoTokenizer.from_pretrained(tmp_path))
    spec = ModelSpec(name_or_path=str(tmp_path))
    tokenizer = load_tokenizer(spec)
    assert_same_tokenizer(module.tokenizer, tokenizer)
    reloaded = load_causal_lm(spec, tokenizer)
    ids = torch.tensor([tokenizer("max 1 =")["input_ids"]])
    torch.testing.assert_close(reloaded(ids).logits, module.policy.eval()(ids).logits)


def test_a_model_too_small_for_its_tokenizer_is_refused(tmp_path):
    tokenizer = build_char_tokenizer()
    config = AutoConfig.for_model(**{**TINY_CONFIG, "vocab_size": 50, "eos_token_id": 2})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="100 tokens but the model's embedding only 50 rows"):
        check_model_fits_tokenizer(model, tokenizer, "tiny", same_source=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit its tokenizer"):
        load_causal_lm(ModelSpec(name_or_path=str(tmp_path)), load_tokenizer(str(tmp_path)))


def test_a_model_whose_end_of_sequence_token_is_not_the_tokenizers_is_refused(tmp_path):
    tokenizer = build_char_tokenizer()
    config = AutoConfig.for_model(**{**TINY_CONFIG, "vocab_size": len(tokenizer), "eos_token_id": 7})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    spec = ModelSpec(name_or_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"end-of-sequence token '</s>' has id 2, the model's config says \[7\]"):
        load_causal_lm(spec, load_tokenizer(spec))
    # a tokenizer chosen separately is the user's decision: no check against the config's EOS
    load_causal_lm(ModelSpec(name_or_path=str(tmp_path), tokenizer="grape/char"), tokenizer)


def test_reward_model_and_critic_accept_a_tokenizer(tmp_path):
    reward = RewardModelScore("grape/tiny-addition-rm", tokenizer="grape/char", device="cpu")
    default = RewardModelScore("grape/tiny-addition-rm", device="cpu")
    prompts, responses = ["12 + 30 =", "1+1="], ["42", "2"]
    assert reward(prompts, responses, [{}, {}]) == pytest.approx(default(prompts, responses, [{}, {}]))
    assert reward.tokenizer("a b")["input_ids"] == [69, 4, 70]

    directory = tmp_path / "critic"
    tokenizer = build_char_tokenizer()
    model = load_causal_lm(tiny_spec(), tokenizer)
    model.save_pretrained(directory)  # weights only: the critic is told its tokenizer
    critic = LocalLMCritic(str(directory), tokenizer="grape/char", device="cpu")
    judgement = critic.judge([JudgeRequest("1 + 2 =", "3", "correct", "Is the sum right?", "3")])[0]
    assert judgement is not None and 0.0 <= judgement.score <= 1.0
    assert critic.tokenizer("a b")["input_ids"] == [69, 4, 70]
    # " yes" and " no" both start with " ": that token counts for neither side
    assert (critic.yes_ids, critic.no_ids) == ([tokenizer("Y")["input_ids"][0], tokenizer("y")["input_ids"][0]],
                                               [tokenizer("N")["input_ids"][0], tokenizer("n")["input_ids"][0]])
