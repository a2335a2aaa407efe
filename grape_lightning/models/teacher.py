"""A frozen teacher: another causal LM that scores the tokens a student samples."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.tokenizer_check import tokenizer_differences


def load_teacher(spec: ModelSpec, student_tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The causal LM of ``spec`` in eval mode with gradients off, after checking that its tokenizer
    encodes and decodes as the student's: the teacher scores the student's token ids, which mean
    the same text to both only then. (Its vocabulary may have more rows, padding, than the
    tokenizer: only the sampled tokens' log-probs are read.)"""
    if spec.lora is not None:
        raise ValueError("the teacher is not trained: drop 'lora' from its spec")
    source = spec.name_or_path if spec.name_or_path is not None else f"<config> with tokenizer {spec.tokenizer!r}"
    differences = tokenizer_differences(student_tokenizer, load_tokenizer(spec))
    if differences:
        shown = "; ".join(differences[:3])
        raise ValueError(
            f"teacher {source!r} does not share the student's tokenizer ({len(differences)} differences; {shown}): "
            "on-policy distillation scores the student's token ids with the teacher, so both must tokenize alike"
        )
    teacher = load_causal_lm(spec, student_tokenizer)
    teacher.config.use_cache = False  # it only scores whole sequences
    return teacher.requires_grad_(False).eval()
