from grape_lightning.diagnostics import entropy_collapse, failure_flags, kl_runaway, length_drift, no_clipping, tied_groups


def series(values):
    return [(step, float(v)) for step, v in enumerate(values)]


def test_tied_groups_fires_when_later_half_mostly_tied():
    assert tied_groups({"train/tied_groups": series([0.2, 0.3, 0.9, 1.0])}) is not None


def test_tied_groups_silent_when_groups_differ():
    assert tied_groups({"train/tied_groups": series([1.0, 1.0, 0.3, 0.2])}) is None


def test_entropy_collapse_fires_with_flat_reward():
    h = {"train/entropy": series([2.0, 1.0, 0.1, 0.01]), "train/reward": series([0.5, 0.5, 0.5, 0.5])}
    assert entropy_collapse(h) is not None


def test_entropy_collapse_silent_when_reward_rises_or_entropy_holds():
    assert entropy_collapse({"train/entropy": series([2.0, 1.0, 0.1, 0.01]), "train/reward": series([0, 0, 1, 1])}) is None
    assert entropy_collapse({"train/entropy": series([2.0, 1.9, 1.8, 1.7]), "train/reward": series([0.5] * 4)}) is None


def test_kl_runaway_fires_and_not():
    assert kl_runaway({"train/kl": series([0.0, 0.5, 2.0, 5.0])}) is not None
    assert kl_runaway({"train/kl": series([0.0, 0.01, 0.02, 0.02])}) is None


def test_no_clipping_fires_and_not():
    flat = series([0.3] * 4)
    assert no_clipping({"train/clip_fraction_low": series([0] * 4), "train/clip_fraction_high": series([0] * 4), "train/reward": flat}) is not None
    assert no_clipping({"train/clip_fraction_low": series([0.05] * 4), "train/reward": flat}) is None
    assert no_clipping({"train/clip_fraction_low": series([0] * 4), "train/reward": series([0, 0, 1, 1])}) is None


def test_no_clipping_silent_with_one_update_per_batch():
    """With one optimizer step per rollout batch the ratio is exactly 1: zero clipping is by
    construction, not a sign of too small an update (a GRPO run whose lr was too high, its reward
    falling, printed this flag's 'raise lr')."""
    zeros, flat = series([0] * 4), series([0.3] * 4)
    history = {"train/clip_fraction_low": zeros, "train/clip_fraction_high": zeros, "train/reward": flat}
    assert no_clipping({**history, "train/update_steps": series([1.0] * 4)}) is None
    assert no_clipping({**history, "train/update_steps": series([2.0] * 4)}) is not None


def test_length_drift_fires_either_way_with_flat_reward():
    flat = series([0.3] * 20)
    grew = length_drift({"train/response_length": series([3.0] * 10 + [8.0] * 10), "train/reward": flat})
    shrank = length_drift({"train/response_length": series([8.0] * 10 + [1.0] * 10), "train/reward": flat})
    assert grew is not None and "grew from 3.0 to 8.0" in grew
    assert shrank is not None and "shrank from 8.0 to 1.0" in shrank


def test_length_drift_silent_when_length_holds_or_reward_rises():
    assert length_drift({"train/response_length": series([3.0] * 10 + [5.0] * 10), "train/reward": series([0.3] * 20)}) is None
    rising = series([0.1] * 10 + [0.6] * 10)
    assert length_drift({"train/response_length": series([3.0] * 10 + [8.0] * 10), "train/reward": rising}) is None


def test_missing_metrics_fire_nothing():
    assert all(flag is None for flag in failure_flags({}).values())
