"""Shared type aliases and NamedTuples used across families and the harness."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

PRNGKey = jax.Array
PyTree = Any
Array = jax.Array


class Transition(NamedTuple):
    """One environment step of a vectorised rollout; leaves are ``[T, B, ...]`` after a scan.

    ``final_obs`` is the true next observation (before any auto-reset), so a value target can
    bootstrap on truncation; ``obs`` of the next step is already the reset observation.
    """

    obs: Array
    action: Array
    log_prob: Array
    value: Array
    reward: Array
    terminated: Array
    truncated: Array
    final_obs: Array


class Metrics(NamedTuple):
    """What one training run reports per update (leaves ``[num_updates]``)."""

    returns_sum: Array
    """Sum of the returns of the episodes that finished during the update."""
    episodes: Array
    """How many episodes finished during the update (sums over counts give exact means)."""
    loss: Array
    """Mean loss of the update; a non-finite loss marks the run failed."""
    aux: Array
    """A family-specific diagnostic: the mean drift (drift), the mean Q(s, a) (td_loss)."""
    traces: Any = None
    """Optional named scalars per update, e.g. the meta-gradient family's adapted
    ``{"gamma": ..., "lambda": ...}``; recorded per run and plotted on submission pages."""
