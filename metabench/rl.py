"""Small pure RL maths with rlax-style names. Shapes are ``[T, B]`` (time-major)."""

from __future__ import annotations

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
