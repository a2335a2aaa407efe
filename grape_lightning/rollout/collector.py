"""Collection: prompts -> responses -> scores (-> pi_old and reference log-probs), as a Rollout."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.rewards.base import RESPONSE_TOKENS
from grape_lightning.rewards.scorer import Scorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.engine import GenerationEngine
from grape_lightning.rollout.off_policy import OffPolicyResponses, append_off_policy
from grape_lightning.rollout.sampling import SamplingParams

if TYPE_CHECKING:
    from grape_lightning.models.policy_mixin import PolicyModelsMixin


class RolloutCollector:
    """Samples responses with ``engine``, adds the ``off_policy`` members of each sample set (if
    any), scores every response with ``scorer`` and, when asked, computes pi_old's log-probs by a
    training-mode forward (the sampler's may differ in rounding; so the first ratio is exactly 1)
    and the reference's.

    Args:
        engine: the generation engine.
        scorer: scores the responses (reward functions, GRAPE's rubric).
        off_policy: responses added to each sample set besides the policy's samples (None: none).
        micro_batch_size: sequences per forward of the log-prob passes.
        logprob_chunk_size: response tokens per chunk of the LM-head log-prob computation.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        scorer: Scorer,
        off_policy: OffPolicyResponses | None = None,
        micro_batch_size: int = 64,
        logprob_chunk_size: int = 1024,
    ) -> None:
        self.engine = engine
        self.scorer = scorer
        self.off_policy = off_policy
        self.micro_batch_size = micro_batch_size
        self.logprob_chunk_size = logprob_chunk_size

    def __call__(
        self,
        models: PolicyModelsMixin,
        batch: dict[str, Any],
        sampling: SamplingParams,
        generator: torch.Generator | None,
        old_logprobs: bool = False,
        reference: bool = False,
    ) -> Rollout:
        rollout = self.sample(models, batch, sampling, generator)
        return self.add_logprobs(models, rollout, sampling, old_logprobs=old_logprobs, reference=reference)

    def sample(
        self, models: PolicyModelsMixin, batch: dict[str, Any], sampling: SamplingParams, generator: torch.Generator | None
    ) -> Rollout:
        """Generate and score: the rollout without pi_old's or the reference's log-probs.

        Each response's metadata is the prompt's, plus ``response_tokens``: the number of tokens
        the policy generated for it (EOS included), which a reward on the response's length in
        tokens reads (:class:`~grape_lightning.rewards.overlong.OverlongPunishment`)."""
        policy = models.policy
        was_training = policy.training
        policy.eval()
        start = time.perf_counter()
        with models.generation_context() as model:
            generation = self.engine.generate(model, batch["prompt_ids"], sampling, generator)
        if generation.input_ids.device.type == "cuda":
            torch.cuda.synchronize(generation.input_ids.device)
        generation_seconds = time.perf_counter() - start
        self.engine.release()  # the KV cache and decode graphs are rebuilt next time; their memory goes to the update
        policy.train(was_training)

        if self.off_policy and not sampling.greedy:
            generation, batch = append_off_policy(generation, batch, self.off_policy, models.tokenizer)
        device = generation.input_ids.device
        responses = models.tokenizer.batch_decode(
            [ids[mask].tolist() for ids, mask in zip(generation.input_ids, generation.response_mask)], skip_special_tokens=True
        )
        metadata = [{**meta, RESPONSE_TOKENS: int(n)} for meta, n in zip(batch["metadata"], generation.response_mask.sum(-1).tolist())]
        groups = batch["groups"].to(device)
        scores = self.scorer(batch["prompts"], responses, metadata, groups)
        return Rollout(
            input_ids=generation.input_ids,
            attention_mask=generation.attention_mask,
            response_mask=generation.response_mask,
            old_logprobs=generation.logprobs,
            sampling_logprobs=generation.logprobs,
            rewards=scores.rewards.to(device),
            valid=scores.valid.to(device),
            groups=groups,
            prompts=batch["prompts"],
            responses=responses,
            metadata=metadata,
            reward_terms=scores.terms,
            reward_confidences=scores.confidences,
            correct=None if scores.correct is None else scores.correct.to(device),
            off_policy=batch.get("off_policy", torch.zeros(len(responses), dtype=torch.bool)).to(device),
            details=scores.details,
            statistics=scores.statistics,
            generation_seconds=generation_seconds,
        )

    def add_logprobs(
        self, models: PolicyModelsMixin, rollout: Rollout, sampling: SamplingParams, old_logprobs: bool = False, reference: bool = False
    ) -> Rollout:
        """``rollout`` with pi_old's log-probs recomputed by a training-mode forward (``old_logprobs``)
        and the reference's (``reference``)."""
        if old_logprobs:
            rollout.old_logprobs = self.logprobs(rollout, models.policy, like=rollout.old_logprobs, temperature=sampling.logprob_temperature)
        if reference:
            rollout.ref_logprobs = models.with_reference(
                lambda model: self.logprobs(rollout, model, like=rollout.old_logprobs, temperature=sampling.logprob_temperature)
            )
        return rollout

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, model: torch.nn.Module, like: Tensor, temperature: float) -> Tensor:
        """Log-probs of the response tokens under ``model``, without a graph, micro-batch by
        micro-batch. (Not inference mode: FSDP2 keeps the parameters it gathers here for later
        calls under autograd, which inference tensors would refuse.)"""
        out = torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))
        for index in torch.arange(len(rollout), device=like.device).split(self.micro_batch_size):
            inputs = rollout.model_inputs(index)
            values = response_logprobs(
                model, inputs["input_ids"], inputs["response_mask"], inputs["attention_mask"],
                temperature=temperature, chunk_size=self.logprob_chunk_size,
            ).logprobs
            out[index, : values.shape[1]] = values
        return out
