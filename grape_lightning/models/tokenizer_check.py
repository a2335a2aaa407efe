"""Whether two tokenizers encode and decode alike, and whether a model fits its tokenizer.

A saved tokenizer can reload as a different one: transformers picks the class from the model
type for some architectures and rebuilds the pipeline from the vocabulary, and a model trained
with one tokenization then silently reads another. These checks compare behaviour (ids of
probe texts, their decoding, the special tokens) rather than files, so they catch any such
drift whatever its cause.
"""

from __future__ import annotations

import string
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SPECIAL_ROLES = ("pad", "bos", "eos", "unk")

PROBE_TEXTS = (
    "max 37 81 12 55 =",
    "  two leading spaces, two  inner and a trailing one ",
    "line one\n\nline three\n",
    string.digits + string.ascii_letters + string.punctuation + " \n",
    "17+5=22",
)


def probe_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts with spaces, newlines, punctuation and every special token of ``tokenizer``."""
    specials = [token for token in tokenizer.all_special_tokens if token]
    return [*PROBE_TEXTS, "".join(f"a {token} b" for token in specials), *specials]


def tokenizer_differences(
    expected: PreTrainedTokenizerBase, actual: PreTrainedTokenizerBase, texts: list[str] | None = None
) -> list[str]:
    """How ``actual`` differs from ``expected`` (empty when they agree): the ids of each probe text
    (with and without special tokens), the decoding of ``expected``'s ids, the special tokens and
    the number of tokens."""
    differences = []
    for role in SPECIAL_ROLES:
        pair = [(getattr(t, f"{role}_token"), getattr(t, f"{role}_token_id")) for t in (expected, actual)]
        if pair[0] != pair[1]:
            differences.append(f"{role} token {pair[0]} became {pair[1]}")
    if len(expected) != len(actual):
        differences.append(f"{len(expected)} tokens became {len(actual)}")
    for text in texts if texts is not None else probe_texts(expected):
        for add_special_tokens in (False, True):
            ids = expected(text, add_special_tokens=add_special_tokens)["input_ids"]
            reloaded = actual(text, add_special_tokens=add_special_tokens)["input_ids"]
            if ids != reloaded:
                differences.append(f"{text!r} encodes as {reloaded} instead of {ids}")
                break
        ids = expected(text, add_special_tokens=False)["input_ids"]
        if expected.decode(ids) != actual.decode(ids):
            differences.append(f"{ids} decodes as {actual.decode(ids)!r} instead of {expected.decode(ids)!r}")
    return differences


def check_model_fits_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, same_source: bool) -> None:
    """Refuse a model whose embedding cannot hold the tokenizer's ids, and (``same_source``: model
    and tokenizer saved together) one whose configured end-of-sequence token is not the
    tokenizer's, with the numbers; either would train or decode on the wrong tokens."""
    rows = model.get_input_embeddings().num_embeddings
    problems = []
    if len(tokenizer) > rows:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows")
    for role in SPECIAL_ROLES:
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None and token_id >= rows:
            problems.append(f"the {role} token id {token_id} is outside the model's {rows} embedding rows")
    configured = getattr(model.config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    if same_source and configured and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in configured:
        problems.append(
            f"the tokenizer's end-of-sequence token {tokenizer.eos_token!r} has id {tokenizer.eos_token_id}, "
            f"the model's config says {configured}"
        )
    if problems:
        raise ValueError(f"model {name!r} does not fit its tokenizer: " + "; ".join(problems))


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """``tokenizer.save_pretrained(directory)``, then reload the directory (model config included)
    with ``AutoTokenizer`` as a user would and warn, naming the first difference, if it no longer
    encodes or decodes as ``tokenizer``. (The library's own loader falls back to the saved
    ``tokenizer.json`` in that case; other code would silently see other tokens.)"""
    tokenizer.save_pretrained(directory)
    try:
        reloaded = AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # a tokenizer with remote code, say: the export stands, unchecked
        rank_zero_warn(f"AutoTokenizer.from_pretrained({str(directory)!r}) failed, the saved tokenizer is unchecked: {error}")
        return
    differences = tokenizer_differences(tokenizer, reloaded)
    if differences:
        rank_zero_warn(
            f"AutoTokenizer.from_pretrained({str(directory)!r}) does not reload the tokenizer the model was "
            f"trained with ({len(differences)} differences; first: {differences[0]}); load it with "
            "grape_lightning.models.loading.load_tokenizer or PreTrainedTokenizerFast.from_pretrained"
        )
