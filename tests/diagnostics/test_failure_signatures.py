from grape_lightning.diagnostics import entropy_collapse, failure_flags, kl_runaway, no_clipping, tied_groups


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


def test_missing_metrics_fire_nothing():
    assert all(flag is None for flag in failure_flags({}).values())
