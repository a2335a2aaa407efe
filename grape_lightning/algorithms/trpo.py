"""TRPO: the natural-gradient step of largest surrogate gain inside a KL trust region."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.trust_region_rows import ResponseRows, chunked_sum, head_weights, hidden_rows
from grape_lightning.algorithms.trust_region_rows import response_rows, row_log_distribution
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.losses.trpo import mean_token_kl, trpo_surrogate
from grape_lightning.models.spec import ModelSpec
from grape_lightning.natural_gradient import LineSearchResult, assign_, backtracking_line_search
from grape_lightning.natural_gradient import conjugate_gradient, flat_dtype, flat_grad, hessian_vector_product
from grape_lightning.natural_gradient import TrustRegionConfig, step_gradients, trust_region_step
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams


class TRPOModule(OnPolicyModule):
    """Trust Region Policy Optimization (Schulman et al., 2015) for language models.

    Per rollout batch, with A the advantages (``advantage``) and N the response tokens of the
    responses with a valid reward:

        S(theta)   = (1/N) sum_{i,t} rho_it A_it                                    (surrogate)
        KL(theta)  = (1/N) sum_{i,t} KL(pi_old(. | s_it) || pi_theta(. | s_it))      (exact, over the vocabulary)
        g          = grad S(theta_old),   F = Hessian of KL at theta_old (the Fisher information)
        s          ~= (F + lambda I)^-1 g          (``cg_iterations`` of conjugate gradient)
        Delta      = sqrt(2 delta / s^T (F + lambda I) s) * s
        theta_new  = theta_old + alpha Delta,   alpha = factor^k for the first k = 0, 1, ... with
                     KL(theta_new) <= delta and S(theta_new) > S(theta_old); theta_old (exactly) if none.

    F v is a Hessian-vector product by double backward (attention on its math kernel, the one with
    a second derivative) over ``trust_region.fisher_sample_size`` sequences drawn afresh each update; the line
    search measures KL exactly from the trunk's states at theta_old and pi_old's LM-head weights.
    Only parameters with ``requires_grad`` move. Under DDP, S, KL, g and every F v are token means over
    every rank's tokens (each rank's sum over its own, added up): every rank takes the same step,
    one SGD step (lr 1, gradient -alpha Delta, none when rejected), so ``global_step`` and ``max_steps`` count updates. Logged under ``train/``:
    ``kl_after_step``, ``surrogate_improvement`` and ``expected_improvement`` (g . alpha Delta) of
    the step (0 when rejected), ``cg_residual``, ``cg_iterations``, ``line_search_tries`` and
    ``accepted`` (share of the updates so far).

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response (None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        advantage: baseline and scaling (default: group mean, group std; RLOO: ``leave_one_out``, ``none``).
        trust_region: delta, damping, conjugate gradient and line search (:class:`TrustRegionConfig`).
        update: micro-batches, LM-head chunks, gradient checkpointing (one pass over the whole
            rollout: epochs 1, no mini-batches; ``max_grad_norm`` does not apply, delta bounds the step).
        seed: seeds sampling (per rank and step, so a resumed run samples the same).
    """

    updates_sharded_parameters = False  # the natural-gradient algebra works on whole parameter tensors
    differentiates_twice = True  # the Fisher-vector products: its layers are never compiled

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        advantage: AdvantageConfig | None = None,
        trust_region: TrustRegionConfig | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
    ) -> None:
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(policy, scorer, sampling, None, update, reference=False, seed=seed)
        self.hparams.pop("optimizer", None)  # the base's AdamW option: TRPO's optimizer only applies its step
        if self.update_config.epochs != 1 or self.update_config.mini_batch_size is not None:
            raise ValueError("TRPO takes one step from the whole rollout: update.epochs 1, update.mini_batch_size null")
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="mean", scaling="group")
        self.trust_region = as_dataclass(trust_region, TrustRegionConfig) or TrustRegionConfig()
        self.register_buffer("accepted_updates", torch.zeros((), dtype=torch.long))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with lr 1 on the trainable parameters: :meth:`update` sets its gradient to -alpha Delta."""
        if not self.trainable_parameters():
            raise RuntimeError("TRPO has nothing to train: no policy parameter has requires_grad")
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:  # it would unscale the step
            raise ValueError("TRPO sets its step as the gradient, which 16-mixed's loss scaler rescales: use bf16 or 32")
        return torch.optim.SGD(self.trainable_parameters(), lr=1.0)

    def trainable_parameters(self) -> list[Tensor]:
        return [parameter for parameter in self.policy.parameters() if parameter.requires_grad]

    def log_pi(self, hidden: Tensor, old_head: dict[str, Tensor] | None = None) -> Tensor:
        """log pi(. | s_t) [n, V]; with ``old_head`` (its weights at theta_old) pi_old's."""
        return row_log_distribution(self.policy, hidden, self.sampling.logprob_temperature, old_head)

    def chunked_sum(self, term: Callable[..., Tensor], *rows: Tensor) -> Tensor:
        return chunked_sum(term, *rows, chunk_size=self.update_config.logprob_chunk_size)

    # -- the quantities of the step: S and g, F v, KL ----------------------------------------------
    def surrogate_gradient(self, batches: list[ResponseRows], parameters: list[Tensor], num_tokens: float):
        """(S(theta_old), g) on this rank; keeps each batch's hidden states at theta_old."""
        surrogate = torch.zeros((), dtype=torch.float64, device=self.device)
        gradient = torch.zeros(sum(p.numel() for p in parameters), dtype=flat_dtype(parameters), device=self.device)

        def term(hidden: Tensor, tokens: Tensor, old_logprobs: Tensor, advantages: Tensor) -> Tensor:
            logprobs = self.log_pi(hidden).gather(-1, tokens[:, None]).squeeze(-1)
            every_row = torch.ones_like(tokens, dtype=torch.bool)
            return trpo_surrogate(logprobs, old_logprobs, advantages, every_row, num_tokens=num_tokens)[0]

        for batch in batches:
            hidden, tokens = hidden_rows(self.policy, batch.inputs)
            batch.old_hidden = hidden.detach()
            value = self.chunked_sum(term, hidden, tokens, batch.old_logprobs, batch.advantages)
            gradient += flat_grad(value, parameters)
            surrogate += value.detach()
        return surrogate, gradient

    def kl_hessian_vector_product(self, batches: list[ResponseRows], parameters: list[Tensor], vector: Tensor, num_tokens: float):
        """F v on this rank: the Hessian of KL(pi_old || pi_theta) at theta_old times v (pi_old: pi_theta detached)."""
        product = torch.zeros_like(vector)

        def term(hidden: Tensor) -> Tensor:
            log_pi, every_row = self.log_pi(hidden), torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            return mean_token_kl(log_pi.detach(), log_pi, every_row, num_tokens=num_tokens)

        with sdpa_kernel(SDPBackend.MATH):  # the attention kernel with a second derivative
            for batch in batches:
                kl = self.chunked_sum(term, hidden_rows(self.policy, batch.inputs)[0])
                product += hessian_vector_product(kl, parameters, vector)
        return product

    @torch.no_grad()
    def kl_and_surrogate(self, batches: list[ResponseRows], old_head: dict[str, Tensor], num_tokens: float) -> Tensor:
        """[KL(pi_old || pi_theta), S(theta)] on this rank at the current parameters."""

        def term(hidden: Tensor, old_hidden: Tensor, tokens: Tensor, old_logprobs: Tensor, advantages: Tensor):
            log_pi, every_row = self.log_pi(hidden), torch.ones_like(tokens, dtype=torch.bool)
            kl = mean_token_kl(self.log_pi(old_hidden, old_head), log_pi, every_row, num_tokens=num_tokens)
            logprobs = log_pi.gather(-1, tokens[:, None]).squeeze(-1)
            return torch.stack([kl, trpo_surrogate(logprobs, old_logprobs, advantages, every_row, num_tokens=num_tokens)[0]])

        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            hidden, tokens = hidden_rows(self.policy, batch.inputs)
            totals += self.chunked_sum(term, hidden, batch.old_hidden, tokens, batch.old_logprobs, batch.advantages)
        return totals

    # -- the update ---------------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> None:
        valid, sum_across = rollout.valid, self.sum_across_processes
        advantages = compute_advantages(self.advantage, rollout.rewards, rollout.groups, valid, sum_across=sum_across).advantages
        rows, micro_batch_size = valid.nonzero().flatten(), self.update_config.micro_batch_size
        batches = fisher_batches = response_rows(rollout, rows, advantages, micro_batch_size)
        region = self.trust_region
        if region.fisher_sample_size is not None and rows.numel() > region.fisher_sample_size:  # a random subset for F
            sample = self.minibatches(rows, region.fisher_sample_size)[0]
            fisher_batches = response_rows(rollout, sample, advantages, micro_batch_size)
        # token means over the global batch: every rank's sums, divided by every rank's token count
        counts = torch.tensor([sum(map(len, batches)), sum(map(len, fisher_batches))], dtype=torch.float64, device=self.device)
        num_tokens, fisher_tokens = sum_across(counts).tolist()
        parameters = self.trainable_parameters()
        theta_old = [parameter.detach().clone() for parameter in parameters]
        surrogate_old, gradient = map(sum_across, self.surrogate_gradient(batches, parameters, num_tokens))

        def fisher_vector_product(vector: Tensor) -> Tensor:  # (F + lambda I) v, the same on every rank
            return sum_across(self.kl_hessian_vector_product(fisher_batches, parameters, vector, fisher_tokens)) + region.damping * vector

        solve = conjugate_gradient(fisher_vector_product, gradient, region.cg_iterations, region.cg_tolerance)
        search, step = LineSearchResult(False, 0.0, 0, 0.0, 0.0), None
        if bool(gradient.any()):  # else no rank has a valid response with a nonzero advantage: no step
            step = trust_region_step(solve.solution, solve.solution @ fisher_vector_product(solve.solution), region.max_kl)
            old_head = head_weights(self.policy, parameters, theta_old)

            def evaluate(fraction: float) -> tuple[float, float]:
                assign_(parameters, theta_old, step, fraction)
                kl, surrogate = sum_across(self.kl_and_surrogate(batches, old_head, num_tokens)).tolist()
                return kl, surrogate - float(surrogate_old)

            search = backtracking_line_search(evaluate, region.max_kl, region.line_search_factor, region.line_search_tries)
        # theta_old + alpha Delta as one SGD step (theta_old when rejected), which Lightning counts in global_step
        assign_(parameters, theta_old)
        step_gradients(parameters, step if search.accepted else None, search.fraction)
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.accepted_updates += int(search.accepted)
        advantage_abs, valid_count = sum_across(torch.stack([advantages[valid].abs().sum(), valid.sum()]).double()).tolist()
        self.log_metrics({
            "cg_residual": solve.residual, "cg_iterations": float(solve.iterations), "kl_after_step": search.kl,
            "surrogate_improvement": search.improvement, "line_search_tries": float(search.tries),
            "expected_improvement": search.fraction * float(gradient @ step) if search.accepted else 0.0,
            "accepted": float(self.accepted_updates) / self.global_step,
            "advantage_abs_mean": advantage_abs / max(valid_count, 1.0),
        })
