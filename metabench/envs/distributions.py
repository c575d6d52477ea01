"""Drawing environment parameters per seed inside the jitted train.

A task's env entry may give each parameter a constant or a distribution (the syntax and its
parsing live with the spec, :class:`metabench.tasks.spec.ParamDistribution`)::

    length: {uniform: [0.4, 0.8]}        # U(lo, hi)
    gravity: {loguniform: [5.0, 20.0]}   # exp(U(log lo, log hi))
    max_steps_in_episode: {choice: [200, 500]}

so that a test set can be "the same game with shifted dynamics". This module only needs a
distribution's ``kind`` and ``values``; it imports nothing from the tasks layer above it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp


def draw(dist: Any, key: jax.Array) -> jax.Array:
    """One draw of a parameter distribution (``kind``, ``values``)."""
    if dist.kind == "constant":
        return jnp.asarray(dist.values[0])
    if dist.kind == "uniform":
        return jax.random.uniform(key, minval=dist.values[0], maxval=dist.values[1])
    if dist.kind == "loguniform":
        lo, hi = math.log(dist.values[0]), math.log(dist.values[1])
        return jnp.exp(jax.random.uniform(key, minval=lo, maxval=hi))
    return jax.random.choice(key, jnp.asarray(dist.values))


def make_param_sampler(
    env: Any, base_params: Any, dists: Mapping[str, Any]
) -> Callable[[jax.Array], Any]:
    """``key -> env_params``: base params with each distributed field drawn, dtypes kept."""
    names = sorted(dists)

    def sample(key: jax.Array) -> Any:
        if not names:
            return base_params
        keys = jax.random.split(key, len(names))
        drawn = {}
        for k, name in zip(keys, names):
            dtype = jnp.asarray(getattr(base_params, name)).dtype
            drawn[name] = draw(dists[name], k).astype(dtype)
        return env.finalise_params(base_params.replace(**drawn))

    return sample
