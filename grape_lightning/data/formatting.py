"""Turning prompts and completions into token ids with an exact prompt/response boundary.

A prompt is plain text or a list of chat messages. With a chat template the prompt is rendered
with the generation prompt appended, and the completion is whatever the template adds after it
for the assistant turn (its end-of-turn marker included), so training sees exactly the tokens the
model must produce at generation time. Without a template the prompt is plain text and the
completion is followed by EOS.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, Any]]
Prompt = str | Messages


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> bool:
    """``None`` means: use the template when the tokenizer has one."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template and not has_template:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return has_template if chat_template is None else chat_template


def _as_messages(prompt: Prompt) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _as_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    # Plain-text fallback for a conversation when no template is used: the turns, one per line.
    return "\n".join(f"{message['role']}: {message['content']}" for message in prompt) + "\nassistant: "


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat_template: bool) -> list[int]:
    """Token ids of the prompt, ready for generation (BOS as the tokenizer adds it)."""
    if chat_template:
        text = tokenizer.apply_chat_template(_as_messages(prompt), tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(_as_text(prompt))["input_ids"]


def encode_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str, chat_template: bool
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) whose concatenation is the full training sequence."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template)
    if chat_template:
        messages = _as_messages(prompt)
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": completion}], tokenize=False
        )
        if full_text.startswith(prompt_text):
            completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
            return prompt_ids, completion_ids
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids
