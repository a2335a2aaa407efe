"""Off-policy members of a sample set: responses added to a prompt's samples (GRAPE).

Collection (:class:`~grape_lightning.rollout.collector.RolloutCollector`) asks an
:class:`OffPolicyResponses` for the texts of each prompt and appends them to the generation as
rows of their own, flagged ``off_policy`` on the :class:`~grape_lightning.rollout.batch.Rollout`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from grape_lightning.data.collate import pad_right
from grape_lightning.rollout.engine import Generation

OffPolicyTreatment = Literal["positive_only", "all", "baseline_only"]


@dataclass
class OffPolicyConfig:
    """Responses added to each prompt's sample set besides the policy's own samples.

    - ``reference_answers``: the dataset's reference answer (``metadata[answer_key]``);
    - ``responses_file``: JSONL rows ``{"prompt": ..., "response": ...}`` (outputs of another model
      or an earlier checkpoint); every row whose prompt matches is added.

    They are scored like the samples and always count in the baseline. In the update each enters
    the clipped surrogate according to ``treatment``:

    - ``positive_only`` (default): only with an advantage > 0: learn from off-policy answers that
      beat the policy's average, never push down an answer the policy did not produce;
    - ``all``: always;
    - ``baseline_only``: never (they only shape the baseline).

    Their ratio and its bias. An off-policy response y comes from a behaviour policy mu (the
    dataset, another model) whose probabilities are unknown, so no sampler log-probs exist for it
    (stored as NaN) and its ratio is formed against pi_old: rho_t = pi_theta(y_t) / pi_old(y_t),
    pi_old's log-probs computed by a forward pass (rho = 1 at the first step, as for the samples).
    Its surrogate gradient is A grad log pi_theta(y) (within the clip range): the row counts as if
    pi_old had sampled it, without the importance weight pi_old(y) / mu(y) that would make it an
    unbiased term of the policy gradient. The update is thus biased towards the off-policy
    answers by how often they are added, not how likely pi_old is to produce them: with
    ``positive_only`` it is advantage-weighted supervised learning on the answers that beat the
    set. The clip bounds pi_theta / pi_old, not pi_theta / mu: it limits how far one rollout moves
    pi on those tokens, however unlikely pi_old found them.

    With beta > 0 their tokens also carry the KL term in the loss. There it is no estimate of
    KL(pi || ref) (pi did not sample them) but a per-token penalty, 0 with 0 gradient where
    l = l_ref, that keeps pi's log-probs of those tokens near the reference's; ``train/kl``
    leaves them out and averages the policy's own samples only.

    Args:
        reference_answers: add the dataset's reference answer to each sample set.
        answer_key: metadata field that holds the reference answer.
        responses_file: JSONL of ``{"prompt", "response"}`` rows added to the sample sets of matching
            prompts.
        treatment: how off-policy members enter the update: ``positive_only``, ``all`` or
            ``baseline_only``.
    """

    reference_answers: bool = False
    answer_key: str = "answer"
    responses_file: str | None = None
    treatment: OffPolicyTreatment = "positive_only"


def read_responses_file(path: str) -> dict[str, list[str]]:
    by_prompt: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, response = row["prompt"], row["response"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected {{'prompt': str, 'response': str}} ({error})") from error
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{path}:{number}: fields 'prompt' and 'response' must be strings")
        by_prompt.setdefault(prompt, []).append(response)
    return by_prompt


class OffPolicyResponses:
    """The off-policy texts of each prompt, as :class:`OffPolicyConfig` says (the file is read once).

    Args:
        config: which responses to add.
    """

    def __init__(self, config: OffPolicyConfig) -> None:
        self.config = config
        self.by_prompt = read_responses_file(config.responses_file) if config.responses_file else {}

    def __bool__(self) -> bool:
        return self.config.reference_answers or bool(self.by_prompt)

    def texts(self, prompt: str, metadata: dict[str, Any]) -> list[str]:
        texts = list(self.by_prompt.get(prompt, []))
        if self.config.reference_answers and metadata.get(self.config.answer_key) is not None:
            texts.append(str(metadata[self.config.answer_key]))
        return texts


def append_off_policy(
    generation: Generation, batch: dict[str, Any], source: OffPolicyResponses, tokenizer: Any
) -> tuple[Generation, dict[str, Any]]:
    """The generation and prompt batch with each group's off-policy texts appended as rows (the
    group's prompt, the text as response, EOS-terminated); the batch gains ``off_policy`` [N] bool."""
    first_rows: dict[int, int] = {}
    for row, group in enumerate(batch["groups"].tolist()):
        first_rows.setdefault(group, row)
    extra_rows, extra_responses = [], []
    for row in first_rows.values():
        for text in source.texts(batch["prompts"][row], batch["metadata"][row]):
            extra_rows.append(row)
            extra_responses.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    off_policy = torch.zeros(len(batch["prompts"]) + len(extra_rows), dtype=torch.bool)
    off_policy[len(batch["prompts"]):] = True
    if not extra_rows:
        return generation, {**batch, "off_policy": off_policy}
    width = generation.prompt_width
    rows = torch.tensor(extra_rows, device=generation.input_ids.device)
    responses = pad_right(extra_responses, tokenizer.pad_token_id).to(generation.input_ids.device)
    response_mask = pad_right([[1] * len(r) for r in extra_responses], 0, dtype=torch.bool).to(responses.device)
    total = max(generation.input_ids.shape[1], width + responses.shape[1])

    def widen(tensor: Tensor, value: float | int | bool) -> Tensor:
        return torch.nn.functional.pad(tensor, (0, total - tensor.shape[1]), value=value)

    extra_ids = torch.cat([generation.input_ids[rows, :width], responses], dim=1)
    extra_attention = torch.cat([generation.attention_mask[rows, :width], response_mask.long()], dim=1)
    extra_response_mask = torch.cat([torch.zeros_like(response_mask[:, :0]).new_zeros(len(rows), width), response_mask], dim=1)
    pad = tokenizer.pad_token_id
    # no sampler produced these responses: their sampling log-probs do not exist
    missing_logprobs = torch.where(widen(extra_response_mask, False), float("nan"), 0.0).to(generation.logprobs.dtype)
    extended = Generation(
        input_ids=torch.cat([widen(generation.input_ids, pad), widen(extra_ids, pad)]),
        attention_mask=torch.cat([widen(generation.attention_mask, 0), widen(extra_attention, 0)]),
        response_mask=torch.cat([widen(generation.response_mask, False), widen(extra_response_mask, False)]),
        logprobs=torch.cat([widen(generation.logprobs, 0.0), missing_logprobs]),
        prompt_width=width,
        finished=torch.cat([generation.finished, torch.ones(len(rows), dtype=torch.bool, device=rows.device)]),
    )
    extended_batch = {
        **batch,
        "prompts": batch["prompts"] + [batch["prompts"][r] for r in extra_rows],
        "metadata": batch["metadata"] + [batch["metadata"][r] for r in extra_rows],
        "groups": torch.cat([batch["groups"], batch["groups"][rows.cpu()]]),
        "off_policy": off_policy,
    }
    return extended, extended_batch
