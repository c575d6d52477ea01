"""Distributions over environment parameters, sampled per seed inside the jitted train.

A task's env entry may give each parameter a constant or one of::

    length: {uniform: [0.4, 0.8]}        # U(lo, hi)
    gravity: {loguniform: [5.0, 20.0]}   # exp(U(log lo, log hi))
    max_steps_in_episode: {choice: [200, 500]}

so that a test set can be "the same game with shifted dynamics".
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

KINDS = ("uniform", "loguniform", "choice")


class ParamDistribution(NamedTuple):
    """One parameter's distribution: ``kind`` in KINDS or ``"constant"``, and its values."""

    kind: str
    values: tuple[Any, ...]

    @staticmethod
    def parse(value: Any) -> "ParamDistribution":
        """Parses a spec value; raises ValueError saying what was expected."""
        if isinstance(value, (bool, str)):
            # Static options (a physics backend, a vectorisation mode, a gymnasium flag) are
            # passed to the env's factory as they are; they cannot be drawn per seed.
            return ParamDistribution("constant", (value,))
        if not isinstance(value, (int, float, Mapping)):
            raise ValueError(
                f"expected a number, a string, a boolean or one of "
                f"{{{', '.join(k + ': [...]' for k in KINDS)}}}, got {value!r}"
            )
        if not isinstance(value, Mapping):
            return ParamDistribution("constant", (float(value),))
        if len(value) != 1 or next(iter(value)) not in KINDS:
            raise ValueError(f"expected exactly one of {', '.join(KINDS)}, got keys {sorted(value)}")
        kind, args = next(iter(value.items()))
        if not isinstance(args, (list, tuple)) or not args or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
        ):
            raise ValueError(f"{kind} expects a list of numbers, got {args!r}")
        args = tuple(float(a) for a in args)
        if kind in ("uniform", "loguniform"):
            if len(args) != 2 or not args[0] < args[1]:
                raise ValueError(f"{kind} expects [lo, hi] with lo < hi, got {list(args)}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"loguniform expects lo > 0, got {args[0]}")
        return ParamDistribution(kind, args)

    def sample(self, key: jax.Array) -> jax.Array:
        if self.kind == "constant":
            return jnp.asarray(self.values[0])
        if self.kind == "uniform":
            return jax.random.uniform(key, minval=self.values[0], maxval=self.values[1])
        if self.kind == "loguniform":
            lo, hi = math.log(self.values[0]), math.log(self.values[1])
            return jnp.exp(jax.random.uniform(key, minval=lo, maxval=hi))
        return jax.random.choice(key, jnp.asarray(self.values))

    def to_json(self) -> Any:
        return self.values[0] if self.kind == "constant" else {self.kind: list(self.values)}


def make_param_sampler(
    env: Any, base_params: Any, dists: Mapping[str, ParamDistribution]
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
            drawn[name] = dists[name].sample(k).astype(dtype)
        return env.finalise_params(base_params.replace(**drawn))

    return sample
