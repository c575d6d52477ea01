"""Small pure RL maths with rlax-style names. Shapes are ``[T, B]`` (time-major)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def truncated_gae(
    r_t: Array,
    v_tm1: Array,
    v_t: Array,
    terminated_t: Array,
    truncated_t: Array,
    gamma: float,
    lambda_: float,
) -> tuple[Array, Array]:
    """GAE that bootstraps on truncation but not on termination.

    Args:
      r_t: rewards ``[T, B]``.
      v_tm1: values of the observations acted on, ``[T, B]``.
      v_t: values of the true next observations (before any auto-reset), ``[T, B]``.
      terminated_t: the episode ended in a terminal state (no bootstrap), ``[T, B]``.
      truncated_t: the episode was cut by a time limit (bootstrap from ``v_t``), ``[T, B]``.

    Returns:
      ``(advantages, value_targets)``, each ``[T, B]``.
    """
    not_term = 1.0 - terminated_t.astype(r_t.dtype)
    not_done = 1.0 - jnp.logical_or(terminated_t, truncated_t).astype(r_t.dtype)
    delta = r_t + gamma * not_term * v_t - v_tm1
    # The trace is cut at every episode end; the next step belongs to a new episode.
    decay = gamma * lambda_ * not_done

    def backward(acc, xs):
        d, k = xs
        acc = d + k * acc
        return acc, acc

    _, adv = jax.lax.scan(backward, jnp.zeros_like(delta[0]), (delta, decay), reverse=True)
    return adv, adv + v_tm1


def normalise(x: Array, eps: float = 1e-8) -> Array:
    """Zero mean, unit standard deviation over all elements."""
    return (x - x.mean()) / (x.std() + eps)


def episode_returns(running: Array, reward: Array, done: Array) -> tuple[Array, tuple[Array, Array]]:
    """Per-env running returns after one step, and (sum, count) of the episodes it finished."""
    running = running + reward
    finished = (jnp.sum(jnp.where(done, running, 0.0)), jnp.sum(done))
    return jnp.where(done, 0.0, running), finished


class RunningStats(NamedTuple):
    """Running mean and variance of a stream of batches (per feature)."""

    count: Array
    """Samples seen so far (float32 scalar)."""
    mean: Array
    """Mean over every sample seen, shape ``[*feature_shape]``."""
    var: Array
    """Population variance over every sample seen (1 before any sample)."""


def running_stats_init(shape: tuple[int, ...]) -> RunningStats:
    """No samples yet: mean 0 and variance 1, so normalising is the identity."""
    return RunningStats(jnp.zeros((), jnp.float32), jnp.zeros(shape, jnp.float32),
                        jnp.ones(shape, jnp.float32))


def running_stats_update(stats: RunningStats, batch: Array) -> RunningStats:
    """Folds ``batch`` (``[N, *feature_shape]``) into ``stats`` with the parallel-variance
    combination of Chan et al. (1979): exact for any split of the stream into batches."""
    x = batch.astype(jnp.float32)
    n_b = jnp.float32(x.shape[0])
    mean_b = jnp.mean(x, axis=0)
    m2_b = jnp.sum(jnp.square(x - mean_b), axis=0)
    n = stats.count + n_b
    delta = mean_b - stats.mean
    mean = stats.mean + delta * (n_b / n)
    # stats.var * count is the old sum of squared deviations; 0 * 1 before any sample.
    m2 = stats.var * stats.count + m2_b + jnp.square(delta) * (stats.count * n_b / n)
    return RunningStats(n, mean, m2 / n)


def normalise_obs(stats: RunningStats, obs: Array, clip: float = 10.0,
                  eps: float = 1e-8) -> Array:
    """``(obs - mean) / std``, clipped to ``[-clip, clip]`` so that a feature that was
    constant so far cannot blow up when it first moves."""
    z = (obs.astype(jnp.float32) - stats.mean) / jnp.sqrt(stats.var + eps)
    return jnp.clip(z, -clip, clip)
