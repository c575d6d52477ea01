"""The environment contract every backend must meet, as one checker the tests parametrise.

``check(env_id)`` resets and steps ``num_envs`` copies under ``jit`` + ``vmap`` + ``scan``
(exactly how the families drive an env, host-stepped backends included) with random actions,
and asserts the contract: observation shapes and dtypes match the observation space, rewards
are finite scalars per copy, ``terminated`` and ``truncated`` are boolean and separate,
``info["final_observation"]`` has the observation's shape, and the same key reproduces the
same trajectory while another key gives a different one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from metabench.envs.registry import make


class Trajectory(NamedTuple):
    """One conformance rollout, as numpy arrays (``[steps, num_envs, ...]`` after ``obs0``)."""

    obs0: np.ndarray
    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_observation: np.ndarray


def rollout_fn(env: Any, params: Any, num_envs: int, steps: int):
    """``(key, params=params) -> Trajectory``: ``steps`` random-action steps of ``num_envs``
    copies in one jitted scan (compiled once, reused across keys and params of one shape)."""
    space = env.action_space(params)

    @jax.jit
    def run(key, params):
        k_reset, k_run = jax.random.split(key)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_reset, num_envs), params)

        def step(state, key):
            k_act, k_step = jax.random.split(key)
            actions = jax.vmap(space.sample)(jax.random.split(k_act, num_envs))
            obs, state, r, term, trunc, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_step, num_envs), state, actions, params)
            return state, (obs, r, term, trunc, info["final_observation"])

        return obs, jax.lax.scan(step, state, jax.random.split(k_run, steps))[1]

    def rollout(key: jax.Array, params: Any = params) -> Trajectory:
        obs0, rest = run(key, params)
        return Trajectory(np.asarray(obs0), *(np.asarray(x) for x in rest))

    return rollout


def check(env_id: str, num_envs: int = 3, steps: int = 20, seed: int = 0,
          expect_done: bool = False, **params: Any) -> Trajectory:
    """Asserts the env contract for ``env_id`` (see the module docstring); returns the first
    trajectory. ``expect_done`` also requires some copy to finish an episode in ``steps``."""
    env, env_params = make(env_id, **params)
    obs_space = env.observation_space(env_params)
    shape = tuple(obs_space.shape)
    rollout = rollout_fn(env, env_params, num_envs, steps)
    a = rollout(jax.random.PRNGKey(seed))
    where = f"{env_id}:"
    assert a.obs0.shape == (num_envs, *shape), f"{where} reset obs {a.obs0.shape} != {shape}"
    assert a.obs.shape == a.final_observation.shape == (steps, num_envs, *shape), \
        f"{where} step obs {a.obs.shape} / final {a.final_observation.shape} != {shape}"
    space_dtype = np.dtype(getattr(obs_space, "dtype", a.obs.dtype))
    assert a.obs.dtype == a.obs0.dtype, f"{where} reset and step obs dtypes differ"
    assert np.can_cast(a.obs.dtype, space_dtype, "same_kind"), \
        f"{where} obs dtype {a.obs.dtype} does not fit the space's {space_dtype}"
    assert a.reward.shape == a.terminated.shape == a.truncated.shape == (steps, num_envs), \
        f"{where} reward/terminated/truncated must be one scalar per copy"
    assert a.terminated.dtype == a.truncated.dtype == np.bool_, \
        f"{where} terminated/truncated must be bool, got {a.terminated.dtype}/{a.truncated.dtype}"
    assert np.issubdtype(a.reward.dtype, np.floating), f"{where} reward dtype {a.reward.dtype}"
    for name, x in (("obs", a.obs), ("reward", a.reward), ("final_observation",
                                                          a.final_observation)):
        assert np.all(np.isfinite(x.astype(np.float64))), f"{where} non-finite {name}"
    if expect_done:
        assert (a.terminated | a.truncated).any(), f"{where} no episode ended in {steps} steps"
    b = rollout(jax.random.PRNGKey(seed))
    for x, y, name in zip(a, b, Trajectory._fields):
        assert np.array_equal(x, y), f"{where} the same key gave a different {name}"
    c = rollout(jax.random.PRNGKey(seed + 1))
    assert not np.array_equal(a.obs, c.obs), f"{where} another key gave the same observations"
    if hasattr(env, "release"):
        env.release()
    return a
