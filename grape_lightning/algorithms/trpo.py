"""TRPO: the natural-gradient step of largest surrogate gain inside a KL trust region."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.losses.trpo import mean_token_kl, trpo_surrogate
from grape_lightning.models.logprobs import final_logit_softcap, positions_from_mask
from grape_lightning.models.spec import ModelSpec
from grape_lightning.natural_gradient import (
    all_reduce_mean_,
    assign_,
    backtracking_line_search,
    conjugate_gradient,
    flat_dtype,
    flat_grad,
    hessian_vector_product,
    trust_region_step,
)
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams

# TRPO sets the policy parameters itself: there is no optimizer to configure (see ``configure_optimizers``).
warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")



@dataclass
class ResponseRows:
    """One micro-batch of the update with its response tokens as rows, the layout of the LM head:
    row k is the k-th response token in row-major order of ``response_mask[:, 1:]``."""

    inputs: dict[str, Tensor]
    old_logprobs: Tensor  # [n] l_t_old
    advantages: Tensor  # [n] A_t
    old_hidden: Tensor | None = None  # [n, hidden] the trunk's states at theta_old (pi_old, see TRPOModule)

    def __len__(self) -> int:
        return self.old_logprobs.shape[0]


class TRPOModule(OnPolicyModule):
    """Trust Region Policy Optimization (Schulman et al., 2015) for language models.

    Per rollout batch, with A the advantages (per sequence, broadcast over its tokens, or per token):

        S(theta)   = (1/N) sum_{i,t} rho_it A_it                                    (surrogate)
        KL(theta)  = (1/N) sum_{i,t} KL(pi_old(. | s_it) || pi_theta(. | s_it))      (exact, over the vocabulary)
        g          = grad S(theta_old),   F = Hessian of KL at theta_old (the Fisher information)
        s          ~= (F + lambda I)^-1 g          (``cg_iterations`` of conjugate gradient)
        Delta      = sqrt(2 delta / s^T (F + lambda I) s) * s
        theta_new  = theta_old + alpha Delta,   alpha = factor^k for the first k = 0, 1, ... with
                     KL(theta_new) <= delta and S(theta_new) > S(theta_old); theta_old (exactly) if none.

    N counts the response tokens of the responses with a valid reward. Fisher-vector products are
    Hessian-vector products by double backward (scaled-dot-product attention runs its math kernel
    there, the one kernel with a second derivative); each costs a forward and a double backward over
    the ``fisher_sample_size`` sequences, drawn afresh each update, that estimate F (all of them when
    None). An update costs about ``cg_iterations + 1`` of them, one forward and backward for g and
    one forward per line-search try. Only parameters with ``requires_grad`` move
    (:meth:`trainable_parameters`): freeze layers, or train adapters, and TRPO works in their space.

    The line search measures KL(pi_old || pi_theta) exactly, so it needs pi_old's distribution at
    every response token. Rather than N x V log-probabilities, the update keeps the trunk's last
    hidden states at theta_old (N x hidden) from the gradient pass and applies the LM head with its
    theta_old weights (part of the parameter snapshot the line search needs anyway) chunk by chunk.

    Under DDP each rank samples its own rollout; S, KL, g and every F v are averaged over ranks (so
    each rank's token mean weighs equally, as DDP's gradient mean does), and every rank takes the
    same decisions and the same step.

    One update per rollout batch; ``global_step`` advances by one per update, accepted or not, so
    ``max_steps`` is the number of rollout batches. There is no optimizer (``configure_optimizers``
    returns None); logged per update under ``train/``: ``kl_after_step``, ``surrogate_improvement``
    and ``expected_improvement`` (g . Delta theta) of the step taken (0 when rejected), ``cg_residual``
    (relative), ``cg_iterations``, ``line_search_tries`` and ``accepted`` (share of the updates so
    far that moved the parameters).

    Args:
        advantage: ``group`` (r_i - mean of its group, scaled by ``reward_scaling`` as in GRPO) or
            ``leave_one_out`` (r_i - mean of the other rewards of its group, RLOO).
        max_kl: delta, the bound on the mean token KL.
        damping: lambda, added to F (in the units of F's eigenvalues): keeps the step out of the
            directions where the sampled Fisher is nearly singular. configs/trpo.yaml explains its value.
        cg_iterations: conjugate gradient stops after this many Fisher-vector products ...
        cg_tolerance: ... or at this relative residual ||g - (F + lambda I) s|| / ||g||.
        line_search_factor: the step fractions tried are factor^0 .. factor^(tries - 1) ...
        line_search_tries: ... with this many tries.
        fisher_sample_size: sequences (per rank) over which Fisher-vector products are averaged
            (None: all of the rollout's).
        reward_scaling: divide group advantages by the std of the group (``group``), of the batch
            (``batch``), or not (``none``).
    """

    # The natural-gradient algebra (flat vectors, conjugate gradient, line search) works on whole
    # parameter tensors, and there is no optimizer state for ZeRO to shard.
    updates_sharded_parameters = False

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        advantage: AdvantageConfig | None = None,
        max_kl: float = 0.01,
        damping: float = 0.1,
        cg_iterations: int = 10,
        cg_tolerance: float = 1e-3,
        line_search_factor: float = 0.5,
        line_search_tries: int = 10,
        fisher_sample_size: int | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
    ) -> None:
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(policy, scorer, sampling, None, update, reference=False, seed=seed)
        self.hparams.pop("optimizer", None)  # the base's option TRPO has no use for
        if max_kl <= 0 or damping < 0 or not 0 < line_search_factor < 1 or min(line_search_tries, cg_iterations) < 1:
            raise ValueError(
                "TRPO needs max_kl > 0, damping >= 0, 0 < line_search_factor < 1, "
                "line_search_tries >= 1 and cg_iterations >= 1"
            )
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="mean", scaling="group")
        self.max_kl = max_kl
        self.damping = damping
        self.cg_iterations = cg_iterations
        self.cg_tolerance = cg_tolerance
        self.line_search_factor = line_search_factor
        self.line_search_tries = line_search_tries
        self.fisher_sample_size = fisher_sample_size
        self.register_buffer("accepted_updates", torch.zeros((), dtype=torch.long))

    def configure_optimizers(self) -> None:
        """None: the TRPO step writes the parameters itself (Lightning runs with a placeholder optimizer)."""
        return None

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters TRPO moves: the policy's with ``requires_grad``."""
        return [parameter for parameter in self.policy.parameters() if parameter.requires_grad]

    def advantages(self, rollout: Rollout) -> Tensor:
        """Advantages per sequence [N] (:func:`compute_advantages`)."""
        return compute_advantages(self.advantage, rollout.rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes).advantages

    # -- the policy on response tokens --------------------------------------------------------------
    def response_rows(self, rollout: Rollout, rows: Tensor, advantages: Tensor) -> list[ResponseRows]:
        """The sequences ``rows`` in micro-batches, response tokens as rows."""
        if advantages.dim() == 1:
            advantages = advantages[:, None].expand_as(rollout.response_mask)
        batches = []
        for index in rows.split(self.update_config.micro_batch_size):
            inputs = rollout.model_inputs(index)
            scored = inputs["response_mask"][:, 1:].bool()
            width = scored.shape[1] + 1
            batches.append(ResponseRows(
                inputs=inputs,
                old_logprobs=rollout.old_logprobs[index, 1:width][scored],
                advantages=advantages[index, 1:width][scored],
            ))
        return batches

    def hidden_rows(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(h, y): the trunk's last hidden state before each response token [n, hidden] and the token [n]."""
        attention_mask = inputs["attention_mask"]
        outputs = self.policy.base_model(
            input_ids=inputs["input_ids"], attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask), use_cache=False,
        )
        scored = inputs["response_mask"][:, 1:].bool()
        return outputs.last_hidden_state[:, :-1][scored], inputs["input_ids"][:, 1:][scored]

    def log_distribution(self, hidden: Tensor, head_parameters: dict[str, Tensor] | None = None) -> Tensor:
        """log pi(. | s_t) over the vocabulary [n, V] at the sampling temperature, from hidden rows;
        ``head_parameters`` replaces LM-head weights (pi_old's head)."""
        head = self.policy.get_output_embeddings()
        logits = head(hidden) if head_parameters is None else functional_call(head, head_parameters, (hidden,))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        softcap = final_logit_softcap(self.policy)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits / self.sampling.logprob_temperature, dim=-1)

    def chunked_sum(self, term: Callable[..., Tensor], *rows: Tensor) -> Tensor:
        """sum over chunks of ``logprob_chunk_size`` rows of ``term(*chunk)``, in float64. Under
        autograd each chunk is recomputed in the backward, so no [chunk, V] block is held for it."""
        total = torch.zeros((), dtype=torch.float64, device=rows[0].device)
        for chunk in zip(*(row.split(self.update_config.logprob_chunk_size) for row in rows)):
            if torch.is_grad_enabled():
                total = total + checkpoint(term, *chunk, use_reentrant=False)
            else:
                total = total + term(*chunk)
        return total

    # -- the three quantities of the step ----------------------------------------------------------
    def surrogate_gradient(
        self, batches: list[ResponseRows], parameters: list[Tensor], num_tokens: int
    ) -> tuple[Tensor, Tensor]:
        """(S(theta_old), g) on this rank; keeps each batch's hidden states at theta_old."""
        surrogate = torch.zeros((), dtype=torch.float64, device=self.device)
        gradient = torch.zeros(sum(p.numel() for p in parameters), dtype=flat_dtype(parameters), device=self.device)

        def term(hidden: Tensor, tokens: Tensor, old_logprobs: Tensor, advantages: Tensor) -> Tensor:
            logprobs = self.log_distribution(hidden).gather(-1, tokens[:, None]).squeeze(-1)
            mask = torch.ones_like(tokens, dtype=torch.bool)
            return trpo_surrogate(logprobs, old_logprobs, advantages, mask, num_tokens=num_tokens)[0]

        for batch in batches:
            hidden, tokens = self.hidden_rows(batch.inputs)
            batch.old_hidden = hidden.detach()
            value = self.chunked_sum(term, hidden, tokens, batch.old_logprobs, batch.advantages)
            gradient += flat_grad(value, parameters)
            surrogate += value.detach()
        return surrogate, gradient

    def kl_hessian_vector_product(
        self, batches: list[ResponseRows], parameters: list[Tensor], vector: Tensor
    ) -> Tensor:
        """F v on this rank: the Hessian of the mean token KL(pi_old || pi_theta) at theta = theta_old
        times v, with pi_old = pi_theta held constant (its own detached distribution)."""
        num_tokens = sum(len(batch) for batch in batches)
        product = torch.zeros_like(vector)

        def term(hidden: Tensor) -> Tensor:
            log_distribution = self.log_distribution(hidden)
            mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            return mean_token_kl(log_distribution.detach(), log_distribution, mask, num_tokens=num_tokens)

        with sdpa_kernel(SDPBackend.MATH):
            for batch in batches:
                hidden, _ = self.hidden_rows(batch.inputs)
                product += hessian_vector_product(self.chunked_sum(term, hidden), parameters, vector)
        return product

    @torch.no_grad()
    def kl_and_surrogate(self, batches: list[ResponseRows], old_head: dict[str, Tensor], num_tokens: int) -> Tensor:
        """[KL(pi_old || pi_theta), S(theta)] on this rank at the current parameters."""

        def term(hidden: Tensor, old_hidden: Tensor, tokens: Tensor, old_logprobs: Tensor, advantages: Tensor) -> Tensor:
            log_distribution = self.log_distribution(hidden)
            old_log_distribution = self.log_distribution(old_hidden, old_head)
            mask = torch.ones_like(tokens, dtype=torch.bool)
            kl = mean_token_kl(old_log_distribution, log_distribution, mask, num_tokens=num_tokens)
            logprobs = log_distribution.gather(-1, tokens[:, None]).squeeze(-1)
            surrogate = trpo_surrogate(logprobs, old_logprobs, advantages, mask, num_tokens=num_tokens)[0]
            return torch.stack([kl, surrogate])

        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            hidden, tokens = self.hidden_rows(batch.inputs)
            rows = (hidden, batch.old_hidden, tokens, batch.old_logprobs, batch.advantages)
            totals += self.chunked_sum(term, *rows)
        return totals

    # -- the update ---------------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> None:
        advantages = self.advantages(rollout)
        rows = rollout.valid.nonzero().flatten()
        batches = self.response_rows(rollout, rows, advantages)
        fisher_batches = batches
        if self.fisher_sample_size is not None and rows.numel() > self.fisher_sample_size:
            fisher_rows = self.minibatches(rows, self.fisher_sample_size)[0]  # a random subset
            fisher_batches = self.response_rows(rollout, fisher_rows, advantages)
        num_tokens = sum(len(batch) for batch in batches)
        parameters = self.trainable_parameters()
        if not parameters:
            raise RuntimeError("TRPO has nothing to train: no policy parameter has requires_grad")
        theta_old = [parameter.detach().clone() for parameter in parameters]

        surrogate_old, gradient = self.surrogate_gradient(batches, parameters, num_tokens)
        all_reduce_mean_(surrogate_old)
        all_reduce_mean_(gradient)

        def fisher_vector_product(vector: Tensor) -> Tensor:  # (F + lambda I) v, the same on every rank
            product = all_reduce_mean_(self.kl_hessian_vector_product(fisher_batches, parameters, vector))
            return product + self.damping * vector

        solve = conjugate_gradient(fisher_vector_product, gradient, self.cg_iterations, self.cg_tolerance)
        metrics = {"cg_residual": solve.residual, "cg_iterations": float(solve.iterations)}
        kl_after = improvement = expected = 0.0
        tries = 0
        if bool(gradient.any()):  # else no rank has a valid response with a nonzero advantage: no step
            direction = solve.solution
            full_step = trust_region_step(direction, direction @ fisher_vector_product(direction), self.max_kl)
            # pi_old's LM head: the snapshot of the head parameters that move (the others have not)
            trainable = {id(parameter): old for parameter, old in zip(parameters, theta_old)}
            old_head = {
                name: trainable[id(parameter)]
                for name, parameter in self.policy.get_output_embeddings().named_parameters()
                if id(parameter) in trainable
            }

            def evaluate(fraction: float) -> tuple[float, float]:
                assign_(parameters, theta_old, full_step, fraction)
                kl, surrogate = all_reduce_mean_(self.kl_and_surrogate(batches, old_head, num_tokens)).tolist()
                return kl, surrogate - float(surrogate_old)

            search = backtracking_line_search(evaluate, self.max_kl, self.line_search_factor, self.line_search_tries)
            tries = search.tries
            if search.accepted:
                kl_after, improvement = search.kl, search.improvement
                expected = search.fraction * float(gradient @ full_step)
                self.accepted_updates += 1
            else:
                assign_(parameters, theta_old)
        self.count_update()
        self.log_metrics({
            **metrics,
            "kl_after_step": kl_after,
            "surrogate_improvement": improvement,
            "expected_improvement": expected,
            "line_search_tries": float(tries),
            "accepted": float(self.accepted_updates) / self.global_step,
            "advantage_abs_mean": float(advantages[rollout.valid].abs().mean()) if rows.numel() else 0.0,
        })

    def count_update(self) -> None:
        """Advance ``global_step`` by one.

        Under manual optimisation Lightning's ``global_step`` is the number of completed optimizer
        steps, ``fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed``, which
        ``LightningOptimizer.step`` advances. TRPO has no optimizer step, so it advances that counter
        itself, once per update: ``max_steps``, step-based checkpointing, logging and resuming then
        count TRPO updates.
        """
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
