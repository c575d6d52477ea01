"""The brax backend: brax's MuJoCo-style locomotion and control envs as ``brax/<name>``.

Brax envs are pure JAX (``reset(rng) -> State``, ``step(State, action) -> State``) but know
nothing of episodes: ``done`` is a float that means "unhealthy" (a real terminal state), there
is no time limit and no auto-reset. :class:`BraxEnv` adds what the harness needs, in gymnax
1.0's shape: a step counter in the state, truncation at ``max_steps_in_episode`` kept apart
from termination, an auto-reset with a fresh random start, and ``info["final_observation"]``.

Two kinds of options (``make("brax/ant", backend="spring", max_steps_in_episode=1000)``):

- ``max_steps_in_episode`` lives in the env params pytree (:class:`BraxParams`), so a task may
  draw it per seed like any gymnax parameter;
- ``backend``, the physics pipeline (``spring``, ``positional``, ``generalized``, ``mjx``), is
  fixed when the env is built: it changes the traced program, not a number in it. It is
  listed in :attr:`BraxEnv.static_params`, and a task may set it only as a constant.

The default physics is ``spring``, the fastest here. Measured on ``brax/ant`` on a 2-core CPU
(JAX 0.10.2, brax 0.14.2), random actions on 128 copies for 200 steps under one jit + vmap +
scan, median of 3 runs (``metabench bench --backends --env brax/ant``; a second measurement on
the same shared machine differed by up to 20%):

    backend       compile   env steps/s
    spring          9.1 s        20,800
    positional     11.6 s         5,600
    generalized    10.2 s         6,100
    mjx            12.2 s        15,400

The auto-reset computes a fresh start every step and selects it where an episode ended (under
vmap a branch would compute both sides anyway); that costs about 15% of spring ant's env-only
throughput, the price of a new random start per episode (brax's own training wrapper instead
restarts every episode of a copy from that copy's first state).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import spaces

from metabench.envs.api import Env
from metabench.envs.registry import EnvEntry, register

BACKENDS = ("spring", "positional", "generalized", "mjx")
DEFAULT_BACKEND = "spring"

# brax.envs' registry less `fast` (a unit-test toy) and `swimmer` (generalized physics only,
# which would make its id behave unlike the others'); checked against brax in the tests.
NAMES = ("ant", "halfcheetah", "hopper", "humanoid", "humanoidstandup", "inverted_pendulum",
         "inverted_double_pendulum", "pusher", "reacher", "walker2d")


@struct.dataclass
class BraxParams:
    """Env parameters (a pytree, so they can be drawn per seed)."""

    max_steps_in_episode: int = 1000
    """Steps after which an episode that has not terminated is truncated (brax trains with 1000)."""


class BraxState(NamedTuple):
    """The adapter's state: brax's own state and the step count of the current episode."""

    inner: Any
    """``brax.envs.State`` (physics state, observation, reward, done, metrics)."""
    time: jax.Array
    """Steps taken in the current episode (int32)."""


@functools.lru_cache(maxsize=None)
def _brax_env(name: str, backend: str) -> Any:
    # mujoco.mjx prints a line to stdout when the optional `warp` package is missing; keep
    # that out of `metabench` output (CLI tables, JSON on stdout).
    with contextlib.redirect_stdout(io.StringIO()):
        import brax.envs

    with warnings.catch_warnings():
        # brax 0.14 warns on every model load that its pipelines are no longer maintained
        # (MJX is their successor): news about brax, not about this run.
        warnings.filterwarnings("ignore", message="Brax System, piplines")
        return brax.envs.get_environment(name, backend=backend)


class BraxEnv(Env):
    """Functional adapter: ``reset(key, params)`` and ``step(key, state, action, params)``.

    ``step`` returns ``(obs, state, reward, terminated, truncated, info)`` with
    ``info["final_observation"]`` the observation before the auto-reset.
    """

    jittable = True
    static_params = ("backend",)
    """Options fixed when the env is built (not part of the params pytree)."""

    def __init__(self, name: str, backend: str = DEFAULT_BACKEND):
        self.name = name
        self.id = f"brax/{name}"
        self.backend = backend
        self._env = _brax_env(name, backend)
        # brax reports the observation size by tracing a reset; do it once here.
        self._obs_size = int(jax.eval_shape(self._env.reset, jax.random.PRNGKey(0)).obs.shape[-1])
        # Tracing brax's physics takes seconds; behind a jit, a later trace of the same shapes
        # (a second rollout, the harness's init and step) reuses the cached jaxpr. XLA inlines
        # the call, so the compiled program is the same.
        self._reset = jax.jit(self._reset_impl)
        self._step = jax.jit(self._step_impl)

    @property
    def default_params(self) -> BraxParams:
        return BraxParams()

    def finalise_params(self, params: BraxParams) -> BraxParams:
        """Nothing is derived from other fields (jittable, like gymnax's)."""
        return params

    def reset(self, key, params):
        return self._reset(key, params)

    def step(self, key, state: BraxState, action, params):
        return self._step(key, state, action, params)

    def _reset_impl(self, key, params):
        del params
        inner = self._env.reset(key)
        return inner.obs, BraxState(inner, jnp.zeros((), jnp.int32))

    def _step_impl(self, key, state: BraxState, action, params):
        # brax's step updates `metrics` in place; a copy keeps the caller's state unchanged.
        inner = state.inner.replace(metrics=dict(state.inner.metrics))
        nxt = self._env.step(inner, action)
        time = state.time + 1
        # brax's done is a float; some envs return Python floats (inverted_pendulum's reward).
        terminated = jnp.asarray(nxt.done) > 0.5
        truncated = jnp.logical_and(time >= params.max_steps_in_episode, ~terminated)
        done = jnp.logical_or(terminated, truncated)
        # Under vmap a cond would run both branches anyway; reset every step and select.
        obs_reset, fresh = self._reset_impl(key, params)
        new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), fresh,
                                           BraxState(nxt, time))
        obs = jnp.where(done, obs_reset, nxt.obs)
        info = {"final_observation": nxt.obs}
        return obs, new_state, jnp.asarray(nxt.reward, jnp.float32), terminated, truncated, info

    def observation_space(self, params) -> spaces.Box:
        return spaces.Box(-jnp.inf, jnp.inf, (self._obs_size,), jnp.float32)

    def action_space(self, params) -> spaces.Box:
        # brax's actuators take controls in [-1, 1] (its own PPO squashes with tanh).
        return spaces.Box(-1.0, 1.0, (self._env.action_size,), jnp.float32)

    def __repr__(self) -> str:
        return f"BraxEnv({self.name!r}, backend={self.backend!r})"


def _factory(name: str) -> Callable[..., tuple[BraxEnv, BraxParams]]:
    def make(backend: str = DEFAULT_BACKEND, **overrides: Any) -> tuple[BraxEnv, BraxParams]:
        if backend not in BACKENDS:
            raise ValueError(f"brax/{name}: unknown physics backend {backend!r}; "
                             f"expected one of {', '.join(BACKENDS)}")
        params = BraxParams()
        unknown = sorted(set(overrides) - {"max_steps_in_episode"})
        if unknown:
            raise ValueError(f"brax/{name} has no parameter(s) {', '.join(unknown)}; its "
                             f"parameters are: backend (fixed when built), max_steps_in_episode")
        if "max_steps_in_episode" in overrides:
            v = overrides["max_steps_in_episode"]
            if not isinstance(v, jax.Array):
                if float(v) != int(v) or int(v) < 1:
                    raise ValueError(f"brax/{name}: max_steps_in_episode must be a positive "
                                     f"integer, got {v!r}")
                v = jnp.asarray(int(v), jnp.int32)
            params = params.replace(max_steps_in_episode=v)
        return BraxEnv(name, backend), params

    return make


_AVAILABLE = importlib.util.find_spec("brax") is not None

for _name in NAMES:
    register(
        EnvEntry(
            id=f"brax/{_name}",
            factory=_factory(_name),
            jittable=True,
            note="" if _AVAILABLE else "needs brax (pip install brax)",
        ),
        overwrite=True,
    )
