"""A character-level tokenizer for tiny models, built offline as a Hugging Face fast tokenizer.

Tests and quick experiments train small models from scratch on the built-in tasks; a one-id-per-
character vocabulary keeps those models small and their outputs easy to read, and needs nothing
from a model hub. Because it is a regular ``PreTrainedTokenizerFast``, it saves with
``save_pretrained`` and reloads with ``AutoTokenizer.from_pretrained(directory)`` like any other.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
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


def is_char_tokenizer_name(name: object) -> bool:
    """Whether ``name`` is the spec string of the character tokenizer."""
    return name == CHAR_TOKENIZER_NAME


def build_char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The character tokenizer: ids 0-3 are <pad>, <s>, </s>, <unk>, then printable ASCII and "\\n".

    Every character is its own token and nothing is added around the text, so ``tokenizer(text)``
    gives exactly ``len(text)`` ids and ``decode`` returns the text unchanged, spaces and newlines
    included. Characters outside the vocabulary map to <unk>. As with any Hugging Face tokenizer, a
    literal special-token string such as "</s>" in the text encodes as that special token.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # "[\s\S]" rather than ".": the regex engine's "." skips newlines, which would leave a run of
    # them as one unknown piece.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
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
