"""The numerical core of TRPO: flat parameter vectors, KL-Hessian-vector products, conjugate
gradient, the trust-region step size and the backtracking line search. Pure torch.

With g the gradient of the surrogate and F the Hessian of the mean KL(pi_old || pi_theta) at
theta = theta_old (the Fisher information of the policy), TRPO solves (F + lambda I) s = g by
conjugate gradient, scales s to the boundary of the quadratic trust region

    Delta theta = sqrt(2 delta / s^T (F + lambda I) s) * s,      so that  1/2 Delta^T F Delta ~= delta,

and backtracks along Delta theta until the measured KL and surrogate are acceptable.

Under ``torch.distributed`` every rank holds its own rollout; the caller sums each rank's share
of the gradient, of every Fisher-vector product and of the line-search measurements over the
ranks (each a token mean over the global batch), so every rank computes the same direction,
takes the same decisions and ends with the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def flat_dtype(parameters: Sequence[Tensor]) -> torch.dtype:
    """The dtype of flat vectors over ``parameters``: at least float32 (CG in bfloat16 is useless)."""
    dtype = torch.float32
    for parameter in parameters:
        dtype = torch.promote_types(dtype, parameter.dtype)
    return dtype


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """One vector holding ``tensors`` one after the other (the layout of every flat vector here)."""
    return torch.cat([tensor.reshape(-1).to(dtype) for tensor in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``vector`` shaped like ``like`` (inverse of :func:`flatten`)."""
    return [piece.view_as(tensor) for piece, tensor in zip(vector.split([t.numel() for t in like]), like)]


def flat_grad(output: Tensor, parameters: Sequence[Tensor], *, create_graph: bool = False) -> Tensor:
    """d output / d parameters as a flat vector (zeros for parameters ``output`` does not depend on).

    Uses ``torch.autograd.grad``, so nothing accumulates into ``.grad``.
    """
    grads = torch.autograd.grad(
        output, parameters, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    return flatten(grads, flat_dtype(parameters))


def hessian_vector_product(scalar: Tensor, parameters: Sequence[Tensor], vector: Tensor) -> Tensor:
    """H v with H = d^2 scalar / d theta^2, by double backward: H v = d/d theta [(d scalar / d theta) . v]."""
    gradient = flat_grad(scalar, parameters, create_graph=True)
    return flat_grad(gradient @ vector.to(gradient.dtype), parameters)


@torch.no_grad()
def assign_(
    parameters: Sequence[Tensor], base: Sequence[Tensor], step: Tensor | None = None, fraction: float = 1.0
) -> None:
    """theta <- theta_base + fraction * step, in place (``step=None``: theta <- theta_base exactly).

    The step is rounded to each parameter's dtype before the addition, as an optimizer adds it
    (:func:`step_gradients`), so a point the line search measured can be reached exactly by one.
    """
    steps = unflatten(step, parameters) if step is not None else [None] * len(parameters)
    for parameter, start, piece in zip(parameters, base, steps):
        parameter.copy_(start if piece is None else start + (fraction * piece).to(start.dtype))


def step_gradients(parameters: Sequence[Tensor], step: Tensor | None, fraction: float = 1.0) -> None:
    """Set each parameter's ``.grad`` to -(fraction * step), its piece of the step in its dtype, so
    that SGD with lr 1 (no momentum, no weight decay) moves theta to theta + fraction * step, bit
    for bit as :func:`assign_` does (theta - 1 * (-d) = theta + d exactly). ``step=None`` clears
    the gradients: that SGD step leaves every parameter as it is."""
    steps = unflatten(step, parameters) if step is not None else [None] * len(parameters)
    for parameter, piece in zip(parameters, steps):
        parameter.grad = None if piece is None else -(fraction * piece).to(parameter.dtype)


@dataclass
class ConjugateGradientResult:
    solution: Tensor
    residual: float  # ||b - A x|| / ||b|| as tracked by the iteration (0 for b = 0)
    iterations: int


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, max_iterations: int = 10, tolerance: float = 1e-10
) -> ConjugateGradientResult:
    """Solve A x = b for symmetric positive definite A, given only x -> A x, starting from x = 0.

    Stops after ``max_iterations`` products or once the relative residual ||b - A x|| / ||b|| is at
    most ``tolerance``. Exact in at most dim(b) iterations (in exact arithmetic).
    """
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x
    p = r.clone()  # search direction
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return ConjugateGradientResult(x, 0.0, 0)
    r_dot_r = r @ r
    iterations = 0
    while iterations < max_iterations and math.sqrt(float(r_dot_r)) > tolerance * b_norm:
        a_p = matvec(p)
        alpha = r_dot_r / (p @ a_p)
        x += alpha * p
        r -= alpha * a_p
        new_r_dot_r = r @ r
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
        iterations += 1
    return ConjugateGradientResult(x, math.sqrt(float(r_dot_r)) / b_norm, iterations)


def trust_region_step(direction: Tensor, curvature: Tensor, max_kl: float) -> Tensor:
    """Delta theta = sqrt(2 delta / s^T F s) * s, the step along s to the edge of 1/2 Delta^T F Delta <= delta.

    ``curvature`` is s^T F s (positive: F is damped).
    """
    return torch.sqrt(2.0 * max_kl / curvature) * direction


@dataclass
class LineSearchResult:
    accepted: bool
    fraction: float  # alpha of the accepted step theta_old + alpha Delta theta; 0 when none was accepted
    tries: int  # evaluated step fractions
    kl: float  # measured KL(pi_old || pi_theta) at the accepted step (0: the parameters did not move)
    improvement: float  # measured surrogate improvement at the accepted step (0 when none was)


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]], max_kl: float, factor: float = 0.5, max_tries: int = 10
) -> LineSearchResult:
    """Try the step fractions alpha = factor^k, k = 0, 1, ..., max_tries - 1, and accept the first
    at which the measured KL is <= ``max_kl`` and the surrogate improves (strictly).

    ``evaluate(alpha)`` moves the parameters to theta_old + alpha * Delta theta and returns
    (KL(pi_old || pi_theta), S(theta) - S(theta_old)). After a rejection the parameters stand at the
    last trial: restoring theta_old is the caller's job.
    """
    for tries in range(1, max_tries + 1):
        fraction = factor ** (tries - 1)
        kl, improvement = evaluate(fraction)
        if kl <= max_kl and improvement > 0:
            return LineSearchResult(True, fraction, tries, kl, improvement)
    return LineSearchResult(False, 0.0, max_tries, 0.0, 0.0)


@dataclass
class TrustRegionConfig:
    """The natural-gradient step inside a KL trust region (TRPO).

    Args:
        max_kl: delta, the bound on the mean token KL.
        damping: lambda, added to F (in the units of F's eigenvalues): keeps the step out of the
            directions where the sampled Fisher is nearly singular. configs/trpo.yaml explains its value.
        cg_iterations: conjugate gradient stops after this many Fisher-vector products ...
        cg_tolerance: ... or at this relative residual ||g - (F + lambda I) s|| / ||g||.
        line_search_factor: the step fractions tried are factor^0 .. factor^(tries - 1) ...
        line_search_tries: ... with this many tries.
        fisher_sample_size: sequences (per rank) over which F v is averaged (None: all of the rollout's).
    """

    max_kl: float = 0.01
    damping: float = 0.1
    cg_iterations: int = 10
    cg_tolerance: float = 1e-3
    line_search_factor: float = 0.5
    line_search_tries: int = 10
    fisher_sample_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_kl <= 0 or self.damping < 0 or not 0 < self.line_search_factor < 1 or min(self.line_search_tries, self.cg_iterations) < 1:
            raise ValueError(
                "trust_region needs max_kl > 0, damping >= 0, 0 < line_search_factor < 1, line_search_tries >= 1 "
                f"and cg_iterations >= 1, got {self}"
            )
