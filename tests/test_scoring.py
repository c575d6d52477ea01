"""Tests for metabench.scoring: normalisation, aggregates, CIs, windows, floors."""

import math

import numpy as np
import pytest
import scipy.stats
from rliable import library as rly
from rliable import metrics

from metabench import scoring
from metabench.scoring import (
    AGGREGATES,
    Interval,
    aggregate_functions,
    aggregates,
    SCORE_FLOOR,
    final_window_return,
    floor_scores,
    normalise,
    probability_of_improvement,
)

REPS = 300


@pytest.fixture
def scores() -> np.ndarray:
    # Three envs so the median of env means differs from their mean, and a
    # shift so some scores exceed 1 and the optimality-gap clip matters.
    return np.random.default_rng(3).normal(loc=0.8, scale=0.6, size=(16, 3))


def _global_state_equal(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


# ---------------------------------------------------------------- normalise


def test_normalise_hand_values():
    out = normalise([10, 60, 110, 210], random=10, reference=110)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 2.0])
    assert out.dtype == np.float64


def test_normalise_negative_span_and_matrix_shape():
    # Reward-as-cost envs may have reference below random; sign must carry.
    out = normalise(np.array([[-100.0, -50.0], [0.0, -150.0]]), random=-100, reference=0)
    np.testing.assert_allclose(out, [[0.0, 0.5], [1.0, -0.5]])


def test_normalise_rejects_zero_span():
    with pytest.raises(ValueError, match="equals random"):
        normalise([1.0, 2.0], random=5.0, reference=5.0)


# --------------------------------------------------------------- aggregates


def test_aggregate_names_and_functions():
    assert AGGREGATES == ("iqm", "mean", "median", "optimality_gap")
    assert set(aggregate_functions()) == set(AGGREGATES)


def test_aggregate_points_match_hand_formulas(scores):
    res = aggregates(scores, reps=REPS)
    assert set(res) == set(AGGREGATES)
    env_means = scores.mean(axis=0)
    assert res["iqm"].point == pytest.approx(scipy.stats.trim_mean(scores.ravel(), 0.25))
    assert res["mean"].point == pytest.approx(env_means.mean())
    assert res["median"].point == pytest.approx(np.median(env_means))
    assert res["optimality_gap"].point == pytest.approx(1.0 - np.minimum(scores, 1.0).mean())
    # Guard that the fixture actually distinguishes the metrics.
    assert res["median"].point != pytest.approx(res["mean"].point)
    assert res["optimality_gap"].point != pytest.approx(1.0 - res["mean"].point)


def test_aggregate_iqm_matches_rliable_directly(scores):
    seed = 7
    res = aggregates(scores, reps=REPS, seed=seed)
    np.random.seed(seed)
    points, cis = rly.get_interval_estimates(
        {"a": scores}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=REPS
    )
    assert res["iqm"].point == pytest.approx(points["a"][0], rel=1e-12)
    assert res["iqm"].lo == pytest.approx(cis["a"][0, 0], rel=1e-12)
    assert res["iqm"].hi == pytest.approx(cis["a"][1, 0], rel=1e-12)


def test_aggregate_intervals_bracket_point(scores):
    for name, iv in aggregates(scores, reps=REPS).items():
        assert isinstance(iv, Interval)
        assert iv.lo <= iv.point <= iv.hi, name
        assert iv.lo < iv.hi, name


def test_confidence_level_changes_width(scores):
    wide = aggregates(scores, reps=REPS, confidence=0.95)["mean"]
    narrow = aggregates(scores, reps=REPS, confidence=0.5)["mean"]
    assert narrow.hi - narrow.lo < wide.hi - wide.lo


def test_aggregates_reproducible_regardless_of_global_state(scores):
    np.random.seed(123)
    first = aggregates(scores, reps=REPS, seed=5)
    np.random.seed(999)
    np.random.random(17)
    second = aggregates(scores, reps=REPS, seed=5)
    assert first == second


def test_aggregates_different_seed_changes_ci(scores):
    a = aggregates(scores, reps=REPS, seed=0)
    b = aggregates(scores, reps=REPS, seed=1)
    assert a["iqm"].point == b["iqm"].point
    assert (a["iqm"].lo, a["iqm"].hi) != (b["iqm"].lo, b["iqm"].hi)


def test_aggregates_preserves_global_rng_state(scores):
    np.random.seed(42)
    before = np.random.get_state()
    aggregates(scores, reps=REPS, seed=3)
    assert _global_state_equal(before, np.random.get_state())
    # And the caller's stream continues as if nothing had happened.
    np.random.seed(42)
    expected = np.random.random(3)
    np.random.seed(42)
    aggregates(scores, reps=REPS, seed=3)
    np.testing.assert_array_equal(np.random.random(3), expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_aggregates_rejects_non_finite(scores, bad):
    scores = scores.copy()
    scores[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite|NaN"):
        aggregates(scores, reps=REPS)


def test_aggregates_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        aggregates(np.ones(5), reps=REPS)
    with pytest.raises(ValueError, match="at least one run"):
        aggregates(np.ones((0, 3)), reps=REPS)


def test_interval_to_dict_plain_floats():
    d = Interval(np.float32(0.5), np.float64(0.25), 1).to_dict()
    assert d == {"point": 0.5, "lo": 0.25, "hi": 1.0}
    assert all(type(v) is float for v in d.values())


# ------------------------------------------------ probability of improvement


def test_poi_uniformly_better_is_certain(scores):
    iv = probability_of_improvement(scores + 100.0, scores, reps=REPS)
    assert iv == Interval(1.0, 1.0, 1.0)
    iv = probability_of_improvement(scores, scores + 100.0, reps=REPS)
    assert iv == Interval(0.0, 0.0, 0.0)


def test_poi_identical_is_half(scores):
    iv = probability_of_improvement(scores, scores, reps=REPS)
    assert iv.point == 0.5
    assert iv.lo <= 0.5 <= iv.hi


def test_poi_matches_rliable(scores):
    rng = np.random.default_rng(11)
    x = scores
    y = scores[:10] + rng.normal(scale=0.3, size=(10, 3))  # run counts differ
    seed = 4
    iv = probability_of_improvement(x, y, reps=REPS, seed=seed)
    assert iv.point == pytest.approx(metrics.probability_of_improvement(x, y))
    np.random.seed(seed)
    points, cis = rly.get_interval_estimates(
        {"pair": (x, y)}, metrics.probability_of_improvement, reps=REPS
    )
    assert iv.point == pytest.approx(float(points["pair"]))
    assert iv.lo == pytest.approx(float(np.ravel(cis["pair"])[0]))
    assert iv.hi == pytest.approx(float(np.ravel(cis["pair"])[1]))
    assert 0.0 < iv.lo < iv.point < iv.hi < 1.0


def test_poi_reproducible_and_preserves_global_rng(scores):
    y = scores[::-1] * 0.9
    np.random.seed(8)
    before = np.random.get_state()
    a = probability_of_improvement(scores, y, reps=REPS, seed=2)
    assert _global_state_equal(before, np.random.get_state())
    np.random.random(5)
    assert probability_of_improvement(scores, y, reps=REPS, seed=2) == a


def test_poi_rejects_env_mismatch_and_nan(scores):
    with pytest.raises(ValueError, match="same envs"):
        probability_of_improvement(scores, scores[:, :2], reps=REPS)
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        probability_of_improvement(scores, bad, reps=REPS)


# ------------------------------------------------------ final_window_return


def _updates(n: int, events: dict[int, tuple[float, int]]):
    returns_sum = np.zeros(n)
    episodes = np.zeros(n, dtype=np.int64)
    for i, (ret, count) in events.items():
        returns_sum[i], episodes[i] = ret, count
    return returns_sum, episodes


def test_final_window_uses_last_five_percent():
    # 100 updates -> window is updates 95..99; update 10 and 94 fall outside.
    r, e = _updates(100, {10: (1000.0, 5), 94: (500.0, 1), 96: (30.0, 2), 99: (60.0, 1)})
    assert final_window_return(r, e) == pytest.approx((30.0 + 60.0) / 3)


def test_final_window_is_at_least_one_update():
    # ceil(0.05 * 10) = 1: only the last update counts.
    r, e = _updates(10, {8: (100.0, 1), 9: (7.0, 2)})
    assert final_window_return(r, e) == pytest.approx(3.5)


def test_final_window_ignores_float_noise_in_fraction():
    # 0.07 * 100 == 7.000000000000001; the window must be 7 updates, not 8.
    r, e = _updates(100, {92: (1000.0, 1), 93: (10.0, 1)})
    assert final_window_return(r, e, fraction=0.07) == pytest.approx(10.0)


def test_final_window_widens_until_an_episode_completes():
    # Nothing in 95..99; widening stops at update 90, before reaching 20.
    r, e = _updates(100, {20: (1000.0, 1), 90: (50.0, 2)})
    assert final_window_return(r, e) == pytest.approx(25.0)


def test_final_window_nan_when_no_episode_ever():
    r, e = _updates(100, {})
    assert math.isnan(final_window_return(r, e))


def test_final_window_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        final_window_return(np.zeros(5), np.zeros(4))


# ------------------------------------------------------------ floor_scores


def test_floor_scores_sets_failed_and_nan_entries():
    s = np.array([[0.5, np.nan], [1.2, -0.3], [np.inf, 0.9]])
    ok = np.array([[True, True], [False, True], [True, True]])
    out = floor_scores(s, ok, floor=-1.0)
    np.testing.assert_array_equal(out, [[0.5, -1.0], [-1.0, -0.3], [-1.0, 0.9]])
    # Input untouched; shape kept (failed runs are never dropped).
    assert np.isnan(s[0, 1]) and s[1, 0] == 1.2
    assert out.shape == s.shape


def test_the_default_floor_is_minus_one_and_clips_completed_runs():
    # A failure scores -1 and a completed run 1.5 gaps below random is clipped to -1, so a
    # crash never outranks a completed run; runs above the floor are kept as they are.
    s = np.array([[np.nan, 1.0], [-1.5, -0.7]])
    out = floor_scores(s, np.array([[False, True], [True, True]]))
    np.testing.assert_array_equal(out, [[-1.0, 1.0], [-1.0, -0.7]])
    assert SCORE_FLOOR == -1.0
    assert aggregates(out, reps=50)["mean"].point == pytest.approx((-1 + 1 - 1 - 0.7) / 4)


def test_a_failed_run_ranks_at_or_below_every_completed_run_of_its_env():
    below_random = np.array([[-0.7], [-0.4], [-3.0], [0.1]])   # completes, trains badly
    crashes = np.array([[np.nan], [0.9], [0.9], [0.9]])        # one seed fails
    ok = np.isfinite(crashes)
    a = floor_scores(below_random, np.ones_like(ok))
    b = floor_scores(crashes, ok)
    assert b.min() <= a.min()
    assert b[0, 0] == SCORE_FLOOR and a[2, 0] == SCORE_FLOOR


def test_floor_scores_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        floor_scores(np.zeros((2, 2)), np.ones(2, dtype=bool))


def test_module_exports():
    assert set(scoring.__all__) >= {
        "Interval", "AGGREGATES", "normalise", "aggregate_functions", "aggregates",
        "probability_of_improvement", "final_window_return", "floor_scores",
    }
