"""The offline character tokenizer: exact round trips, fixed ids, save/reload, padding."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from grape_lightning.data.char_tokenizer import (
    CHAR_TOKENIZER_NAME,
    CHAT_TEMPLATE,
    build_char_tokenizer,
    is_char_tokenizer_name,
)

PRINTABLE = [chr(code) for code in range(32, 127)] + ["\n"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _texts() -> list[str]:
    rng = random.Random(0)
    texts = ["", " ", "  lead and trail  ", "a  b   c", "\n", "line one\n\nline  three\n", "17+5=22"]
    for _ in range(200):
        alphabet = PRINTABLE if rng.random() < 0.5 else [" ", "\n", "a", "b"]
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return texts


def test_round_trip_with_one_id_per_character(tokenizer):
    for text in _texts():
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text


def test_literal_special_tokens_in_text_encode_as_special_tokens(tokenizer):
    ids = tokenizer("a</s>")["input_ids"]
    assert ids == [tokenizer("a")["input_ids"][0], tokenizer.eos_token_id]
    assert tokenizer.decode(ids) == "a</s>"


def test_every_vocabulary_character_has_its_own_id(tokenizer):
    ids = tokenizer("".join(PRINTABLE))["input_ids"]
    assert ids == list(range(4, 4 + len(PRINTABLE)))
    assert len(tokenizer) == 4 + len(PRINTABLE)


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 3)
    assert tokenizer.padding_side == "right"
    assert (
        tokenizer("ab", add_special_tokens=True)["input_ids"]
        == tokenizer("ab", add_special_tokens=False)["input_ids"]
    )
    # Outside the vocabulary: no id, as in byte-level tokenizers whose vocabulary lacks the bytes
    assert tokenizer("aé\tb")["input_ids"] == tokenizer("ab")["input_ids"]
    assert tokenizer.decode([1, 4 + ord("a") - 32, 2], skip_special_tokens=True) == "a"


def test_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in _texts()[:50]:
        ids = tokenizer(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids
        assert reloaded.decode(ids) == text
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded.padding_side == "right"


def test_batch_padding_on_the_right_with_pad_id_zero(tokenizer):
    batch = tokenizer(["ab", "abcd", "a"], padding=True)
    a, b = tokenizer("ab")["input_ids"]
    assert batch["input_ids"][0] == [a, b, 0, 0]
    assert batch["input_ids"][2][1:] == [0, 0, 0]
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_chat_template_renders_conversations():
    tokenizer = build_char_tokenizer(chat_template=CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "system: Be brief.\nuser: 2+2=\nassistant: "


def test_name_spec():
    assert is_char_tokenizer_name(CHAR_TOKENIZER_NAME)
    assert not is_char_tokenizer_name("gpt2")
    assert not is_char_tokenizer_name(None)
