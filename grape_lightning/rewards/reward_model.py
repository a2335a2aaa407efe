"""A trained reward model as a reward function."""

from __future__ import annotations

from typing import Any

import torch

from grape_lightning.data.collate import collate_prompt_completion
from grape_lightning.data.formatting import encode_completion, uses_chat_template
from grape_lightning.models.loading import load_sequence_scorer, load_tokenizer
from grape_lightning.models.scores import last_token_scores
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction


class RewardModelScore(RewardFunction):
    """r(x, y) of a Bradley-Terry reward model saved in Hugging Face format (for example by
    ``configs/reward_model.yaml``), in the same prompt/response format it was trained on.

    ``path`` is a directory, a hub id or ``grape/<name>``; ``tokenizer`` (default: the model's) is
    any tokenizer spec a policy accepts, ``"grape/char"`` included. The model loads on first use, onto the
    current CUDA device when there is one (``device="auto"``), and scores ``batch_size`` responses
    at a time with gradients off.

    Args:
        path: directory, hub id or ``grape/<name>`` of a saved sequence-classification reward model.
        tokenizer: any tokenizer spec a policy accepts (``"grape/char"`` included); None: the model's own.
        batch_size: responses scored per forward pass.
        device: ``auto`` (the current CUDA device, else CPU), ``cpu`` or ``cuda:N``.
        chat_template: None: use the tokenizer's chat template if it has one; True: require one; False:
            plain text.
        max_length: truncate prompt plus response to this many tokens (None: no limit).
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        batch_size: int = 64,
        device: str = "auto",
        chat_template: bool | None = None,
        max_length: int | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, name or "reward_model")
        self.path = path
        self.tokenizer_name = tokenizer
        self.batch_size = batch_size
        self.device = device
        self.chat_template_choice = chat_template
        self.max_length = max_length
        self._model: torch.nn.Module | None = None

    def _load(self) -> None:
        spec = ModelSpec(name_or_path=self.path, tokenizer=self.tokenizer_name)
        self.tokenizer = load_tokenizer(spec)
        self.chat_template = uses_chat_template(self.tokenizer, self.chat_template_choice)
        device = self.device
        if device == "auto":
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self._model = load_sequence_scorer(spec, self.tokenizer).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float | None]:
        if self._model is None:
            self._load()
        assert self._model is not None
        device = next(self._model.parameters()).device
        scores: list[float | None] = []
        for start in range(0, len(responses), self.batch_size):
            rows = [
                encode_completion(self.tokenizer, prompt, response, self.chat_template)
                for prompt, response in zip(prompts[start : start + self.batch_size], responses[start : start + self.batch_size])
            ]
            if self.max_length is not None:
                rows = [(p, c[: max(1, self.max_length - len(p))]) for p, c in rows]
            batch = collate_prompt_completion(rows, self.tokenizer.pad_token_id)
            values = last_token_scores(self._model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            scores += [float(v) for v in values.float().cpu()]
        return scores
