"""Distributions over environment parameters, sampled per seed inside the jitted train.

A task's env entry may give each parameter a constant or one of::

    length: {uniform: [0.4, 0.8]}        # U(lo, hi)
    gravity: {loguniform: [5.0, 20.0]}   # exp(U(log lo, log hi))
    max_steps_in_episode: {choice: [200, 500]}

so that a test set can be "the same game with shifted dynamics".

A distribution over an integer parameter (``level_seed``, ``max_steps_in_episode``) draws
integers from the closed range ``[lo, hi]``, both ends included: ``uniform`` draws each integer
with probability ``1 / (hi - lo + 1)``, ``loguniform`` draws ``floor(exp(U(log lo,
log(hi + 1))))``, and ``choice`` draws one of the listed values. Its bounds must then be
integers (``uniform: [0.5, 3]`` over an integer parameter is an error, not a rounding).
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

    def sample(self, key: jax.Array, dtype: Any = None) -> jax.Array:
        """One draw; over the closed range ``[lo, hi]`` of integers when ``dtype`` is an
        integer dtype (see the module docstring), else a float."""
        integer = dtype is not None and jnp.issubdtype(dtype, jnp.integer)
        if integer and self.kind in ("uniform", "loguniform"):
            lo, hi = self.values
            if lo != int(lo) or hi != int(hi):
                raise ValueError(f"{self.kind} over an integer parameter needs integer bounds, "
                                 f"got {list(self.values)}")
            lo, hi = int(lo), int(hi)
            info = jnp.iinfo(dtype)
            if lo < info.min or hi > info.max:
                raise ValueError(f"{self.kind} bounds {[lo, hi]} do not fit {jnp.dtype(dtype)}")
            if self.kind == "uniform":
                # randint's upper bound is exclusive; hi + 1 may exceed the dtype (randint
                # then still reaches the dtype's maximum).
                return jax.random.randint(key, (), lo, hi + 1, dtype=dtype)
            x = jnp.exp(jax.random.uniform(key, minval=math.log(lo), maxval=math.log(hi + 1)))
            return jnp.clip(jnp.floor(x), lo, hi).astype(dtype)
        if self.kind == "constant":
            out = jnp.asarray(self.values[0])
        elif self.kind == "uniform":
            out = jax.random.uniform(key, minval=self.values[0], maxval=self.values[1])
        elif self.kind == "loguniform":
            lo, hi = math.log(self.values[0]), math.log(self.values[1])
            out = jnp.exp(jax.random.uniform(key, minval=lo, maxval=hi))
        else:
            out = jax.random.choice(key, jnp.asarray(self.values))
        return out if dtype is None else out.astype(dtype)

    def to_json(self) -> Any:
        return self.values[0] if self.kind == "constant" else {self.kind: list(self.values)}


def make_param_sampler(
    env: Any, base_params: Any, dists: Mapping[str, ParamDistribution]
) -> Callable[[jax.Array], Any]:
    """``key -> env_params``: base params with each distributed field drawn, dtypes kept
    (integers over the closed range, see the module docstring). A field the env derives from
    others (``env.derived_params``) cannot be drawn: ValueError names it."""
    names = sorted(dists)
    derived = getattr(env, "derived_params", {})
    env_id = getattr(env, "id", type(env).__name__)
    for name in names:
        if name in derived:
            raise ValueError(f"{env_id}: {name} is derived ({name} = {derived[name]}) and "
                             f"recomputed whenever the parameters change, so it cannot be "
                             f"drawn; draw the parameters it comes from instead")
        dtype = jnp.asarray(getattr(base_params, name)).dtype
        dists[name].sample(jax.random.PRNGKey(0), dtype)  # bad bounds fail here, not in jit

    def sample(key: jax.Array) -> Any:
        if not names:
            return base_params
        keys = jax.random.split(key, len(names))
        drawn = {}
        for k, name in zip(keys, names):
            dtype = jnp.asarray(getattr(base_params, name)).dtype
            drawn[name] = dists[name].sample(k, dtype)
        return env.finalise_params(base_params.replace(**drawn))

    return sample
