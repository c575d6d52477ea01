"""The environment contract every backend must meet, as one checker the tests parametrise.

Every family steps an env copy as ``obs, state, r, terminated, truncated, info =
env.step(key, state, action, params)`` and relies on what the flags and observations mean:

1. observation shapes and dtypes match the observation space; rewards are finite scalars per
   copy; ``terminated`` and ``truncated`` are booleans;
2. ``terminated`` and ``truncated`` are never both true: an episode whose real termination falls
   on its time-limit step is terminated only (a terminal state must not be bootstrapped);
3. a time-limit end is truncated only, and happens exactly when an episode reaches its limit;
4. ``info["final_observation"]`` is the observation the step reached: the library's true last
   observation when the episode ends (terminated or truncated), and ``obs`` on every other
   step (truncated episodes bootstrap from it);
5. the step that ends an episode returns the next episode's first observation (auto-reset),
   and the next episode's step count starts again from zero;
6. copies differ (vectorised copies are seeded apart), the same key reproduces the same
   trajectory, and another key gives another one.

:func:`check` resets and steps ``num_envs`` copies under ``jit`` + ``vmap`` + ``scan`` (exactly
how the families drive an env, host-stepped backends included) with random actions, and
asserts all of it in three ways:

- on every env, the checks that need no reference (1, 2, 4 on steps that do not end, 6);
- on every env with a time-limit parameter, by rolling out the same keys and actions twice:
  with a short limit ``L`` and with one beyond the rollout. Up to each copy's first end the
  two agree; an end the long run does not share is a time-limit end, which must be truncated
  only, come after exactly ``L`` steps and carry the long run's observation of that step (the
  library's true next observation) as ``final_observation``; an end both runs share is a real
  termination, terminated only in both. Every episode of the short run must end by ``L``
  steps, by truncation only at ``L`` (3, 5's step count);
- on backends that wrap a library (gymnax, gymnasium, pettingzoo, brax), against the library
  stepped by hand (:data:`REFERENCES`): the same seeds or keys and actions, each episode reset
  by hand after it ends; every observation, reward, flag and final observation must match
  (2-5 exactly, including the final observation at real terminations and the reset
  observation after every end).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metabench.envs.api import Env, capability
from metabench.envs.registry import make


class Trajectory(NamedTuple):
    """One conformance rollout, as numpy arrays (``[steps, num_envs, ...]`` after ``obs0``)."""

    obs0: np.ndarray
    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_observation: np.ndarray
    action: np.ndarray
    """The random actions taken, ``[steps, num_envs, ...]``."""
    reset_key: np.ndarray
    """The key each copy was reset with, ``[num_envs, 2]``."""
    step_key: np.ndarray
    """The key each copy's step was called with, ``[steps, num_envs, 2]``."""

    @property
    def done(self) -> np.ndarray:
        return self.terminated | self.truncated


def rollout_fn(env: Any, params: Any, num_envs: int, steps: int):
    """``(key, params=params) -> Trajectory``: ``steps`` random-action steps of ``num_envs``
    copies in one jitted scan (compiled once, reused across keys and params of one shape)."""
    space = env.action_space(params)

    @jax.jit
    def run(key, params):
        k_reset, k_run = jax.random.split(key)
        reset_keys = jax.random.split(k_reset, num_envs)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(reset_keys, params)

        def step(state, key):
            k_act, k_step = jax.random.split(key)
            actions = jax.vmap(space.sample)(jax.random.split(k_act, num_envs))
            step_keys = jax.random.split(k_step, num_envs)
            obs, state, r, term, trunc, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                step_keys, state, actions, params)
            return state, (obs, r, term, trunc, info["final_observation"], actions, step_keys)

        rest = jax.lax.scan(step, state, jax.random.split(k_run, steps))[1]
        return obs, rest, reset_keys

    def rollout(key: jax.Array, params: Any = params) -> Trajectory:
        obs0, (obs, r, term, trunc, final, actions, step_keys), reset_keys = run(key, params)
        return Trajectory(*(np.asarray(x) for x in (obs0, obs, r, term, trunc, final, actions,
                                                    reset_keys, step_keys)))

    return rollout


# --- the libraries stepped by hand ------------------------------------------------------------

def _end_flags(terminated: bool, limit_reached: bool) -> tuple[bool, bool]:
    """The contract's flags for an end: a real termination wins over the time limit."""
    return bool(terminated), bool(limit_reached and not terminated)


def _reference_gymnax(env_id, kwargs, env, params, traj: Trajectory) -> tuple:
    """gymnax's own transition (``step_env``), time limit (``is_truncated``) and reset
    (``reset_env``), with the key split gymnax's ``step`` documents, reset by hand."""
    raw = env._env

    def one(reset_key, keys, actions):
        obs0, state = raw.reset_env(reset_key, params)

        def step(state, x):
            key, action = x
            k_step, k_reset = jax.random.split(key)
            obs_st, state_st, r, term, _ = raw.step_env(k_step, state, action, params)
            limit = raw.is_truncated(state_st, params)
            end = term | limit
            obs_re, state_re = raw.reset_env(k_reset, params)
            state = jax.tree_util.tree_map(lambda a, b: jnp.where(end, a, b), state_re, state_st)
            return state, (jnp.where(end, obs_re, obs_st), r, term, limit & ~term, obs_st)

        return obs0, jax.lax.scan(step, state, (keys, actions))[1]

    run = jax.jit(jax.vmap(one, in_axes=(0, 1, 1), out_axes=(0, 1)))
    obs0, rest = run(traj.reset_key, traj.step_key, traj.action)
    return (obs0, *rest)


def _reference_brax(env_id, kwargs, env, params, traj: Trajectory) -> tuple:
    """brax's own ``reset``/``step``; ``done`` is a real termination, the limit counted here;
    the adapter's documented reset key is the key of the step that ended the episode."""
    raw = env._env
    limit = params.max_steps_in_episode

    def one(reset_key, keys, actions):
        first = raw.reset(reset_key)

        def step(carry, x):
            state, time = carry
            key, action = x
            nxt = raw.step(state, action)
            time = time + 1
            term = jnp.asarray(nxt.done) > 0.5
            reached = time >= limit
            end = term | reached
            fresh = raw.reset(key)
            state = jax.tree_util.tree_map(lambda a, b: jnp.where(end, a, b), fresh, nxt)
            return (state, jnp.where(end, 0, time)), (
                jnp.where(end, fresh.obs, nxt.obs), jnp.asarray(nxt.reward, jnp.float32), term,
                reached & ~term, nxt.obs)

        return first.obs, jax.lax.scan(step, (first, jnp.int32(0)), (keys, actions))[1]

    run = jax.jit(jax.vmap(one, in_axes=(0, 1, 1), out_axes=(0, 1)))
    obs0, rest = run(traj.reset_key, traj.step_key, traj.action)
    return (obs0, *rest)


def _host_seeds(traj: Trajectory) -> np.ndarray:
    from metabench.envs.hostenv import seeds_from_keys

    return seeds_from_keys(traj.reset_key)


def _reference_gymnasium(env_id, kwargs, env, params, traj: Trajectory) -> tuple:
    """Plain ``gymnasium.make`` envs, one per copy, seeded with the copy's seed and reset by
    hand (no seed) after every end."""
    import gymnasium

    kw = {k: v for k, v in kwargs.items() if k != "vectorization"}
    kw = {k: int(v) if isinstance(v, float) and v.is_integer() and k.startswith(("num_", "max_"))
          else v for k, v in kw.items()}
    seeds = _host_seeds(traj)
    steps, n = traj.reward.shape
    out = [np.zeros((steps, n, *traj.obs.shape[2:]), np.float32), np.zeros((steps, n), np.float32),
           np.zeros((steps, n), bool), np.zeros((steps, n), bool),
           np.zeros((steps, n, *traj.obs.shape[2:]), np.float32)]
    obs0 = np.zeros_like(traj.obs0)
    for i in range(n):
        e = gymnasium.make(env_id.split("/", 1)[1], **kw)
        obs0[i] = e.reset(seed=int(seeds[i]))[0]
        for t in range(steps):
            a = traj.action[t, i]
            nxt, r, term, trunc, _ = e.step(int(a) if np.ndim(a) == 0 else np.asarray(a))
            final = nxt
            if term or trunc:
                nxt, _ = e.reset()
            out[0][t, i], out[1][t, i], out[4][t, i] = nxt, r, final
            out[2][t, i], out[3][t, i] = _end_flags(term, trunc)
        e.close()
    return (obs0, *out)


def _reference_pettingzoo(env_id, kwargs, env, params, traj: Trajectory) -> tuple:
    """Plain ``parallel_env`` games, one per ``num_agents`` copies, seeded with the game's
    first copy's seed. An agent that leaves while its game plays on waits in an absorbing
    state (its last observation, reward 0) and its own end (terminated or truncated, as the
    library said when it left) is reported when the game is over and reset by hand. A game
    that reports its time limit as a termination (:data:`_REAL_TERMINATIONS`) is read as the
    library means it: the agents it did not really terminate are truncated."""
    from metabench.envs import pettingzoo as backend

    suite, module = env_id.split("/", 1)[1].split(".", 1)
    mod = importlib.import_module(f"{backend.SUITES[suite][0]}.{module}")
    kw = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in kwargs.items()}
    real_terms = _REAL_TERMINATIONS.get(f"{suite}.{module}")
    seeds = _host_seeds(traj)
    steps, n = traj.reward.shape
    obs_shape = traj.obs.shape[2:]
    obs0 = np.zeros_like(traj.obs0)
    obs, final = (np.zeros((steps, n, *obs_shape), np.float32) for _ in range(2))
    reward = np.zeros((steps, n), np.float32)
    term, trunc = np.zeros((steps, n), bool), np.zeros((steps, n), bool)

    def vec(o, a):
        return np.asarray(o[a], np.float32).reshape(obs_shape)

    k = len(env.agents)
    for g in range(n // k):
        game = mod.parallel_env(**kw)
        names = list(game.possible_agents)
        first, _ = game.reset(seed=int(seeds[g * k]))
        last = {a: vec(first, a) for a in names}
        left: dict[str, tuple[bool, bool]] = {}
        for i, a in enumerate(names):
            obs0[g * k + i] = last[a]
        for t in range(steps):
            acts = {}
            for i, a in enumerate(names):
                if a in game.agents:
                    x = traj.action[t, g * k + i]
                    acts[a] = int(x) if np.ndim(x) == 0 else np.asarray(x)
            o, r, te, tr, _ = game.step(acts)
            fixed = real_terms(game, te) if real_terms else {}
            for i, a in enumerate(names):
                if a in o:
                    last[a] = vec(o, a)
                reward[t, g * k + i] = float(r.get(a, 0.0))
                if a not in left and (te.get(a, False) or tr.get(a, False)):
                    really = fixed.get(a, bool(te.get(a, False)))
                    left[a] = (really, not really)
            for i, a in enumerate(names):
                final[t, g * k + i] = last[a]
            if not game.agents or len(left) == k:
                for i, a in enumerate(names):
                    term[t, g * k + i], trunc[t, g * k + i] = left.get(a, (False, True))
                fresh, _ = game.reset()
                last, left = {a: vec(fresh, a) for a in names}, {}
            for i, a in enumerate(names):
                obs[t, g * k + i] = last[a]
        game.close()
    return obs0, obs, reward, term, trunc, final


def _multiwalker_real_terminations(game: Any, terminated: dict) -> dict:
    """multiwalker_v9 sets every agent's termination once ``frames >= max_cycles``; the
    walkers it really ended (a fall, the package dropped or delivered) are those its base
    env's ``get_last_dones()`` marks."""
    base = game.unwrapped.env
    if base.frames < base.max_cycles:
        return {}
    dones = base.get_last_dones()
    return {a: bool(dones[i]) for i, a in enumerate(game.possible_agents) if a in terminated}


# pettingzoo games whose time limit comes out as a termination: (game, terminations) ->
# {agent: really terminated} on the steps where it happens.
_REAL_TERMINATIONS = {"sisl.multiwalker_v9": _multiwalker_real_terminations}

REFERENCES: dict[str, Callable[..., tuple]] = {
    "gymnax": _reference_gymnax,
    "gymnasium": _reference_gymnasium,
    "pettingzoo": _reference_pettingzoo,
    "brax": _reference_brax,
}
"""Backend -> ``(env_id, make_kwargs, env, params, trajectory) -> (obs0, obs, reward,
terminated, truncated, final_observation)`` of the library stepped by hand. The grid and chain
worlds are metabench's own (there is no other library to step); their dynamics are checked
by hand-played tests in ``tests/test_grids.py``."""

# The time-limit parameter of each backend (others: ``max_steps_in_episode`` when the params
# have it; chains have no time limit).
_LIMIT = {"gymnasium": "max_episode_steps", "pettingzoo": "max_cycles"}


def limit_param(env_id: str, params: Any) -> str | None:
    """The name of ``env_id``'s time-limit parameter, or None if it has none."""
    backend = env_id.split("/", 1)[0]
    if backend in _LIMIT:
        return _LIMIT[backend]
    return "max_steps_in_episode" if hasattr(params, "max_steps_in_episode") else None


def _strong(params: Any) -> Any:
    """Params with every leaf a strongly typed array, so that params built different ways
    (defaults, overrides) share one compilation."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), params)


def _with_limit(params: Any, name: str, value: int) -> Any:
    """Jittable env params with the time limit ``name`` set to ``value`` (its dtype kept)."""
    return params.replace(**{name: jnp.asarray(value, jnp.asarray(getattr(params, name)).dtype)})


def _close(x, y) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
        return False
    if x.dtype == np.bool_ or y.dtype == np.bool_:
        return np.array_equal(x, y)
    return np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-5, atol=1e-5)


def _first_mismatch(x, y) -> str:
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
        return f"shapes {x.shape} vs {y.shape}"
    bad = ~np.isclose(x.astype(np.float64), y.astype(np.float64), rtol=1e-5, atol=1e-5)
    if bad.ndim > 2:
        bad = bad.reshape(*bad.shape[:2], -1).any(-1)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"first at [step, copy] {where}: {x[where]} vs {y[where]}"


def _check_reference(where: str, traj: Trajectory, ref: tuple) -> None:
    names = ("obs0", "obs", "reward", "terminated", "truncated", "final_observation")
    for name, got, want in zip(names, traj, ref):
        assert _close(got, want), (f"{where} {name} differs from the library stepped by hand, "
                                   f"{_first_mismatch(got, want)}")


def _check_generic(where: str, a: Trajectory, shape: tuple, space_dtype, num_envs: int,
                   steps: int, distinct_copies: bool) -> None:
    assert a.obs0.shape == (num_envs, *shape), f"{where} reset obs {a.obs0.shape} != {shape}"
    assert a.obs.shape == a.final_observation.shape == (steps, num_envs, *shape), \
        f"{where} step obs {a.obs.shape} / final {a.final_observation.shape} != {shape}"
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
    both = a.terminated & a.truncated
    assert not both.any(), (f"{where} terminated and truncated both true at [step, copy] "
                            f"{np.argwhere(both)[0].tolist()}: a real termination on the "
                            f"time-limit step is terminated only")
    going = ~a.done
    assert np.array_equal(a.obs[going], a.final_observation[going]), \
        f"{where} final_observation differs from obs on a step that did not end an episode"
    if distinct_copies:
        for i in range(num_envs):
            for j in range(i):
                same = (np.array_equal(a.obs0[i], a.obs0[j])
                        and np.array_equal(a.obs[:, i], a.obs[:, j]))
                assert not same, f"{where} copies {j} and {i} gave the same observations"


def _check_time_limit(where: str, s: Trajectory, l: Trajectory, limit: int) -> int:
    """``s`` rolled out with time limit ``limit``, ``l`` with the same keys and a limit beyond
    the rollout. Returns how many time-limit ends were checked."""
    steps, n = s.reward.shape
    checked = 0
    for i in range(n):
        # the short run's episodes: none longer than the limit, truncated only at the limit
        length = 0
        for t in range(steps):
            length += 1
            if s.truncated[t, i]:
                assert length == limit, (f"{where} copy {i} truncated after {length} steps "
                                         f"with a time limit of {limit} (step {t})")
            if s.done[t, i]:
                length = 0
            assert length < limit, (f"{where} copy {i} ran {limit} steps without an end "
                                    f"(step {t}) under a time limit of {limit}")
        assert not l.truncated[:, i].any(), \
            f"{where} copy {i} truncated before its time limit ({limit + steps} steps)"
        ends = np.flatnonzero(s.done[:, i])
        if not len(ends):
            continue
        t0 = int(ends[0])
        # up to the first end the two runs are the same episode
        assert _close(s.obs[:t0, i], l.obs[:t0, i]) and _close(s.reward[:t0 + 1, i],
                                                               l.reward[:t0 + 1, i]), \
            f"{where} copy {i}: the time limit changed the episode before it ended"
        if l.done[t0, i]:  # a real termination, shared by both runs
            assert s.terminated[t0, i] and l.terminated[t0, i], \
                f"{where} copy {i}: a real termination (step {t0}) is not terminated"
            assert _close(s.final_observation[t0, i], l.final_observation[t0, i]), \
                f"{where} copy {i}: the final observation of a termination depends on the limit"
        else:  # the long run plays on: the short run's end is its time limit
            checked += 1
            assert s.truncated[t0, i] and not s.terminated[t0, i], (
                f"{where} copy {i}: the time limit (step {t0}) ended the episode as "
                f"terminated={bool(s.terminated[t0, i])}, truncated={bool(s.truncated[t0, i])};"
                f" a time-limit end is truncated only")
            assert _close(s.final_observation[t0, i], l.obs[t0, i]), (
                f"{where} copy {i}: final_observation at the time limit is not the observation "
                f"the env reached (the one it returns when it plays on)")
    return checked


def check(env_id: str, num_envs: int = 3, steps: int = 20, seed: int = 0,
          expect_done: bool = False, limit: int | None = None, reference: bool = True,
          distinct_copies: bool = True, **params: Any) -> Trajectory:
    """Asserts the env contract for ``env_id`` (see the module docstring); returns the first
    trajectory (made with ``params``).

    ``expect_done`` also requires some copy to finish an episode in ``steps``. ``limit`` is the
    short time limit of the time-limit checks (default: ``steps // 3``, at least 2; ignored by
    envs without a time limit). ``reference=False`` skips the comparison with the library
    stepped by hand (it compiles the library's step a second time on jitted backends).
    ``distinct_copies=False`` for envs whose copies are alike by design (a fixed start and
    dynamics that random actions may not tell apart)."""
    backend = env_id.split("/", 1)[0]
    env, env_params = make(env_id, **params)
    jittable = capability(env, "jittable")
    if jittable:
        env_params = _strong(env_params)
    obs_space = env.observation_space(env_params)
    shape = tuple(obs_space.shape)
    space_dtype = np.dtype(getattr(obs_space, "dtype", np.float32))
    rollout = rollout_fn(env, env_params, num_envs, steps)
    a = rollout(jax.random.PRNGKey(seed))
    where = f"{env_id}:"
    _check_generic(where, a, shape, space_dtype, num_envs, steps, distinct_copies)
    if expect_done:
        assert a.done.any(), f"{where} no episode ended in {steps} steps"
    b = rollout(jax.random.PRNGKey(seed))
    for x, y, name in zip(a, b, Trajectory._fields):
        assert np.array_equal(x, y), f"{where} the same key gave a different {name}"
    c = rollout(jax.random.PRNGKey(seed + 1))
    assert not np.array_equal(a.obs, c.obs), f"{where} another key gave the same observations"
    ref = REFERENCES.get(backend) if reference else None
    if ref is not None:
        _check_reference(where, a, ref(env_id, params, env, env_params, a))
    _release(env)

    name = limit_param(env_id, env_params)
    if name is not None:
        short = limit if limit is not None else max(2, steps // 3)
        runs = []
        for value in (short, short + steps):
            kw = {**params, name: value}
            if jittable:  # same env, same compilation: only the params differ
                runs.append(rollout(jax.random.PRNGKey(seed), _with_limit(env_params, name, value)))
            else:
                e, p = make(env_id, **kw)
                runs.append(rollout_fn(e, p, num_envs, steps)(jax.random.PRNGKey(seed)))
                if ref is not None and value == short:
                    _check_reference(f"{where} ({name}={short})", runs[-1],
                                     ref(env_id, kw, e, p, runs[-1]))
                _release(e)
        s, l = runs
        w = f"{where} ({name}={short})"
        _check_generic(w, s, shape, space_dtype, num_envs, steps, distinct_copies)
        if jittable and ref is not None:
            p = _with_limit(env_params, name, short)
            _check_reference(w, s, ref(env_id, {**params, name: short}, env, p, s))
        _check_time_limit(w, s, l, short)
    return a


def _release(env: Any) -> None:
    if isinstance(env, Env):  # host-stepped envs free their copies; jitted ones have none
        env.release()
