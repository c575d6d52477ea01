"""The gymnax backend: every gymnax environment as ``gymnax/<Name>``.

gymnax 1.0's ``step`` already returns ``terminated`` and ``truncated`` separately, auto-resets,
and puts the pre-reset observation in ``info["final_observation"]``. One thing differs from
the contract every family relies on (:mod:`metabench.envs.conformance`): gymnax computes
``truncated`` from the time limit alone, so an episode whose real termination falls on its
limit step comes back terminated *and* truncated (on CartPole with a 30-step limit, about one
end in nine of those reaching the limit), and a family that bootstraps truncated steps would
bootstrap through a terminal state. The adapter reports such an end as terminated only.

It also adds what the harness needs: validated parameter overrides, and the parameters some
envs derive from others (CartPole's ``polemass_length = masspole * length`` and ``total_mass =
masscart + masspole``, which gymnax caches), recomputed after every override or sample so that
a sampled pole length really changes the dynamics. Derived parameters cannot be set
themselves: a task that sets one gets an error naming it and the parameters it comes from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gymnax
import jax.numpy as jnp

from metabench.envs.api import Env
from metabench.envs.registry import EnvEntry, register


def _cartpole_derived(p: Any) -> Any:
    return p.replace(total_mass=p.masscart + p.masspole, polemass_length=p.masspole * p.length)


# Fields that gymnax caches from others; recomputed after every override or sample.
_DERIVED: dict[str, Callable[[Any], Any]] = {"CartPole-v1": _cartpole_derived}
# Each derived field and what it is derived from (in the words of the error a task gets).
DERIVED_FIELDS: dict[str, dict[str, str]] = {
    "CartPole-v1": {"polemass_length": "masspole * length",
                    "total_mass": "masscart + masspole"},
}

# Building these downloads data, which an offline machine cannot do.
_NEEDS_DOWNLOAD = {"MNISTBandit-bsuite": "downloads MNIST when built"}


class GymnaxEnv(Env):
    """Functional adapter: ``reset(key, params)`` and ``step(key, state, action, params)``.

    ``step`` returns ``(obs, state, reward, terminated, truncated, info)`` with
    ``info["final_observation"]`` the observation before the auto-reset.
    """

    jittable = True

    def __init__(self, name: str, env: Any):
        self.name = name
        self.id = f"gymnax/{name}"
        self._env = env
        self._derive = _DERIVED.get(name, lambda p: p)
        self.derived_params = dict(DERIVED_FIELDS.get(name, {}))
        """``{field: formula}``: fields computed from others, which a task cannot set."""

    @property
    def default_params(self) -> Any:
        return self._derive(self._env.default_params)

    def finalise_params(self, params: Any) -> Any:
        """Recomputes derived fields after params were overridden or sampled (jittable)."""
        return self._derive(params)

    def reset(self, key, params):
        return self._env.reset(key, params)

    def step(self, key, state, action, params):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action,
                                                                          params)
        # A real termination on the limit step is terminated only: it must not bootstrap.
        truncated = jnp.logical_and(truncated, jnp.logical_not(terminated))
        return obs, state, reward, terminated, truncated, {**info, "truncated": truncated}

    def observation_space(self, params):
        return self._env.observation_space(params)

    def action_space(self, params):
        return self._env.action_space(params)

    def __repr__(self) -> str:
        return f"GymnaxEnv({self.name!r})"


def check_not_derived(env_id: str, names: Any, derived: dict[str, str]) -> None:
    """Raises ValueError naming the first of ``names`` that is a derived parameter."""
    for name in sorted(names):
        if name in derived:
            raise ValueError(
                f"{env_id}: {name} is derived ({name} = {derived[name]}) and recomputed "
                f"whenever the parameters change, so it cannot be set; set "
                f"{' and '.join(_sources(derived[name]))} instead")


def _sources(formula: str) -> list[str]:
    return [w for w in formula.replace("*", " ").replace("+", " ").split()]


def override_params(env_id: str, params: Any, overrides: dict[str, Any],
                    derived: dict[str, str] | None = None) -> Any:
    """``params.replace(**overrides)`` with an error naming unknown or derived fields."""
    fields = {f.name for f in dataclasses.fields(params)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"{env_id} has no parameter(s) {', '.join(unknown)}; "
            f"its parameters are: {', '.join(sorted(set(fields) - set(derived or {})))}"
        )
    check_not_derived(env_id, overrides, derived or {})
    cast = {}
    for k, v in overrides.items():
        default = getattr(params, k)
        cast[k] = jnp.asarray(v, dtype=jnp.asarray(default).dtype) if not isinstance(v, jnp.ndarray) else v
    return params.replace(**cast)


def _factory(name: str) -> Callable[..., tuple[GymnaxEnv, Any]]:
    def make(**overrides: Any) -> tuple[GymnaxEnv, Any]:
        raw, _ = gymnax.make(name)
        env = GymnaxEnv(name, raw)
        params = env.default_params
        if overrides:
            params = env.finalise_params(override_params(env.id, params, overrides,
                                                         env.derived_params))
        return env, params

    return make


for _name in gymnax.registered_envs:
    register(
        EnvEntry(
            id=f"gymnax/{_name}",
            factory=_factory(_name),
            jittable=True,
            note=_NEEDS_DOWNLOAD.get(_name, ""),
            offline=_name not in _NEEDS_DOWNLOAD,
        ),
        overwrite=True,
    )
