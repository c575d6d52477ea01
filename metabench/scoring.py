"""Scoring: return normalisation and rliable aggregates with reproducible CIs.

The leaderboard reports, for each learned update rule, aggregate metrics
(IQM, mean, median, optimality gap) over a ``[runs, envs]`` matrix of
normalised scores, each with a stratified-bootstrap confidence interval, plus
the probability of improvement between two rules.  A record's statistics come from
rliable's public API so numbers are comparable with the wider literature; the site's
pairwise P(X > Y), performance profiles and learning-curve IQMs are computed here too, by
faster exact counterparts of the same estimators (the last section): this is the one
module where statistics are computed.

Conventions:

* A score is ``(R - random) / (reference - random)``: 0 is a uniformly random
  policy, 1 is the reference agent.
* A failed run is never dropped; it scores the floor ``SCORE_FLOOR`` = -1, and every
  completed score is clipped below at the same floor (see ``floor_scores``), so a failed
  run ranks at or below every completed run of its env. Dropping failures would reward
  rules that crash on hard seeds; flooring them at 0 would rank a crash above a rule that
  trains below random.
* Bootstrap CIs are reproducible from ``seed`` alone and leave the caller's
  global numpy RNG untouched.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from rliable import library as rly
from rliable import metrics

__all__ = [
    "AGGREGATES",
    "Interval",
    "SCORE_FLOOR",
    "aggregate_functions",
    "aggregates",
    "final_window_return",
    "floor_scores",
    "nan_iqm",
    "score_matrix",
    "normalise",
    "performance_profile",
    "poi_interval",
    "poi_point",
    "probability_of_improvement",
]

AGGREGATES: tuple[str, ...] = ("iqm", "mean", "median", "optimality_gap")

SCORE_FLOOR: float = -1.0
"""The lowest score a run can count for, and the score of a failed run: as far below the
random policy as the reference is above it. Completed runs below it are clipped to it (the
scale says nothing finer down there, and it keeps one crashed seed from costing more than
the worst completed one)."""


class Interval(NamedTuple):
    """A point estimate with the bounds of its confidence interval."""

    point: float
    lo: float
    hi: float

    def to_dict(self) -> dict:
        # Plain floats so the result serialises to JSON without numpy types.
        return {"point": float(self.point), "lo": float(self.lo), "hi": float(self.hi)}


# --------------------------------------------------------------------------
# Normalisation and failure handling
# --------------------------------------------------------------------------


def normalise(returns, random: float, reference: float) -> np.ndarray:
    """Map raw returns to ``(R - random) / (reference - random)`` elementwise."""
    span = float(reference) - float(random)
    if span == 0.0:
        raise ValueError(
            f"cannot normalise: reference return ({reference}) equals random "
            f"return ({random}), so the normalising span is zero"
        )
    return (np.asarray(returns, dtype=np.float64) - float(random)) / span


def floor_scores(scores: np.ndarray, ok: np.ndarray, floor: float = SCORE_FLOOR) -> np.ndarray:
    """Return a copy of ``scores`` with failed runs at ``floor`` and the others clipped
    below at it.

    A run counts as failed when ``ok`` is False or its score is non-finite. Failed runs are
    never dropped: removing them would shrink the sample and bias every aggregate upwards
    for rules that fail often. Clipping completed runs at the same floor makes a failure
    rank at or below every completed run, however far below random that run trained.
    """
    out = np.array(scores, dtype=np.float64, copy=True)
    ok = np.asarray(ok, dtype=bool)
    if ok.shape != out.shape:
        raise ValueError(f"ok has shape {ok.shape} but scores has shape {out.shape}")
    failed = ~ok | ~np.isfinite(out)
    out[failed] = float(floor)
    np.maximum(out, float(floor), out=out)
    return out


def score_matrix(envs: Sequence[Any], seeds: Sequence[Any],
                 scores: Iterable[tuple[Any, Any, float | None]]) -> np.ndarray:
    """``[seeds, envs]`` normalised scores, rows and columns in the given orders: each
    ``(env, seed, score)`` fills its cell; a failed run (score None) or one that never
    reported scores the floor, and completed runs are clipped below at it
    (:func:`floor_scores`). The one score matrix of a record: the harness aggregates it and
    the site re-checks the stored aggregates with it."""
    col = {e: j for j, e in enumerate(envs)}
    row = {s: i for i, s in enumerate(seeds)}
    mat = np.full((len(seeds), len(envs)), np.nan)
    for env, seed, score in scores:
        if env in col and seed in row and score is not None:
            mat[row[seed], col[env]] = score
    return floor_scores(mat, np.isfinite(mat))


def final_window_return(
    returns_sum: np.ndarray, episodes: np.ndarray, fraction: float = 0.05
) -> float:
    """Mean episodic return over episodes completed in the final updates.

    ``returns_sum[i]`` is the summed return of episodes completed during
    update ``i`` and ``episodes[i]`` their count.  The window is the last
    ``max(1, ceil(fraction * num_updates))`` updates, widened backwards one
    update at a time until it holds at least one completed episode (envs with
    long episodes may complete none near the end).  Returns NaN if no episode
    ever completed.
    """
    returns_sum = np.asarray(returns_sum, dtype=np.float64)
    episodes = np.asarray(episodes, dtype=np.float64)
    if returns_sum.ndim != 1 or returns_sum.shape != episodes.shape:
        raise ValueError(
            "returns_sum and episodes must be 1-D with the same shape, got "
            f"{returns_sum.shape} and {episodes.shape}"
        )
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    num_updates = returns_sum.shape[0]
    if num_updates == 0:
        return float("nan")

    # Rounding first keeps float noise (e.g. 0.07 * 100 = 7.000000000000001)
    # from adding a spurious extra update to the window.
    window = max(1, math.ceil(round(fraction * num_updates, 9)))
    start = num_updates - window
    while start > 0 and episodes[start:].sum() == 0:
        start -= 1
    count = episodes[start:].sum()
    if count == 0:
        return float("nan")
    return float(returns_sum[start:].sum() / count)


# --------------------------------------------------------------------------
# Aggregates with bootstrap confidence intervals
# --------------------------------------------------------------------------


def aggregate_functions() -> dict[str, Callable[[np.ndarray], float]]:
    """Name -> rliable aggregate of a ``[runs, envs]`` score matrix."""
    return {
        "iqm": metrics.aggregate_iqm,
        "mean": metrics.aggregate_mean,
        "median": metrics.aggregate_median,
        # gamma=1: scores beyond the reference agent earn no further credit.
        "optimality_gap": lambda s: metrics.aggregate_optimality_gap(s, gamma=1),
    }


@contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    # rliable 1.2.0 ignores `random_state` when drawing bootstrap indices and
    # samples from the global np.random instead, so seeding that is the only
    # way to make CIs reproducible.  Restoring the state afterwards keeps the
    # caller's own random stream undisturbed.
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def _check_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [runs, envs] matrix, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least one run and one env, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains non-finite values (NaN/inf); failed runs must be "
            "floored with floor_scores before aggregating"
        )
    return arr


def _check_bootstrap(reps: int, confidence: float) -> None:
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def aggregates(
    scores: np.ndarray, reps: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Interval]:
    """Point estimate and stratified-bootstrap CI for each of ``AGGREGATES``.

    ``scores`` is a ``[runs, envs]`` matrix of normalised scores.  Runs are
    resampled within each env (rliable's stratified bootstrap); the CI is the
    percentile interval at level ``confidence``.
    """
    arr = _check_scores(scores)
    _check_bootstrap(reps, confidence)
    funcs = aggregate_functions()

    # One bootstrap for all metrics: the resampled indices do not depend on
    # the statistic, so each row matches a single-metric call with this seed.
    def all_metrics(s: np.ndarray) -> np.ndarray:
        return np.array([funcs[name](s) for name in AGGREGATES])

    with _seeded_global_rng(seed):
        points, intervals = rly.get_interval_estimates(
            {"scores": arr},
            all_metrics,
            reps=reps,
            confidence_interval_size=confidence,
        )
    point, ci = points["scores"], intervals["scores"]
    return {
        name: Interval(float(point[i]), float(ci[0, i]), float(ci[1, i]))
        for i, name in enumerate(AGGREGATES)
    }


def probability_of_improvement(
    x: np.ndarray,
    y: np.ndarray,
    reps: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """P(X > Y) averaged over envs, with rliable's paired stratified bootstrap CI.

    ``x`` and ``y`` are ``[runs, envs]`` score matrices over the same envs;
    their run counts may differ.  Each is resampled independently within env.
    """
    xa = _check_scores(x, "x")
    ya = _check_scores(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(
            f"x and y must cover the same envs, got {xa.shape[1]} and {ya.shape[1]}"
        )
    _check_bootstrap(reps, confidence)

    with _seeded_global_rng(seed):
        points, intervals = rly.get_interval_estimates(
            {"pair": (xa, ya)},
            metrics.probability_of_improvement,
            reps=reps,
            confidence_interval_size=confidence,
        )
    ci = np.asarray(intervals["pair"]).reshape(-1)
    return Interval(float(points["pair"]), float(ci[0]), float(ci[1]))


# --- the site's statistics: exact counterparts of rliable's, fast enough for every pair -------
# A leaderboard compares every submission with every other and draws profiles; rliable's
# resampling loops are too slow for that. These compute the same estimators (P(X > Y) equals
# rliable's exactly; the bootstraps are stratified within env like rliable's) from resample
# counts, in a few array operations.


def _percentiles(boot: np.ndarray, axis: int = 0, confidence: float = 0.95
                 ) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(boot, [tail, 100 - tail], axis=axis)
    return lo, hi


def _resample_counts(n: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``[reps, n]``: how often each of n runs appears in each bootstrap resample (n draws
    with replacement). Counts let a whole bootstrap be a few array operations."""
    draws = rng.integers(0, n, size=(reps, n)) + (np.arange(reps) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=reps * n).reshape(reps, n).astype(np.float64)


def _win_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[nx, ny]``: 1 where x_i > y_j, 1/2 on ties (the Mann-Whitney U kernel)."""
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def poi_point(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) averaged over envs; equals ``rliable.metrics.probability_of_improvement``."""
    nx, ny = x.shape[0], y.shape[0]
    per_env = [_win_matrix(x[:, j], y[:, j]).sum() / (nx * ny) for j in range(x.shape[1])]
    return float(np.mean(per_env))


def poi_interval(x: np.ndarray, y: np.ndarray, reps: int,
                 rng: np.random.Generator) -> tuple[float, float, float]:
    """Point and percentile CI of P(X > Y) by a stratified bootstrap: the runs of X and of Y
    are resampled independently within each env. Resamples are run counts, so one bootstrap
    replicate of one env is ``c_x @ W @ c_y`` and all replicates are one matrix product."""
    nx, ny = x.shape[0], y.shape[0]
    boot = np.zeros(reps)
    for j in range(x.shape[1]):
        win = _win_matrix(x[:, j], y[:, j])
        cx, cy = _resample_counts(nx, reps, rng), _resample_counts(ny, reps, rng)
        # einsum rather than @: OpenBLAS's threads cost more than these small products.
        boot += np.einsum("ri,ri->r", np.einsum("ri,ij->rj", cx, win), cy) / (nx * ny)
    lo, hi = _percentiles(boot / x.shape[1])
    return poi_point(x, y), float(lo), float(hi)


def performance_profile(scores: np.ndarray, taus: np.ndarray, reps: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of runs with score > tau (averaged over envs, as rliable does), with a
    stratified-bootstrap percentile band. Returns ``(point, lo, hi)``, each ``[len(taus)]``."""
    n, m = scores.shape
    point = (scores[:, :, None] > taus).mean(axis=0).mean(axis=0)
    boot = np.zeros((reps, len(taus)))
    for j in range(m):
        col = np.sort(scores[:, j])
        counts = _resample_counts(n, reps, rng)
        # Runs above tau are a suffix of the sorted column: a reversed cumulative sum of the
        # counts, read at each tau's position, gives every replicate's count above tau.
        above = np.concatenate([np.cumsum(counts[:, ::-1], axis=1)[:, ::-1],
                                np.zeros((reps, 1))], axis=1)
        boot += above[:, np.searchsorted(col, taus, side="right")] / n
    lo, hi = _percentiles(boot / m, axis=0)
    return point, lo, hi


def nan_iqm(a: np.ndarray) -> np.ndarray:
    """Interquartile mean down axis 0 ignoring NaN (scipy's trim_mean with 25% cut per side,
    applied to each column's finite values). All-NaN columns give NaN."""
    a = np.asarray(a, dtype=np.float64)
    s = np.sort(a, axis=0)  # NaN sorts last
    k = np.isfinite(a).sum(axis=0)
    cut = (k * 0.25).astype(int)
    r = np.arange(a.shape[0])[:, None]
    keep = (r >= cut) & (r < k - cut)
    cnt = keep.sum(axis=0)
    tot = np.where(keep, s, 0.0).sum(axis=0)
    out = np.full(a.shape[1], np.nan)
    np.divide(tot, cnt, out=out, where=cnt > 0)
    return out
