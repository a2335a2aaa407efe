"""Build tokenizers and causal LMs from a :class:`ModelSpec`, the same way for hub ids and local dirs."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from grape_lightning.assets import builtin_model_path
from grape_lightning.data.char_tokenizer import build_char_tokenizer, is_char_tokenizer_name
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.tokenizer_check import check_model_fits_tokenizer, tokenizer_differences
from grape_lightning.models.varlen_attention import VARLEN_ATTENTION, supports_varlen

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES) + ['auto']}")
    return _DTYPES[name]


def resolve_name(name: str) -> str:
    """A shipped model's directory for ``grape/<name>``; any other hub id or path unchanged."""
    path = builtin_model_path(name)
    return str(path) if path is not None else name


def load_tokenizer(spec: ModelSpec | str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``spec`` with a pad token guaranteed (EOS when the tokenizer has none).

    A directory's tokenizer loads as its ``tokenizer.json`` says, even where ``AutoTokenizer``
    would rebuild it differently (see :func:`as_saved`)."""
    name = spec if isinstance(spec, str) else spec.tokenizer_name
    if is_char_tokenizer_name(name):
        tokenizer = build_char_tokenizer()
    else:
        kwargs = {} if isinstance(spec, str) else {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
        path = resolve_name(name)
        tokenizer = as_saved(AutoTokenizer.from_pretrained(path, **kwargs), path, **kwargs)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def as_saved(tokenizer: PreTrainedTokenizerBase, path: str, **kwargs: object) -> PreTrainedTokenizerBase:
    """``tokenizer`` (from ``AutoTokenizer``) if it encodes and decodes as the directory's
    ``tokenizer.json`` does, else the tokenizer ``tokenizer.json`` describes, with a warning.

    For some model types (``qwen2`` among them) ``AutoTokenizer`` ignores the saved pipeline and
    rebuilds that architecture's own from the vocabulary; a tokenizer of another kind saved with
    such a model (an older export of the character tokenizer, for one) would then lose its spaces.
    """
    if not (Path(path) / "tokenizer.json").is_file():
        return tokenizer
    saved = PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    if type(saved) is type(tokenizer):
        return tokenizer
    differences = tokenizer_differences(saved, tokenizer)
    if not differences:
        return tokenizer
    rank_zero_warn(
        f"AutoTokenizer loads {path} as {type(tokenizer).__name__}, which differs from its tokenizer.json "
        f"(first: {differences[0]}); using the tokenizer as saved. Re-save it (tokenizer.save_pretrained) "
        "with this version of grape_lightning so that AutoTokenizer reloads it faithfully elsewhere."
    )
    return saved


def load_causal_lm(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A causal LM from the hub or a directory, or built from ``spec.config`` with seeded random weights.

    With no ``attn_implementation`` in the spec and a CUDA device present, a model whose layers
    all attend causally over the full sequence gets ``sdpa_varlen``
    (:mod:`grape_lightning.models.varlen_attention`): ``sdpa`` for every call, except that packed
    (padding-free) rows run variable-length flash attention instead of a block-diagonal mask.
    """
    model = _load(AutoModelForCausalLM, spec, tokenizer)
    default_sdpa = spec.attn_implementation is None and model.config._attn_implementation == "sdpa"
    if default_sdpa and torch.cuda.is_available() and supports_varlen(model.config):
        model.set_attn_implementation(VARLEN_ATTENTION)
    return model


def load_sequence_scorer(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A transformer with a scalar head (sequence classification, one label): a reward model.

    From a causal-LM checkpoint (an SFT model, say) the trunk is loaded and the head starts fresh.
    """
    if spec.lora is not None:
        raise ValueError("LoRA applies to policies; a reward or value model trains in full (drop 'lora' from its spec)")
    model = _load(AutoModelForSequenceClassification, spec, tokenizer, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _load(auto_class: type, spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, **overrides: object) -> PreTrainedModel:
    dtype = resolve_dtype(spec.dtype)
    extra = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    if spec.name_or_path is not None:
        model = auto_class.from_pretrained(
            resolve_name(spec.name_or_path),
            dtype=dtype,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            **extra,
            **overrides,
            **spec.from_pretrained_kwargs,
        )
    else:
        config_kwargs = dict(spec.config or {})
        model_type = config_kwargs.pop("model_type")
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        for token in ("pad", "bos", "eos"):
            config_kwargs.setdefault(f"{token}_token_id", getattr(tokenizer, f"{token}_token_id"))
        config = AutoConfig.for_model(model_type, **config_kwargs, **overrides)
        if config.vocab_size < len(tokenizer):
            raise ValueError(f"config vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
        # Seeded without touching the global RNG, so every rank (and every re-run) builds the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = auto_class.from_config(config, dtype=dtype if dtype != "auto" else None, **extra)
    source = spec.name_or_path if spec.name_or_path is not None else "<config>"
    check_model_fits_tokenizer(model, tokenizer, source, same_source=spec.tokenizer in (None, spec.name_or_path))
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
