"""The gymnasium backend: any registered gymnasium id as ``gymnasium/<Id>``, host-stepped.

Each batch of copies a family resets (one seed's ``num_envs``) becomes one
``gymnasium.make_vec`` vector env, synchronous by default or ``vectorization: async`` (one
subprocess per copy); a training step steps every vector env of the call at once, async ones
concurrently. Everything else (acting, the update, the rule) stays compiled: see
:mod:`metabench.envs.hostenv`.

Autoreset is set explicitly to gymnasium's ``SAME_STEP`` mode: the step that ends an episode
returns the next episode's first observation, with the true last one in ``final_obs``. That is
gymnax's contract, so ``terminated``/``truncated`` and ``final_observation`` mean the same on
both backends and truncated episodes bootstrap from the right state. (gymnasium's default,
``NEXT_STEP``, would instead spend one extra step per episode on a no-op reset transition.)

gymnasium's ``TimeLimit`` sets ``truncated`` whenever the limit is reached, whatever the env
said, so an episode whose real termination falls on its limit step comes back terminated
*and* truncated; the pool reports it as terminated only (a terminal state must not be
bootstrapped), as the gymnax backend does.

Keyword params of ``make`` (task YAML ``params:``) go to ``gymnasium.make`` (e.g.
``continuous: true`` for LunarLander), except ``vectorization`` (``sync``/``async``) and
``max_episode_steps``. Observations are cast to float32; only ``Discrete`` and ``Box``
spaces are supported.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode

from metabench.envs.hostenv import HostEnv, HostPool, StepResult, gymnax_space
from metabench.envs.registry import EnvEntry, register

VECTORIZATION = ("sync", "async")


class VectorPool(HostPool):
    """Copies held in gymnasium vector envs, one vector env per reset batch."""

    def __init__(self, make_vec: Callable[[int], Any]):
        self._make_vec = make_vec
        self._idle: list[Any] = []  # released vector envs, reused by later resets
        self._vecs: list[Any] = []
        self._where: dict[int, tuple[int, int]] = {}  # slot -> (vector env, position)
        self._next = 0

    def reset(self, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(seeds)
        # Reseeding a released vector env is as good as a new one, and an async one's
        # subprocesses take a second or more each to start.
        reuse = [i for i, v in enumerate(self._idle) if v.num_envs == n]
        vec = self._idle.pop(reuse[0]) if reuse else self._make_vec(n)
        obs, _ = vec.reset(seed=[int(s) for s in seeds])
        slots = np.arange(self._next, self._next + n)
        for i, s in enumerate(slots):
            self._where[int(s)] = (len(self._vecs), i)
        self._vecs.append(vec)
        self._next += n
        return slots, np.asarray(obs)

    def step(self, slots: np.ndarray, actions: np.ndarray) -> StepResult:
        groups = self._groups(slots, lambda v: self._vecs[v].num_envs, "gymnasium")
        results = {}
        asynchronous = all(hasattr(self._vecs[v], "step_async") for v in groups)
        if asynchronous:  # every vector env's subprocesses work at once
            for v, rows in groups.items():
                self._vecs[v].step_async(actions[rows])
            for v in groups:
                results[v] = self._vecs[v].step_wait()
        else:
            for v, rows in groups.items():
                results[v] = self._vecs[v].step(actions[rows])
        first = next(iter(results.values()))[0]
        n = len(slots)
        obs = np.empty((n, *first.shape[1:]), np.float32)
        reward = np.empty(n, np.float32)
        term, trunc = np.empty(n, bool), np.empty(n, bool)
        for v, rows in groups.items():
            o, r, te, tr, info = results[v]
            # A real termination on the limit step is terminated only.
            obs[rows], reward[rows], term[rows], trunc[rows] = o, r, te, tr & ~te
        final = obs.copy()
        for v, rows in groups.items():
            info = results[v][4]
            if "_final_obs" in info:
                for i in np.flatnonzero(info["_final_obs"]):
                    final[rows[i]] = info["final_obs"][i]
        return StepResult(obs, reward, term, trunc, final)

    def release(self) -> None:
        self._idle += self._vecs
        self._vecs, self._where, self._cached = [], {}, None

    def close(self) -> None:
        """Releases every copy and closes every vector env (and async subprocesses)."""
        self.release()
        for vec in self._idle:
            vec.close()
        self._idle = []


def _options(gym_id: str) -> tuple[str, ...]:
    """The keywords ``make`` takes for ``gym_id``: ours, ``gymnasium.make``'s and the env
    class's constructor's."""
    import inspect

    names = {"vectorization", "max_episode_steps"}
    entry_point = gymnasium.spec(gym_id).entry_point
    if isinstance(entry_point, str):
        module, _, attr = entry_point.partition(":")
        entry_point = getattr(importlib.import_module(module), attr)
    try:
        params = inspect.signature(entry_point).parameters.values()
    except (TypeError, ValueError):
        params = ()
    names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return tuple(sorted(names - {"self", "render_mode"}))


def _factory(gym_id: str) -> Callable[..., tuple[HostEnv, Any]]:
    def make(vectorization: str = "sync", max_episode_steps: float | None = None,
             **kwargs: Any) -> tuple[HostEnv, Any]:
        if vectorization not in VECTORIZATION:
            raise ValueError(f"gymnasium/{gym_id}: vectorization must be one of "
                             f"{', '.join(VECTORIZATION)}, got {vectorization!r}")
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = int(max_episode_steps)
        kwargs = {k: int(v) if isinstance(v, float) and v.is_integer() and k.startswith(
            ("num_", "max_")) else v for k, v in kwargs.items()}
        try:
            probe = gymnasium.make(gym_id, **kwargs)
        except TypeError as e:
            raise ValueError(f"gymnasium/{gym_id} does not take these parameters "
                             f"({', '.join(sorted(kwargs))}): {e}") from None
        try:
            obs_space = gymnax_space(probe.observation_space)
            act_space = gymnax_space(probe.action_space)
            limit = probe.spec.max_episode_steps if probe.spec else None
        except ValueError as e:
            raise ValueError(f"gymnasium/{gym_id}: {e}") from None
        finally:
            probe.close()
        if not hasattr(obs_space, "low"):
            raise ValueError(f"gymnasium/{gym_id}: observations must be a Box space")

        vector_kwargs: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP}
        if vectorization == "async":
            # Forking a process that runs JAX's thread pools can deadlock; spawn instead.
            vector_kwargs["context"] = "spawn"

        def make_vec(n: int):
            return gymnasium.make_vec(gym_id, num_envs=n, vectorization_mode=vectorization,
                                      vector_kwargs=vector_kwargs, **kwargs)

        env = HostEnv(f"gymnasium/{gym_id}", VectorPool(make_vec), obs_space, act_space,
                      limit or 1000, static_params=_options(gym_id))
        return env, env.default_params

    return make


def _register_all() -> None:
    # Namespaced ids ("phys2d/CartPole-v0") would need a second "/"; the functional phys2d
    # and tabular envs are JAX-native anyway and are better used without a host.
    for gym_id, spec in gymnasium.registry.items():
        if "/" in gym_id:
            continue
        note = "host-stepped"
        register(EnvEntry(id=f"gymnasium/{gym_id}", factory=_factory(gym_id), jittable=False,
                          note=note), overwrite=True)


_register_all()
