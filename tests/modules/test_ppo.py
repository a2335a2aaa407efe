"""PPO: per-token rewards, GAE, whitening across processes, clipped value loss and the full loss
against float64 references written as loops over scalars; the module's value alignment, value
model options, step counts, early stop, adaptive KL and resume."""

from __future__ import annotations

import math
import random
import threading

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grape_lightning.advantages import (
    AdvantageConfig,
    explained_variance,
    gae,
    masked_moments,
    merge_moments,
    moments_std,
    token_rewards,
    whiten,
)
from grape_lightning.algorithms import OptimizerConfig, RewardModelModule
from grape_lightning.algorithms.ppo import PPOModule
from grape_lightning.algorithms.reward_scaling import RewardScale
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.algorithms.value_function import rollout_values, token_values
from grape_lightning.losses.ppo import adaptive_kl_coef, clipped_value_loss, ppo_loss
from grape_lightning.models import ModelSpec
from grape_lightning.models.scores import last_token_scores
from grape_lightning.rewards import RewardFunction
from grape_lightning.rollout import SamplingParams
from tests.conftest import tiny_spec
from tests.losses.test_rl_losses import loop_aggregate
from tests.modules.test_rl_modules import LengthParity, _datamodule, _trainer
from tests.thread_processes import ThreadSum

F64 = torch.float64
TOL = dict(rtol=0.0, atol=1e-12)
NAN = float("nan")


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Inputs: the engine's layout (left-padded prompt, right-padded response), ragged lengths
# ----------------------------------------------------------------------------------------------


def response_masks(rng: random.Random, batch: int, time: int, holes: bool = False) -> list[list[int]]:
    """Responses start at one column (the prompt width) and have 1..rest tokens; with ``holes``
    some rows also start later and miss a token in the middle."""
    start = rng.randint(1, time // 3)
    mask = []
    for b in range(batch):
        begin = start + (rng.randint(0, 2) if holes and b % 2 else 0)
        length = rng.randint(1, time - begin)
        row = [1 if begin <= s < begin + length else 0 for s in range(time)]
        if holes and b % 3 == 2 and length > 2:
            row[begin + 1] = 0
        mask.append(row)
    mask[0] = [1 if start <= s < time else 0 for s in range(time)]  # one full-length response
    mask[-1] = [1 if s == start else 0 for s in range(time)]  # one single-token response
    return mask


def matrix(rng: random.Random, batch: int, time: int, low: float = -2.0, high: float = 2.0) -> list[list[float]]:
    return [[rng.uniform(low, high) for _ in range(time)] for _ in range(batch)]


def with_garbage(values: list[list[float]], mask: list[list[int]], garbage: float = NAN) -> list[list[float]]:
    return [[v if m else garbage for v, m in zip(row, mrow)] for row, mrow in zip(values, mask)]


def positions(mrow: list[int]) -> list[int]:
    return [s for s, m in enumerate(mrow) if m]


# ----------------------------------------------------------------------------------------------
# Per-token rewards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_token_rewards_put_kl_on_every_token_and_the_reward_on_the_last(seed):
    rng = random.Random(seed)
    batch, time, beta = 7, 12, rng.uniform(0.01, 0.5)
    mask = response_masks(rng, batch, time)
    kl = matrix(rng, batch, time, -1.0, 1.0)
    sequence = [rng.uniform(-3.0, 3.0) for _ in range(batch)]
    sequence[2] = NAN  # an invalid reward: its row is masked out
    mask[2] = [0] * time
    got = token_rewards(t(sequence), t(with_garbage(kl, mask, 1e30)), torch.tensor(mask).bool(), beta)
    for b in range(batch):
        where = positions(mask[b])
        for s in range(time):
            expected = 0.0
            if s in where:
                expected = -beta * kl[b][s] + (sequence[b] if s == where[-1] else 0.0)
            assert got[b, s].item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------------


def loop_gae(rewards, values, mask, gamma, lam):
    """The closed form A_k = sum_{j >= k} (gamma lambda)^(j - k) delta_j over each row's tokens."""
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for b, mrow in enumerate(mask):
        where = positions(mrow)
        n = len(where)
        deltas = []
        for k, s in enumerate(where):
            next_value = values[b][where[k + 1]] if k + 1 < n else 0.0
            deltas.append(rewards[b][s] + gamma * next_value - values[b][s])
        for k, s in enumerate(where):
            advantages[b][s] = math.fsum((gamma * lam) ** (j - k) * deltas[j] for j in range(k, n))
            returns[b][s] = advantages[b][s] + values[b][s]
    return advantages, returns


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_the_closed_form_with_ragged_masks(seed, holes):
    rng = random.Random(seed)
    batch, time = 8, 14
    gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
    mask = response_masks(rng, batch, time, holes=holes)
    rewards, values = matrix(rng, batch, time), matrix(rng, batch, time)
    expected_advantages, expected_returns = loop_gae(rewards, values, mask, gamma, lam)
    # garbage under padding (NaN values, huge rewards) must not leak into any token
    advantages, returns = gae(t(with_garbage(rewards, mask, 1e30)), t(with_garbage(values, mask)), torch.tensor(mask).bool(), gamma, lam)
    torch.testing.assert_close(advantages, t(expected_advantages), **TOL)
    torch.testing.assert_close(returns, t(expected_returns), **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_gae_with_gamma_and_lambda_one_is_the_return_minus_the_value(seed):
    rng = random.Random(seed)
    batch, time = 6, 10
    mask = response_masks(rng, batch, time)
    rewards, values = matrix(rng, batch, time), matrix(rng, batch, time)
    advantages, returns = gae(t(rewards), t(values), torch.tensor(mask).bool(), 1.0, 1.0)
    for b in range(batch):
        where = positions(mask[b])
        for k, s in enumerate(where):
            future = math.fsum(rewards[b][j] for j in where[k:])  # the Monte-Carlo return
            assert returns[b, s].item() == pytest.approx(future, abs=1e-12)
            assert advantages[b, s].item() == pytest.approx(future - values[b][s], abs=1e-12)


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    rewards = t([[0.0, 0.5, -1.0, 2.0, 0.0]])
    values = t([[9.0, 1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    advantages, _ = gae(rewards, values, mask, 0.9, 0.0)
    assert advantages[0].tolist() == pytest.approx([0.0, 0.5 + 0.9 * 2.0 - 1.0, -1.0 + 0.9 * 3.0 - 2.0, 2.0 - 3.0, 0.0], abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Whitening across processes, explained variance
# ----------------------------------------------------------------------------------------------


def loop_whiten(values, mask):
    """(v - mean) / std over the masked entries, std the unbiased one (n - 1)."""
    selected = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    mean = math.fsum(selected) / len(selected)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in selected) / (len(selected) - 1))
    return [[(v - mean) / std if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(values, mask)]


@pytest.mark.parametrize("seed", range(3))
def test_whitening_across_processes_equals_whitening_the_whole_batch_and_ignores_padding(seed):
    rng = random.Random(seed)
    batch, time = 10, 9
    mask = response_masks(rng, batch, time)
    values = [[v + 3.0 for v in row] for row in matrix(rng, batch, time)]
    expected = t(loop_whiten(values, mask))
    m = torch.tensor(mask).bool()
    garbage = t(with_garbage(values, mask, 1e9))
    garbage[1, ~m[1]] = NAN
    torch.testing.assert_close(whiten(garbage, m, eps=0.0), expected, **TOL)
    torch.testing.assert_close(whiten(garbage, m), whiten(t(values), m), **TOL)

    # two "processes" holding 3 and 7 of the rows (different token counts) see the whole batch's statistics
    reduce = ThreadSum(2)
    parts = [slice(0, 3), slice(3, batch)]
    results = [None, None]

    def run(rank: int) -> None:
        results[rank] = whiten(garbage[parts[rank]], m[parts[rank]], eps=0.0, sum_across=reduce.for_rank(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat(results), expected, **TOL)
    alone = whiten(garbage[parts[0]], m[parts[0]], eps=0.0)
    assert not torch.allclose(alone, expected[parts[0]])  # local statistics would differ


@pytest.mark.parametrize("seed", range(3))
def test_running_reward_moments_equal_the_statistics_of_the_whole_stream(seed):
    """Batch after batch, in two "processes", with invalid (NaN) rewards: (count, mean, M2) equal
    the float64 loop over every valid reward seen so far."""
    rng = random.Random(seed)
    reduce = ThreadSum(2)
    moments = [torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)]
    seen: list[float] = []
    for _ in range(4):
        batches = []
        for _rank in range(2):
            size = rng.randint(0, 6)
            values = [rng.gauss(50.0, 7.0) for _ in range(size)]
            valid = [rng.random() > 0.25 for _ in range(size)]
            seen += [v for v, ok in zip(values, valid) if ok]
            batches.append((t([v if ok else NAN for v, ok in zip(values, valid)]), torch.tensor(valid, dtype=torch.bool)))

        def run(rank: int) -> None:
            moments[rank] = merge_moments(moments[rank], masked_moments(*batches[rank], reduce.for_rank(rank)))

        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert torch.equal(moments[0], moments[1])
        if seen:
            mean = math.fsum(seen) / len(seen)
            m2 = math.fsum((v - mean) ** 2 for v in seen)
            torch.testing.assert_close(moments[0], t([len(seen), mean, m2]), rtol=1e-12, atol=1e-9)
            expected_std = math.sqrt(m2 / (len(seen) - 1)) if len(seen) > 1 and m2 > 0 else 1.0
            assert moments_std(moments[0]) == pytest.approx(expected_std, rel=1e-12)
    # merging is symmetric and the empty stream is its identity
    a, b = masked_moments(t([1.0, 4.0]), torch.ones(2, dtype=torch.bool)), t([3.0, 2.0, 8.0])
    torch.testing.assert_close(merge_moments(a, b), merge_moments(b, a), **TOL)
    assert torch.equal(merge_moments(torch.zeros(3, dtype=F64), b), b)
    assert moments_std(torch.zeros(3, dtype=F64)) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_explained_variance_matches_loop(seed):
    rng = random.Random(seed)
    batch, time = 6, 8
    mask = response_masks(rng, batch, time)
    returns, noise = matrix(rng, batch, time), matrix(rng, batch, time, -0.5, 0.5)
    values = [[r + e for r, e in zip(row, erow)] for row, erow in zip(returns, noise)]
    target = [r for row, mrow in zip(returns, mask) for r, m in zip(row, mrow) if m]
    residual = [r - v for rrow, vrow, mrow in zip(returns, values, mask) for r, v, m in zip(rrow, vrow, mrow) if m]

    def variance(xs):  # unbiased (n - 1), as every std of the library
        mean = math.fsum(xs) / len(xs)
        return math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    expected = 1.0 - variance(residual) / variance(target)
    got = explained_variance(t(with_garbage(values, mask)), t(with_garbage(returns, mask)), torch.tensor(mask).bool())
    assert got == pytest.approx(expected, abs=1e-12)
    assert explained_variance(t(returns), t(returns), torch.tensor(mask).bool()) == 1.0
    assert explained_variance(t([[1.0, 2.0]]), t([[3.0, 3.0]]), torch.tensor([[True, True]])) == 0.0


# ----------------------------------------------------------------------------------------------
# Clipped value loss, the PPO loss, the adaptive KL controller
# ----------------------------------------------------------------------------------------------

CLIP = 0.2


def value_case(seed: int, batch: int = 6, time: int = 10):
    """V - V_old from three bands (below -c, inside, above +c) and returns on either side."""
    rng = random.Random(seed)
    old = matrix(rng, batch, time)
    values, returns = [], []
    for b in range(batch):
        vrow, rrow = [], []
        for s in range(time):
            band = (b * time + s) % 3
            step = rng.uniform(-0.8, -0.3) if band == 0 else rng.uniform(-0.15, 0.15) if band == 1 else rng.uniform(0.3, 0.8)
            vrow.append(old[b][s] + step)
            rrow.append(old[b][s] + rng.uniform(-1.5, 1.5))
        values.append(vrow)
        returns.append(rrow)
    return values, old, returns, response_masks(rng, batch, time)


def loop_value_loss(values, old, returns, mask, clip):
    """Per-token loss, its derivative in V (hand-derived) and which side clipped."""
    loss, grad, cases = [], [], set()
    clipped_count = 0
    for b, row in enumerate(values):
        loss_row, grad_row = [], []
        for s, v in enumerate(row):
            if not mask[b][s]:
                loss_row.append(0.0)
                grad_row.append(0.0)
                continue
            vo, r = old[b][s], returns[b][s]
            vc = vo + min(max(v - vo, -clip), clip)
            unclipped, clipped = (v - r) ** 2, (vc - r) ** 2
            loss_row.append(0.5 * max(unclipped, clipped))
            # the clipped term only exceeds the other when V left the band, where V_clip is constant in V
            binding = clipped > unclipped
            grad_row.append(0.0 if binding else v - r)
            clipped_count += binding
            cases.add((v - vo > clip, v - vo < -clip, binding))
        loss.append(loss_row)
        grad.append(grad_row)
    return loss, grad, clipped_count, cases


@pytest.mark.parametrize("seed", range(3))
def test_clipped_value_loss_and_gradient_match_loops_on_both_sides(seed):
    values, old, returns, mask = value_case(seed)
    expected_loss, expected_grad, clipped_count, cases = loop_value_loss(values, old, returns, mask, CLIP)
    # above and below the band, with the clipped term binding and not
    assert {(True, False, True), (True, False, False), (False, True, True), (False, True, False)} <= cases
    leaf = t(with_garbage(values, mask, 1e30)).requires_grad_(True)
    loss, clipped = clipped_value_loss(leaf, t(old), t(returns), torch.tensor(mask).bool(), CLIP)
    torch.testing.assert_close(loss.detach(), t(expected_loss), **TOL)
    assert int(clipped.sum()) == clipped_count > 0
    loss.sum().backward()
    torch.testing.assert_close(leaf.grad, t(expected_grad), **TOL)


def test_value_loss_without_clip_is_half_the_squared_error():
    values, old, returns, mask = value_case(5)
    loss, clipped = clipped_value_loss(t(values), t(old), t(returns), torch.tensor(mask).bool(), None)
    for b, row in enumerate(values):
        for s, v in enumerate(row):
            assert loss[b, s].item() == pytest.approx(0.5 * (v - returns[b][s]) ** 2 if mask[b][s] else 0.0, abs=1e-12)
    assert not clipped.any()


def loop_ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, entropy, mask, *, eps, vf_coef, entropy_coef, mode, **reduce):
    policy, approx_kl, low, high = [], [], 0, 0
    for b, row in enumerate(logprobs):
        policy_row = []
        for s, l in enumerate(row):
            a = advantages[b][s]
            rho = math.exp(l - old_logprobs[b][s]) if mask[b][s] else 1.0
            policy_row.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) if mask[b][s] else 0.0)
            if mask[b][s]:
                approx_kl.append(rho - 1 - math.log(rho))
                low += rho < 1 - eps and a < 0
                high += rho > 1 + eps and a > 0
        policy.append(policy_row)
    value, _, clipped_count, _ = loop_value_loss(values, old_values, returns, mask, CLIP)
    policy_loss = loop_aggregate(policy, mask, mode, **reduce)
    value_loss = loop_aggregate(value, mask, mode, **reduce)
    total = policy_loss + vf_coef * value_loss - entropy_coef * loop_aggregate(entropy, mask, mode, **reduce)
    n = len(approx_kl)
    metrics = {"policy_loss": policy_loss, "value_loss": value_loss, "approx_kl": math.fsum(approx_kl) / n,
               "clip_fraction_low": low / n, "clip_fraction_high": high / n, "value_clip_fraction": clipped_count / n}
    return total, metrics


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
def test_ppo_loss_matches_loops(seed, mode):
    rng = random.Random(seed)
    values, old_values, returns, mask = value_case(seed)
    batch, time = len(values), len(values[0])
    old_logprobs = matrix(rng, batch, time, -4.0, -0.05)
    logprobs = [[o + math.log(rng.uniform(0.5, 1.6)) for o in row] for row in old_logprobs]
    advantages = matrix(rng, batch, time)
    entropy = matrix(rng, batch, time, 0.0, 3.0)
    options = dict(eps=0.2, vf_coef=0.3, entropy_coef=0.01, mode=mode, constant_length=time)
    expected, expected_metrics = loop_ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, entropy, mask, **options)
    loss, metrics = ppo_loss(
        t(with_garbage(logprobs, mask, 50.0)), t(old_logprobs), t(advantages), t(values), t(old_values), t(returns),
        torch.tensor(mask).bool(), entropy=t(with_garbage(entropy, mask, 1e30)), eps_low=0.2, eps_high=0.2, value_clip=CLIP,
        vf_coef=0.3, entropy_coef=0.01, aggregation=mode, constant_length=time,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    for name, value in expected_metrics.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-6 if "fraction" in name else 1e-12), name


def test_ppo_loss_micro_batches_add_up_to_the_mini_batch_loss():
    rng = random.Random(3)
    values, old_values, returns, mask = value_case(3, batch=8)
    old_logprobs = matrix(rng, 8, 10, -4.0, -0.05)
    logprobs = [[o + math.log(rng.uniform(0.5, 1.6)) for o in row] for row in old_logprobs]
    tensors = [t(x) for x in (logprobs, old_logprobs, matrix(rng, 8, 10), values, old_values, returns)]
    m = torch.tensor(mask).bool()
    whole, _ = ppo_loss(*tensors, m, vf_coef=0.5)
    parts = [ppo_loss(*(x[rows] for x in tensors), m[rows], vf_coef=0.5, num_sequences=8, num_tokens=int(m.sum()))[0]
             for rows in (slice(0, 3), slice(3, 8))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-12)


def test_entropy_bonus_needs_entropy():
    x = torch.zeros(1, 2, dtype=F64)
    with pytest.raises(ValueError, match="entropy"):
        ppo_loss(x, x, x, x, x, x, torch.ones(1, 2, dtype=torch.bool), entropy_coef=0.1)


@pytest.mark.parametrize("kl, expected_error", [(6.0, 0.2), (4.4, 0.1), (3.6, -0.1), (1.0, -0.2)])
def test_adaptive_kl_coefficient(kl, expected_error):
    got = adaptive_kl_coef(0.1, kl, kl_target=4.0, num_sequences=64, horizon=1000)
    assert got == pytest.approx(0.1 * (1 + expected_error * 64 / 1000), abs=1e-15)


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------


class SometimesMissing(RewardFunction):
    """Scores the length parity of the response but cannot score every third one."""

    def __call__(self, prompts, responses, metadata):
        return [None if i % 3 == 0 else float(len(r) % 2) for i, r in enumerate(responses)]


class ScaledParity(RewardFunction):
    """LengthParity times ``factor``: the same preferences on another scale."""

    def __init__(self, factor: float) -> None:
        super().__init__(1.0, "scaled_parity")
        self.factor = factor

    def __call__(self, prompts, responses, metadata):
        return [self.factor * (len(r) % 2) for r in responses]


def _rollout(module):
    datamodule = _datamodule()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    return module.collect_rollout(next(iter(datamodule.train_dataloader())))


def loop_std(values):
    """The unbiased std of a list (1 while undefined or 0, as the reward scale)."""
    if len(values) < 2:
        return 1.0
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return std if std > 0 else 1.0


def test_reward_scale_matches_the_loop_std_of_the_batch_or_of_every_reward_seen():
    rng = random.Random(4)
    batch, running, seen = RewardScale("batch"), RewardScale("running"), []
    for size in (5, 1, 7):
        values = [rng.gauss(20.0, 6.0) for _ in range(size)]
        valid = [i % 4 != 1 for i in range(size)]
        rewards, mask = t([v if ok else NAN for v, ok in zip(values, valid)]), torch.tensor(valid)
        kept = [v for v, ok in zip(values, valid) if ok]
        seen += kept
        assert batch(rewards, mask, lambda x: x) == pytest.approx(loop_std(kept), rel=1e-12)
        assert running(rewards, mask, lambda x: x) == pytest.approx(loop_std(seen), rel=1e-12)
    assert running.moments[0] == len(seen) and len(seen) > 2
    assert RewardScale("none")(t([1e6, -1e6]), torch.ones(2, dtype=torch.bool), lambda x: x) == 1.0
    with pytest.raises(ValueError, match="reward_scaling"):
        RewardScale("std")


@pytest.mark.parametrize("value_model, scaling, reward_scaling", [
    ("separate", "whiten", "batch"), ("head", "none", "none"), ("head", "whiten", "running"),
])
def test_module_advantages_match_loops_over_rewards_kl_gae_and_whitening(value_model, scaling, reward_scaling):
    """One rollout through PPOModule.update: the advantages and value targets handed to the
    optimisation equal the float64 loops (token rewards with the KL penalty and the scaled reward,
    GAE with the config's gamma and lambda, whitening with the unbiased std), invalid rows out."""
    gamma, lam, beta = 0.9, 0.7, 0.3
    module = PPOModule(
        tiny_spec(dtype="float64"), rewards=[SometimesMissing()], sampling=SamplingParams(max_new_tokens=5),
        value_model=value_model, kl_coef=beta, reward_scaling=reward_scaling,
        advantage=AdvantageConfig(baseline="value", scaling=scaling, eps=0.0, gamma=gamma, lam=lam),
    )
    with torch.no_grad():  # pi_old away from pi_ref, so the KL penalty is not 0
        for parameter in module.policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    rollout = _rollout(module)
    seen = {}
    module.optimise = lambda rollout, advantages, old_values, returns: seen.update(advantages=advantages, old_values=old_values, returns=returns) or {}
    module.log_metrics = lambda metrics: seen.update(metrics=metrics)
    module.update(rollout)

    mask = rollout.trained_mask.tolist()
    valid = rollout.valid.tolist()
    assert 0 < sum(valid) < len(valid)
    kept = [r for r, ok in zip(rollout.rewards.tolist(), valid) if ok]
    scale = loop_std(kept) if reward_scaling != "none" else 1.0
    old, ref = rollout.old_logprobs.tolist(), rollout.ref_logprobs.tolist()
    rewards = [[0.0] * len(row) for row in mask]
    for b, mrow in enumerate(mask):
        where = positions(mrow)
        for s in where:
            rewards[b][s] = -beta * (old[b][s] - ref[b][s]) + (rollout.rewards[b].item() / scale if s == where[-1] else 0.0)
    assert max(abs(old[b][s] - ref[b][s]) for b, mrow in enumerate(mask) for s in positions(mrow)) > 1e-3
    advantages, returns = loop_gae(rewards, seen["old_values"].tolist(), mask, gamma, lam)
    if scaling == "whiten":
        advantages = loop_whiten(advantages, mask)
    torch.testing.assert_close(seen["advantages"], t(advantages), rtol=0, atol=1e-10)
    torch.testing.assert_close(seen["returns"], t(returns), rtol=0, atol=1e-10)
    assert seen["metrics"]["reward_scale"] == pytest.approx(scale, rel=1e-12)
    assert scale != 1.0 or reward_scaling == "none"
    with pytest.raises(ValueError, match="baseline must be 'value'"):
        PPOModule(tiny_spec(), advantage=AdvantageConfig(baseline="mean", scaling="group"))


@pytest.mark.parametrize("value_model", ["head", "separate"])
def test_value_of_a_token_is_read_where_it_is_chosen(value_model):
    """V_t equals the value model's output at the last position of the unpadded prefix before y_t."""
    module = PPOModule(tiny_spec(dtype="float64"), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=5), value_model=value_model)
    module.value_model.head.linear.bias.data.fill_(0.3)  # the bias would show a misaligned zero
    rollout = _rollout(module)
    rows = torch.arange(len(rollout))
    inputs = rollout.model_inputs(rows)
    with torch.no_grad():
        values = token_values(module.value_model, inputs)
    assert torch.equal(rollout_values(module, rollout)[:, : values.shape[1]], values)
    assert torch.all(values[~inputs["response_mask"]] == 0)
    checked = 0
    for b in range(len(rollout)):
        real = inputs["attention_mask"][b].bool()
        for s in inputs["response_mask"][b].nonzero().flatten().tolist():
            prefix = inputs["input_ids"][b, :s][real[:s]]
            with torch.no_grad():
                expected = module.value_model(prefix[None], torch.ones_like(prefix)[None])[0, -1]
            torch.testing.assert_close(values[b, s], expected, rtol=0, atol=1e-10)
            checked += 1
    assert checked > len(rollout)


def test_value_model_options(tmp_path):
    head = PPOModule(tiny_spec(), value_model="head")
    assert head.value_model.trunk is head.policy.base_model
    separate = PPOModule(tiny_spec(), value_model="separate")
    for ours, policy in zip(separate.value_model.trunk.parameters(), separate.policy.base_model.parameters()):
        assert ours is not policy and torch.equal(ours, policy)
    assert any(k.startswith("value_model.") for k in separate.state_dict())
    assert not any(k.startswith("reference.") for k in separate.state_dict())
    with pytest.raises(ValueError, match="value_model"):
        PPOModule(tiny_spec(), value_model="shared")

    # from a reward model: the value at the last token of (x, y) is the reward model's score r(x, y)
    rm = RewardModelModule(tiny_spec(init_seed=7))
    torch.nn.init.normal_(rm.reward_model.score.weight)
    rm.export_hf(tmp_path / "rm")
    with pytest.raises(ValueError, match="value_init"):
        PPOModule(tiny_spec(), value_model="head", value_init=ModelSpec(name_or_path=str(tmp_path / "rm")))
    module = PPOModule(tiny_spec(), rewards=[LengthParity()], value_model="separate", value_init={"name_or_path": str(tmp_path / "rm")})
    assert module.value_model.training
    ids = torch.tensor([module.tokenizer("12+34=46")["input_ids"]])
    with torch.no_grad():
        value = module.value_model(ids, torch.ones_like(ids))[0, -1]
        score = last_token_scores(rm.reward_model.eval(), ids, torch.ones_like(ids))[0]
    torch.testing.assert_close(value, score, rtol=0, atol=1e-6)
    assert abs(float(score)) > 0.1


def test_steps_invalid_rewards_and_value_training(tmp_path):
    module = PPOModule(
        tiny_spec(), rewards=[SometimesMissing()], sampling=SamplingParams(max_new_tokens=4),
        optimizer=OptimizerConfig(lr=1e-3), value_model="separate", update=UpdateConfig(epochs=2, mini_batch_size=8, micro_batch_size=3),
    )
    policy_before = [p.detach().clone() for p in module.policy.parameters()]
    value_before = [p.detach().clone() for p in module.value_model.parameters()]
    trainer = _trainer(tmp_path, 8)
    trainer.fit(module, _datamodule())  # 16 sequences a rollout: 2 epochs x 2 mini-batches
    assert trainer.global_step == 8
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2
    metrics = trainer.callback_metrics
    assert metrics["train/invalid_rewards"] == 6 and metrics["train/update_steps"] == 4
    for name in ("policy_loss", "value_loss", "entropy", "clip_fraction_low", "clip_fraction_high", "value_clip_fraction",
                 "approx_kl", "explained_variance", "advantage_mean", "advantage_std", "return_mean", "return_std", "kl", "kl_coef"):
        assert torch.isfinite(metrics[f"train/{name}"]), name
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, module.policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(value_before, module.value_model.parameters()))


def test_early_stop_on_approximate_kl(tmp_path):
    """The first mini-batch sees pi_theta = pi_old (KL 0); after one large step the next one passes the target."""
    module = PPOModule(
        tiny_spec(), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=4),
        optimizer=OptimizerConfig(lr=3e-2), update=UpdateConfig(epochs=3, mini_batch_size=4), target_kl=1e-6,
    )
    trainer = _trainer(tmp_path, 4)
    trainer.fit(module, _datamodule())
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2  # 2 steps each instead of 12
    assert trainer.callback_metrics["train/update_steps"] == 2


def test_adaptive_kl_coefficient_follows_the_controller_and_is_saved(tmp_path):
    """On the first rollout pi_old = pi_ref, so KL = 0 and beta shrinks by (1 - 0.2 N / horizon)."""
    module = PPOModule(
        tiny_spec(), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=4),
        kl_coef=0.1, kl_target=6.0, kl_horizon=32.0, update=UpdateConfig(epochs=1),
    )
    assert module.reference is not None
    _trainer(tmp_path, 1).fit(module, _datamodule())
    assert module.kl_coef.item() == pytest.approx(0.1 * (1 - 0.2 * 16 / 32), abs=1e-15)
    assert module.state_dict()["kl_coef"].item() == module.kl_coef.item()


@pytest.mark.parametrize("scaling", ["batch", "running"])
def test_reward_scaling_makes_training_independent_of_the_reward_scale(tmp_path, scaling):
    def train(factor, scaling):
        L.seed_everything(0)
        module = PPOModule(
            tiny_spec(), rewards=[ScaledParity(factor)], sampling=SamplingParams(max_new_tokens=4),
            optimizer=OptimizerConfig(lr=1e-3), kl_coef=0.0, update=UpdateConfig(epochs=2, mini_batch_size=8), reward_scaling=scaling,
        )
        _trainer(tmp_path / f"{factor}-{scaling}", 8).fit(module, _datamodule())
        if scaling == "running":  # two rollouts of 16 rewards, all in the statistics
            assert module.reward_scale.moments[0] == 32 and module.reward_scale.moments[2] > 0
        return [p.detach() for p in module.parameters()]

    unit, large = train(1.0, scaling), train(1000.0, scaling)
    for ours, reference in zip(large, unit):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    unscaled = train(1000.0, "none")
    assert any(not torch.allclose(ours, reference, rtol=0, atol=1e-3) for ours, reference in zip(unscaled, unit))


@pytest.mark.parametrize("options", [
    {"value_model": "head", "kl_coef": 0.05},
    {"value_model": "separate", "kl_coef": 0.05, "kl_target": 1.0, "kl_horizon": 100.0, "entropy_coef": 0.01,
     "reward_scaling": "running"},
])
def test_resume_mid_run_continues_with_the_same_policy_and_value_model(tmp_path, options):
    def make():
        L.seed_everything(0)
        return PPOModule(
            tiny_spec(), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=4),
            optimizer=OptimizerConfig(lr=1e-3), update=UpdateConfig(epochs=2, mini_batch_size=8), **options,
        )

    full = make()
    initial = {k: v.detach().clone() for k, v in full.state_dict().items()}
    _trainer(tmp_path / "full", 12).fit(full, _datamodule())
    final = full.state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in final if k.startswith("policy."))
    assert any(not torch.equal(initial[k], final[k]) for k in final if k.startswith("value_model.head."))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path / "a", 4, callbacks=[checkpoint], enable_checkpointing=True).fit(make(), _datamodule())
    resumed = make()
    _trainer(tmp_path / "b", 12).fit(resumed, _datamodule(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert resumed.state_dict().keys() == final.keys()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0, msg=key)
