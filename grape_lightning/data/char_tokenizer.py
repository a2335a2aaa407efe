"""A character-level tokenizer for tiny models, built offline as a Hugging Face fast tokenizer.

Tests and quick experiments train small models from scratch on the built-in tasks; a one-id-per-
character vocabulary keeps those models small and their outputs easy to read, and needs nothing
from a model hub.

It is stored in the byte-level BPE format of GPT-2 and Qwen2 (a vocabulary of byte symbols, here
without merges, so every character stays its own token) because that is the format which
reloads to the same ids whichever class ``AutoTokenizer.from_pretrained`` picks for a saved
model: the generic ``TokenizersBackend`` follows ``tokenizer.json`` as written, but for some
model types (``qwen2`` among them) transformers rebuilds the tokenizer with that model's own
byte-level pipeline from the vocabulary alone, and a plain character vocabulary loses its spaces
there (" " is the byte symbol "Ġ" in a byte-level vocabulary).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAR_TOKENIZER_NAME = "grape/char"
"""The tokenizer spec that asks for this tokenizer instead of a hub id or a local directory."""

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = tuple(chr(code) for code in range(32, 127)) + ("\n",)

# Plain "role: content" lines: a template for conversational prompts, attached on request. The tiny
# models see plain-text prompts by default, which keeps their sequences short.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

# Byte-level pre-tokenization of the whole text as one piece: each byte becomes its printable
# symbol (" " -> "Ġ", "\n" -> "Ċ", printable ASCII unchanged).
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def byte_symbol(character: str) -> str:
    """The byte-level vocabulary symbol of a one-byte character (" " -> "Ġ")."""
    ((symbol, _),) = _BYTE_LEVEL.pre_tokenize_str(character)
    return symbol


def is_char_tokenizer_name(name: object) -> bool:
    """Whether ``name`` is the spec string of the character tokenizer."""
    return name == CHAR_TOKENIZER_NAME


def build_char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The character tokenizer: ids 0-3 are <pad>, <s>, </s>, <unk>, then printable ASCII and "\\n".

    Every character is its own token and nothing is added around the text, so ``tokenizer(text)``
    gives exactly ``len(text)`` ids and ``decode`` returns the text unchanged, spaces and newlines
    included. As with any Hugging Face tokenizer, a literal special-token string such as "</s>" in
    the text encodes as that special token. A character outside the vocabulary (non-ASCII, a tab)
    gets no id, as in every byte-level tokenizer whose vocabulary lacks its bytes; the DataModules
    count and report texts that do not survive encoding.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(map(byte_symbol, CHARACTERS)))}
    # No merges: each byte symbol is a token. No unknown token in the model, as in the byte-level
    # tokenizers transformers rebuilds from this vocabulary, so both encode every text alike.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _BYTE_LEVEL
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
