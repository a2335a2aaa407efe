"""A local Hugging Face causal LM as critic: score and confidence from its own yes/no probabilities."""

from __future__ import annotations

import torch

from grape_lightning.data.collate import pad_left
from grape_lightning.data.formatting import encode_prompt, uses_chat_template
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import positions_from_mask
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.critics.base import Critic, Judgement, JudgeRequest, judging_text


class LocalLMCritic(Critic):
    """Asks a causal LM "<criterion, prompt, response> ... Answer yes or no:" and reads the
    next-token distribution. With P(yes) and P(no) the probabilities of the first token of the
    ``yes_words`` and ``no_words`` (summed over the variants):

        score      s = P(yes) / (P(yes) + P(no))
        confidence c = |P(yes) - P(no)|

    so c is high only when the critic both answers in the expected form (little mass elsewhere)
    and leans clearly one way; a 50/50 or off-format critic gets c near 0 and its item loses
    influence in GRAPE's aggregation. The critique names the two probabilities.

    Args:
        model: directory, hub id or ``grape/<name>`` of the judging causal LM.
        tokenizer: any tokenizer spec a policy accepts (``"grape/char"`` included); None: the model's own.
        yes_words: spellings whose first token counts as "yes".
        no_words: spellings whose first token counts as "no".
        batch_size: requests judged per forward pass.
        device: ``auto`` (the current CUDA device, else CPU), ``cpu`` or ``cuda:N``.
        chat_template: None: use the tokenizer's chat template if it has one; True: require one; False:
            plain text.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        yes_words: tuple[str, ...] = ("yes", "Yes", " yes", " Yes"),
        no_words: tuple[str, ...] = ("no", "No", " no", " No"),
        batch_size: int = 32,
        device: str = "auto",
        chat_template: bool | None = None,
    ) -> None:
        self.model_name = model
        self.tokenizer_name = tokenizer
        self.yes_words, self.no_words = yes_words, no_words
        self.batch_size = batch_size
        self.device = device
        self.chat_template_choice = chat_template
        self._model: torch.nn.Module | None = None

    def _first_token_ids(self, words: tuple[str, ...]) -> list[int]:
        ids = {self.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in words}
        return sorted(ids)

    def _load(self) -> None:
        spec = ModelSpec(name_or_path=self.model_name, tokenizer=self.tokenizer_name)
        self.tokenizer = load_tokenizer(spec)
        self.chat_template = uses_chat_template(self.tokenizer, self.chat_template_choice)
        device = self.device
        if device == "auto":
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self._model = load_causal_lm(spec, self.tokenizer).to(device).eval().requires_grad_(False)
        yes_ids, no_ids = self._first_token_ids(self.yes_words), self._first_token_ids(self.no_words)
        # A first token both sides share (" " of " yes" and " no" under a character tokenizer)
        # tells them apart no more than any other token: it counts for neither.
        shared = set(yes_ids) & set(no_ids)
        self.yes_ids, self.no_ids = [i for i in yes_ids if i not in shared], [i for i in no_ids if i not in shared]
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"every first token of the yes or the no words is shared by the other side for {self.model_name!r}")

    def prompt(self, request: JudgeRequest) -> str:
        return judging_text(request) + "\nDoes the response meet the criterion? Answer yes or no:"

    @torch.no_grad()
    def judge(self, requests: list[JudgeRequest]) -> list[Judgement | None]:
        if self._model is None:
            self._load()
        assert self._model is not None
        device = next(self._model.parameters()).device
        judgements: list[Judgement | None] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            ids = [encode_prompt(self.tokenizer, self.prompt(r), self.chat_template) for r in chunk]
            input_ids = pad_left(ids, self.tokenizer.pad_token_id).to(device)
            mask = pad_left([[1] * len(i) for i in ids], 0).to(device)
            logits = self._model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
            probs = torch.softmax(logits.float(), dim=-1)
            p_yes, p_no = probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)
            for yes, no in zip(p_yes.tolist(), p_no.tolist()):
                total = yes + no
                if total <= 0:
                    judgements.append(None)
                    continue
                judgements.append(Judgement(score=yes / total, confidence=abs(yes - no), critique=f"P(yes)={yes:.3f} P(no)={no:.3f}"))
        return judgements
