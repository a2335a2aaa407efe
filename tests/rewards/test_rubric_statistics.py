"""The per-item statistics a GRAPE step logs, against float64 hand computations on random sample
sets; their sums over processes (threads standing in) equal the statistics of the whole batch."""

import math
import random
import statistics as stats

import pytest
import torch

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.rewards.confidence_weighting import confidence_weighted_rewards
from grape_lightning.rewards.rubric_statistics import item_advantages, item_statistics
from tests.thread_processes import run_ranks

KEYS = ["a/verified", "a/judged", "a/unsure", "b/judged", "b/verified"]
CATEGORY = ["a", "a", "a", "b", "b"]
VERIFIABLE = [True, False, False, False, True]
WEIGHTS = [1.0, 0.5, 0.25, 2.0, 1.0]
BINS = 10


def _case(seed, sets=6):
    """Sample sets of 2 to 5 responses, each set of one category; some (response, item) failed,
    a few responses with every item failed; scores binary or graded."""
    rng = random.Random(seed)
    groups, rows = [], []
    for g in range(sets):
        category = rng.choice("ab")
        for _ in range(rng.randint(2, 5)):
            groups.append(g)
            rows.append(category)
    n = len(groups)
    applicable = [[CATEGORY[k] == rows[i] for k in range(5)] for i in range(n)]
    failed = [[applicable[i][k] and rng.random() < (0.9 if i % 11 == 0 else 0.2) for k in range(5)] for i in range(n)]
    scores = [[rng.choice([0.0, 1.0]) if VERIFIABLE[k] else rng.choice([0.0, 1.0, rng.random()]) for k in range(5)] for _ in range(n)]
    confidences = [[1.0 if VERIFIABLE[k] else rng.random() for k in range(5)] for _ in range(n)]
    confidences = [[0.0 if failed[i][k] else c for k, c in enumerate(row)] for i, row in enumerate(confidences)]
    return scores, confidences, groups, applicable, failed


def _tensors(scores, confidences, groups, applicable, failed):
    return (torch.tensor(scores, dtype=torch.float64), torch.tensor(confidences, dtype=torch.float64), torch.tensor(groups),
            torch.tensor(applicable), torch.tensor(failed))


def _baseline(values, groups, valid, baseline):
    n = len(values)
    if baseline == "none":
        return [0.0] * n
    if baseline == "batch_mean":
        kept = [values[i] for i in range(n) if valid[i]]
        return [math.fsum(kept) / len(kept) if kept else 0.0] * n
    out = [0.0] * n
    for i in range(n):
        if not valid[i]:
            continue
        members = [j for j in range(n) if groups[j] == groups[i] and valid[j]]
        if baseline == "mean":
            out[i] = math.fsum(values[j] for j in members) / len(members)
        else:  # leave one out
            others = [values[j] for j in members if j != i]
            out[i] = math.fsum(others) / len(others) if others else values[i]
    return out


def _hand_item_advantages(terms, rewards, groups, valid, config):
    """A_ik by loops: the item's term through the baseline, scaled as the reward is."""
    n, k = len(rewards), len(terms[0])
    centred_r = [rewards[i] - b if valid[i] else 0.0 for i, b in enumerate(_baseline(rewards, groups, valid, config.baseline))]
    columns = []
    for item in range(k):
        t = [terms[i][item] for i in range(n)]
        b = _baseline(t, groups, valid, config.baseline)
        columns.append([t[i] - b[i] if valid[i] else 0.0 for i in range(n)])
    kept = [rewards[i] for i in range(n) if valid[i]]
    for i in range(n):
        if not valid[i]:
            continue
        if config.scaling == "group":
            members = [rewards[j] for j in range(n) if groups[j] == groups[i] and valid[j]]
            scale = (stats.stdev(members) if len(members) >= 2 else 0.0) + config.eps
        elif config.scaling == "batch":
            scale = (stats.stdev(kept) if len(kept) >= 2 else 1.0) + config.eps
        else:
            scale = 1.0
        for item in range(k):
            columns[item][i] /= scale
    if config.scaling == "whiten":
        centred_kept = [centred_r[i] for i in range(n) if valid[i]]
        std = (stats.stdev(centred_kept) if len(centred_kept) > 1 else 1.0) + config.eps
        for item in range(k):
            mean = math.fsum(columns[item][i] for i in range(n) if valid[i]) / len(centred_kept)
            columns[item] = [(columns[item][i] - mean) / std if valid[i] else 0.0 for i in range(n)]
    return [[columns[item][i] for item in range(k)] for i in range(n)]


def _hand_statistics(scores, confidences, groups, applicable, failed, omega, advantages, config):
    n, k = len(scores), len(KEYS)
    scored = [[applicable[i][j] and not failed[i][j] for j in range(k)] for i in range(n)]
    member = [any(row) for row in scored]
    shares = []
    for i in range(n):
        total = math.fsum(omega[groups[i]][j] for j in range(k) if scored[i][j])
        shares.append([omega[groups[i]][j] / total if scored[i][j] and total > 0 else 0.0 for j in range(k)])
    valid = [math.fsum(row) > 0 for row in shares]
    terms = [[shares[i][j] * scores[i][j] for j in range(k)] for i in range(n)]
    rewards = [math.fsum(row) for row in terms]
    per_item_advantage = _hand_item_advantages(terms, rewards, groups, valid, config)
    agreement = {}
    for i in range(n):
        reference = [j for j in range(k) if scored[i][j] and VERIFIABLE[j]]
        if reference:
            v = math.fsum(WEIGHTS[j] * scores[i][j] for j in reference) / math.fsum(WEIGHTS[j] for j in reference)
            for j in range(k):
                if scored[i][j] and not VERIFIABLE[j]:
                    agreement[i, j] = 1 - abs(scores[i][j] - v)
    out = {}
    for j, key in enumerate(KEYS):
        rows = [i for i in range(n) if applicable[i][j]]
        if not rows:
            continue
        values = {"failures": float(sum(failed[i][j] for i in rows))}
        done = [i for i in rows if scored[i][j]]
        if done:
            values["score"] = math.fsum(scores[i][j] for i in done) / len(done)
            values["confidence"] = math.fsum(confidences[i][j] for i in rows) / len(rows)
            stds = []
            for g in sorted(set(groups)):
                in_set = [scores[i][j] for i in done if groups[i] == g]
                if len(in_set) >= 2:
                    stds.append(stats.stdev(in_set))
            values["spread"] = math.fsum(stds) / len(stds) if stds else 0.0
        sets = [g for g in sorted(set(groups)) if any(groups[i] == g and member[i] for i in rows)]
        if sets:
            values["omega"] = math.fsum(omega[g][j] for g in sets) / len(sets)
        total_reward = math.fsum(rewards[i] for i in range(n) if valid[i])
        if total_reward > 0:
            values["reward_share"] = math.fsum(terms[i][j] for i in range(n) if valid[i]) / total_reward
        total_advantage = math.fsum(abs(advantages[i]) for i in range(n) if valid[i])
        if total_advantage > 0:
            values["advantage_share"] = math.fsum(
                math.copysign(1.0, advantages[i]) * per_item_advantage[i][j] for i in range(n) if valid[i] and advantages[i] != 0
            ) / total_advantage
        pairs = [(confidences[i][jj], a) for (i, jj), a in agreement.items() if jj == j]
        if pairs:
            values["agreement"] = math.fsum(a for _, a in pairs) / len(pairs)
            by_bin = {}
            for c, a in pairs:
                by_bin.setdefault(min(int(c * BINS), BINS - 1), []).append((c, a))
            values["calibration_error"] = math.fsum(abs(math.fsum(a - c for c, a in group)) for group in by_bin.values()) / len(pairs)
        out[key] = values
    return out, per_item_advantage


CONFIGS = [AdvantageConfig(baseline, scaling) for baseline in ("mean", "leave_one_out", "none", "batch_mean")
           for scaling in ("none", "group", "batch", "whiten")]


def _statistics(case, config, sum_across=None):
    scores, confidences, groups, applicable, failed = _tensors(*case)
    rewards, omega = confidence_weighted_rewards(scores, confidences, torch.tensor(WEIGHTS, dtype=torch.float64), groups, applicable, failed)
    valid = ~torch.isnan(rewards)
    options = {} if sum_across is None else {"sum_across": sum_across}
    advantages = compute_advantages(config, rewards, groups, valid, **options).advantages
    result = item_statistics(
        KEYS, scores, confidences, torch.tensor(WEIGHTS, dtype=torch.float64), applicable, failed, torch.tensor(VERIFIABLE),
        groups, omega, advantages, config, **options,
    )
    return result, omega, advantages, rewards


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.baseline}-{c.scaling}")
def test_item_statistics_match_hand_computation_on_random_sets(config):
    for seed in range(6):
        case = _case(seed)
        result, omega, advantages, _ = _statistics(case, config)
        expected, _ = _hand_statistics(*case, omega.tolist(), advantages.tolist(), config)
        assert set(result.per_item) == set(expected)
        for key, values in expected.items():
            assert set(result.per_item[key]) == set(values), key
            for name, want in values.items():
                assert abs(result.per_item[key][name] - want) < 1e-10, (seed, key, name, result.per_item[key][name], want)
        assert result.critic_failures == sum(values["failures"] for values in expected.values())
        shares = [values["advantage_share"] for values in result.per_item.values() if "advantage_share" in values]
        assert not shares or abs(math.fsum(shares) - 1.0) < 1e-9  # the items' terms add up to A: their shares of sum |A| to 1
        reward_shares = [values["reward_share"] for values in result.per_item.values() if "reward_share" in values]
        assert abs(math.fsum(reward_shares) - 1.0) < 1e-12
        agreement = [result.agreement[KEYS.index(key)].item() for key in expected if "agreement" in expected[key]]
        assert agreement == pytest.approx([expected[key]["agreement"] for key in expected if "agreement" in expected[key]], abs=1e-12)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.baseline}-{c.scaling}")
def test_item_advantages_add_up_to_the_advantages(config):
    for seed in range(6):
        scores, confidences, groups, applicable, failed = _tensors(*_case(seed))
        rewards, omega = confidence_weighted_rewards(scores, confidences, torch.tensor(WEIGHTS, dtype=torch.float64), groups, applicable, failed)
        valid = ~torch.isnan(rewards)
        from grape_lightning.rewards.confidence_weighting import item_shares

        terms = item_shares(omega, groups, applicable & ~failed) * scores
        per_item, whole = item_advantages(config, terms, torch.nan_to_num(rewards), groups, valid)
        advantages = compute_advantages(config, rewards, groups, valid).advantages
        torch.testing.assert_close(whole, advantages, rtol=0, atol=1e-10)
        torch.testing.assert_close(per_item.sum(-1), advantages, rtol=0, atol=1e-9)
        expected = _hand_item_advantages(terms.tolist(), torch.nan_to_num(rewards).tolist(), groups.tolist(), valid.tolist(), config)
        torch.testing.assert_close(per_item, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)


def test_statistics_summed_over_processes_are_those_of_the_whole_batch():
    """Two ranks holding different numbers of whole sample sets: the same statistics as one process."""
    config = AdvantageConfig("batch_mean", "whiten")
    case = _case(3, sets=8)
    whole, _, _, _ = _statistics(case, config)
    groups = case[2]
    split = max(i for i, g in enumerate(groups) if g == 2) + 1  # sets 0-2 on rank 0, 3-7 on rank 1

    def rank_case(rank):
        rows = range(split) if rank == 0 else range(split, len(groups))
        offset = 0 if rank == 0 else 3
        return ([case[0][i] for i in rows], [case[1][i] for i in rows], [case[2][i] - offset for i in rows],
                [case[3][i] for i in rows], [case[4][i] for i in rows])

    results = run_ranks(2, lambda rank, sum_across: _statistics(rank_case(rank), config, sum_across)[0])
    for result in results:
        assert set(result.per_item) == set(whole.per_item)
        for key, values in whole.per_item.items():
            assert result.per_item[key] == pytest.approx(values, abs=1e-12), key
    assert "advantage_share" in whole.per_item["a/judged"] and "calibration_error" in whole.per_item["b/judged"]
