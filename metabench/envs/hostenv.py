"""Host-stepped environments behind the functional, jittable env API.

A host-stepped env (gymnasium, pettingzoo) lives in Python, but the families' train functions
are single compiled programs that call ``env.reset``/``env.step`` inside ``vmap`` and
``lax.scan``. :class:`HostEnv` bridges the two with ``jax.pure_callback`` and
``vmap_method="broadcast_all"``: under the families' ``vmap`` over env copies and seeds, one
training step makes **one** host call carrying every copy's action, so the host can step its
vectorised envs together, and the acting, the update and the rule stay in the compiled program
(only the environment runs in Python).

The JAX-side env state is a slot number per copy; a :class:`HostPool` maps slots to the live
host environments. ``reset`` allocates fresh slots (seeded from the JAX key), ``step``
advances them, and :meth:`HostEnv.release` closes them all once a training run is over (the
harness calls it after every cell). The ``key`` passed to ``step`` is unused: randomness after
``reset`` is the host env's own, seeded at reset, so a run is reproducible from its keys.

Why ``pure_callback`` and not ``io_callback``: ``io_callback`` is batched by calling the host
once per copy, which would forbid stepping a vector env as a whole. Stepping is not pure, but
every call's inputs depend on the previous call's outputs through the state (which counts
steps), so XLA can neither reorder, merge nor hoist two steps, and a step's outputs are always
used (never removed).
"""

from __future__ import annotations

from metabench.envs.api import Env

import abc
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import spaces


class HostState(NamedTuple):
    """The JAX-side state of one host-stepped env copy."""

    slot: jax.Array
    """int32 handle of the copy in its :class:`HostPool`."""
    t: jax.Array
    """int32 steps taken since reset; an input of every step call, so that no two calls
    look alike to XLA (a call with loop-invariant inputs could otherwise be hoisted)."""


@struct.dataclass
class HostParams:
    """Env params of a host-stepped env: nothing to vmap, only the episode limit (static)."""

    max_steps_in_episode: int = struct.field(pytree_node=False, default=1000)
    """The host env's time limit (for calibration's rollout length)."""


class StepResult(NamedTuple):
    """What a pool returns for a batch of copies (numpy, leading axis = copies)."""

    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_observation: np.ndarray


class HostPool(abc.ABC):
    """Live host environments addressed by integer slots.

    Copies live in containers (a vector env, a game): ``self._where`` maps a slot to its
    ``(container, position)``, and :meth:`_groups` turns a step's slots into the rows of each
    container in position order.
    """

    _where: dict[int, tuple[int, int]]
    _cached: tuple[bytes, dict[int, np.ndarray]] | None = None

    def _groups(self, slots: np.ndarray, size: Callable[[int], int], what: str
                ) -> dict[int, np.ndarray]:
        """``{container: rows of slots}``, every container complete (``size(container)``
        copies). A training run steps the same slots every step, so the grouping is computed
        once and reused while the slots stay the same."""
        key = slots.tobytes()
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        try:
            where = np.array([self._where[int(s)] for s in slots]).reshape(-1, 2)
        except KeyError as e:
            raise RuntimeError(f"{what} copy {e} is not live (released or never reset)")
        groups = {}
        for c in np.unique(where[:, 0]):
            rows = np.flatnonzero(where[:, 0] == c)
            rows = rows[np.argsort(where[rows, 1])]
            if len(rows) != size(int(c)):
                # A container steps all its copies together; a family always steps them all.
                raise RuntimeError(f"a step covered {len(rows)} of a {what} container's "
                                   f"{size(int(c))} copies")
            groups[int(c)] = rows
        self._cached = (key, groups)
        return groups

    @abc.abstractmethod
    def reset(self, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Starts ``len(seeds)`` new copies; returns their slots and first observations."""

    @abc.abstractmethod
    def step(self, slots: np.ndarray, actions: np.ndarray) -> StepResult:
        """Steps the copies ``slots`` (in that order) with ``actions``; auto-resets finished
        episodes, the pre-reset observation going to ``final_observation``."""

    @abc.abstractmethod
    def release(self) -> None:
        """Ends every live copy (a pool may keep the host envs to reuse them)."""

    def close(self) -> None:
        """Releases every copy and frees every host resource."""
        self.release()


def seeds_from_keys(keys: np.ndarray) -> np.ndarray:
    """One non-negative 63-bit seed per raw PRNG key (rows of uint32 words)."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, keys.shape[-1])
    seed = np.zeros(len(keys), dtype=np.uint64)
    for w in range(keys.shape[1]):
        seed = (seed << np.uint64(32)) ^ keys[:, w]
    return (seed & np.uint64(2**63 - 1)).astype(np.int64)


def gymnax_space(space: Any) -> spaces.Space:
    """A gymnax space for a gymnasium ``Discrete`` or ``Box`` (float32 for boxes)."""
    if hasattr(space, "n") and not hasattr(space, "nvec"):
        if int(getattr(space, "start", 0)) != 0:
            raise ValueError(f"Discrete spaces must start at 0, got start={space.start}")
        return spaces.Discrete(int(space.n))
    if hasattr(space, "low") and hasattr(space, "high") and hasattr(space, "shape"):
        return spaces.Box(np.asarray(space.low, np.float32), np.asarray(space.high, np.float32),
                          tuple(space.shape), jnp.float32)
    raise ValueError(f"only Discrete and Box spaces are supported, got {space}")


class HostEnv(Env):
    """The functional env API (gymnax 1.0 style) over a :class:`HostPool`."""

    jittable = False

    def __init__(self, env_id: str, pool: HostPool, observation_space: spaces.Box,
                 action_space: spaces.Space, max_steps_in_episode: int,
                 static_params: tuple[str, ...] = ()):
        self.static_params = tuple(static_params)
        """``make`` keywords this env takes (all fixed when it is built; none is drawn)."""
        self.id = env_id
        self.name = env_id.split("/", 1)[1]
        self.pool = pool
        self._obs_space = observation_space
        self._act_space = action_space
        self._params = HostParams(max_steps_in_episode=int(max_steps_in_episode))
        self._obs_shape = tuple(observation_space.shape)
        discrete = isinstance(action_space, spaces.Discrete)
        self._act_shape = () if discrete else tuple(action_space.shape)
        self._act_dtype = np.int64 if discrete else np.float32

    @property
    def default_params(self) -> HostParams:
        return self._params

    def finalise_params(self, params: HostParams) -> HostParams:
        return params

    def observation_space(self, params) -> spaces.Box:
        return self._obs_space

    def action_space(self, params) -> spaces.Space:
        return self._act_space

    # --- host side: numpy in, numpy out, leading axes = whatever vmap batched -------------

    def _host_reset(self, keys):
        keys = np.asarray(keys)  # callbacks receive jax Arrays
        batch = keys.shape[:-1]
        slots, obs = self.pool.reset(seeds_from_keys(keys))
        return (slots.astype(np.int32).reshape(batch),
                obs.astype(np.float32).reshape(batch + self._obs_shape))

    def _host_step(self, slots, t, actions):
        del t
        slots, actions = np.asarray(slots), np.asarray(actions)
        batch = slots.shape
        n = int(np.prod(batch, dtype=np.int64))
        r = self.pool.step(slots.reshape(n),
                           actions.reshape((n,) + self._act_shape).astype(self._act_dtype))
        obs_shape = batch + self._obs_shape
        return (r.obs.astype(np.float32).reshape(obs_shape),
                r.reward.astype(np.float32).reshape(batch),
                r.terminated.astype(bool).reshape(batch),
                r.truncated.astype(bool).reshape(batch),
                r.final_observation.astype(np.float32).reshape(obs_shape))

    # --- JAX side ---------------------------------------------------------------------------

    def reset(self, key, params):
        del params
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        out = (jax.ShapeDtypeStruct((), jnp.int32),
               jax.ShapeDtypeStruct(self._obs_shape, jnp.float32))
        slot, obs = jax.pure_callback(self._host_reset, out, key,
                                      vmap_method="broadcast_all")
        return obs, HostState(slot, jnp.zeros_like(slot))

    def step(self, key, state: HostState, action, params):
        del key, params  # the host env's own RNG was seeded at reset
        obs = jax.ShapeDtypeStruct(self._obs_shape, jnp.float32)
        flag = jax.ShapeDtypeStruct((), jnp.bool_)
        out = (obs, jax.ShapeDtypeStruct((), jnp.float32), flag, flag, obs)
        obs, reward, term, trunc, final = jax.pure_callback(
            self._host_step, out, state.slot, state.t, action, vmap_method="broadcast_all")
        return obs, HostState(state.slot, state.t + 1), reward, term, trunc, {
            "final_observation": final}

    def release(self) -> None:
        """Ends every copy this adapter started (the next reset starts new ones)."""
        self.pool.release()

    def close(self) -> None:
        """Releases every copy and frees the host envs kept for reuse."""
        self.pool.close()

    def __repr__(self) -> str:
        return f"HostEnv({self.id!r})"
