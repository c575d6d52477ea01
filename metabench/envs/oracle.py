"""A scripted full-information agent for the grid worlds: the ``oracle`` reference.

Where the exact optimum is intractable (random grids, ``grid/procgen``: objects respawn at
random cells), a task can normalise by ``reference: oracle``: the mean return of this agent on
the level, simulated in the real jitted env. It is a *strong recorded reference, not an upper
bound* (a learner may beat it), and it is not any update rule under test: it reads the full
state (object cells, presence, walls, rewards), which no agent sees.

The policy, each step:

* auto-collect envs (9 actions): move one step along a shortest path (8-connected, over free
  cells; breadth-first distances by a fixed-point of relaxation sweeps, jittable) to the
  nearest present object with a positive reward, treating cells holding present
  negative-reward objects as blocked (ignoring them when no positive object is reachable
  otherwise); stay when no positive object is present;
* collect envs (18 actions): collect a positive object on the own or an adjacent cell if there
  is one (the most rewarding), else move along a shortest path towards the nearest one (moves
  collect nothing, so negative objects are not obstacles); stay when none is present.

:func:`oracle_returns` measures it per level: ``num_envs`` copies of the level, each playing
exactly its first ``episodes`` episodes (so short and long episodes count alike), averaged.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metabench.envs import grids, optimal

NUM_ENVS = 64
EPISODES = 4
"""Episodes per env copy: ``NUM_ENVS * EPISODES`` episodes per level."""

_INF = 1e6


def can_play(env: Any) -> bool:
    """Whether the oracle plays ``env`` (every ``grid/*`` env)."""
    return isinstance(env, grids.GridEnv)


def _shift(d: jax.Array, dr: int, dc: int, fill: float) -> jax.Array:
    """``out[r, c] = d[r + dr, c + dc]`` (``fill`` off the board)."""
    h, w = d.shape
    p = jnp.pad(d, 1, constant_values=fill)
    return jax.lax.dynamic_slice(p, (1 + dr, 1 + dc), (h, w))


def _distances(targets: jax.Array, passable: jax.Array) -> jax.Array:
    """8-connected step distances ``[H, W]`` to the nearest target cell (``_INF`` if none is
    reachable) through passable cells (targets count as passable)."""
    d0 = jnp.where(targets, 0.0, _INF)
    dirs = [(int(r), int(c)) for r, c in zip(grids.DROW[1:], grids.DCOL[1:])]

    def sweep(carry):
        d, _, i = carry
        nb = jnp.min(jnp.stack([_shift(d, r, c, _INF) for r, c in dirs]), axis=0)
        new = jnp.where(targets, 0.0, jnp.where(passable, jnp.minimum(d, nb + 1.0), _INF))
        return new, jnp.any(new != d), i + 1

    limit = targets.size
    d, _, _ = jax.lax.while_loop(lambda c: c[1] & (c[2] < limit), sweep,
                                 (d0, jnp.bool_(True), jnp.int32(0)))
    return d


def oracle_action(env: Any, state: Any, params: Any) -> jax.Array:
    """The scripted agent's action in ``state`` (jittable; one env copy)."""
    h, w = env.height, env.width
    cells = h * w
    walls = params.walls.reshape(h, w)
    present = state.present & params.obj_active
    pos_obj = present & (params.obj_reward > 0)
    neg_obj = present & (params.obj_reward < 0)
    count = lambda sel: jnp.zeros(cells, jnp.float32).at[state.obj_pos].add(  # noqa: E731
        jnp.where(sel, 1.0, 0.0)).reshape(h, w) > 0
    value = jnp.zeros(cells, jnp.float32).at[state.obj_pos].add(
        jnp.where(present, params.obj_reward, 0.0))
    targets, negatives = count(pos_obj), count(neg_obj)
    free = ~walls
    drow, dcol = jnp.asarray(grids.DROW), jnp.asarray(grids.DCOL)
    r, c = state.agent // w, state.agent % w
    nr, nc = r + drow, c + dcol  # [9] neighbours (0: own cell)
    on = (nr >= 0) & (nr < h) & (nc >= 0) & (nc < w)
    nb = jnp.clip(nr, 0, h - 1) * w + jnp.clip(nc, 0, w - 1)
    ok = on & free.reshape(-1)[nb]
    any_target = jnp.any(targets)

    if env.collect_actions:
        d = _distances(targets, free).reshape(-1)
        dist = jnp.where(ok, d[nb], _INF).at[0].set(_INF)  # moves only
        move = jnp.argmin(dist)
        gain = jnp.where(ok, value[nb], -_INF)
        best = jnp.argmax(gain)
        collect = any_target & (gain[best] > 0)
        return jnp.where(collect, grids.NUM_MOVES + best,
                         jnp.where(any_target & (dist[move] < _INF), move, 0)).astype(jnp.int32)

    d_safe = _distances(targets, free & ~negatives).reshape(-1)
    d_any = _distances(targets, free).reshape(-1)
    dist_safe = jnp.where(ok, d_safe[nb], _INF).at[0].set(_INF)
    dist_any = jnp.where(ok, d_any[nb], _INF).at[0].set(_INF)
    dist = jnp.where(jnp.min(dist_safe) < _INF, dist_safe, dist_any)
    move = jnp.argmin(dist)
    return jnp.where(any_target & (dist[move] < _INF), move, 0).astype(jnp.int32)


def _level_returns(env: Any, params: Any, key: jax.Array, steps: int, num_envs: int,
                   episodes: int, policy: str = "oracle") -> jax.Array:
    """Mean return of the first ``episodes`` episodes of ``num_envs`` copies of one level,
    played by the oracle or (``policy="random"``) by uniformly random actions."""

    def one(key):
        k_reset, k_run = jax.random.split(key)
        _, state = env.reset(k_reset, params)

        def step(carry, key):
            state, ret, done_n, total = carry
            if policy == "random":
                k_act, key = jax.random.split(key)
                action = jax.random.randint(k_act, (), 0, env.num_actions)
            else:
                action = oracle_action(env, state, params)
            _, state, r, term, trunc, _ = env.step(key, state, action, params)
            ret = ret + r
            done = term | trunc
            count = done & (done_n < episodes)
            total = total + jnp.where(count, ret, 0.0)
            return (state, jnp.where(done, 0.0, ret), done_n + done, total), None

        init = (state, jnp.float32(0.0), jnp.int32(0), jnp.float32(0.0))
        (_, _, done_n, total), _ = jax.lax.scan(step, init, jax.random.split(k_run, steps))
        return total, jnp.minimum(done_n, episodes)

    total, n = jax.vmap(one)(jax.random.split(key, num_envs))
    return total.sum() / jnp.maximum(n.sum(), 1), n.sum()


_CACHE: dict[tuple, float] = {}


def oracle_returns(env: Any, params_batch: Any, *, num_envs: int = NUM_ENVS,
                   episodes: int = EPISODES, seed: int = 0,
                   policy: str = "oracle") -> list[float]:
    """The oracle's (or, with ``policy="random"``, a uniform random policy's) mean return per
    level of ``params_batch`` (params with a leading level axis), each over
    ``num_envs * episodes`` complete episodes; cached per (env, level, policy)."""
    if not can_play(env):
        raise ValueError(f"{getattr(env, 'id', env)}: the oracle plays grid envs (grid/*) only")
    params_batch = jax.tree_util.tree_map(np.asarray, params_batch)
    n = int(np.asarray(params_batch.max_steps_in_episode).shape[0])
    levels = [jax.tree_util.tree_map(lambda x: x[i], params_batch) for i in range(n)]
    keys = [optimal.cache_key(env, p, policy, num_envs, episodes, seed) for p in levels]
    todo = [i for i, k in enumerate(keys) if k not in _CACHE]
    if todo:
        batch = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[levels[i] for i in todo])
        steps = int(episodes * np.max(np.asarray(batch.max_steps_in_episode)))
        fn = jax.jit(jax.vmap(lambda p, k: _level_returns(env, p, k, steps, num_envs,
                                                          episodes, policy)))
        rngs = jnp.stack([jax.random.PRNGKey(seed)] * len(todo))
        means, counts = jax.device_get(fn(batch, rngs))
        for j, i in enumerate(todo):
            if int(counts[j]) < num_envs * episodes:
                raise RuntimeError(f"{getattr(env, 'id', env)}: the {policy} policy completed only "
                                   f"{int(counts[j])} of {num_envs * episodes} episodes")
            _CACHE[keys[i]] = float(means[j])
    return [_CACHE[k] for k in keys]


def oracle_return(env: Any, params: Any, **kwargs: Any) -> float:
    """:func:`oracle_returns` of one level."""
    batch = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], params)
    return oracle_returns(env, batch, **kwargs)[0]


def _per_level(method: str, env: Any, params_batch: Any, policy: str) -> Sequence[float]:
    """``policy`` ("best" or "random") returns per level of a batch (leading axis), measured
    the way ``method`` says: exactly (``optimal``, :mod:`metabench.envs.optimal`) or by
    simulation with the oracle's episode protocol (``oracle``)."""
    params_batch = jax.tree_util.tree_map(np.asarray, params_batch)
    if method == "oracle":
        return oracle_returns(env, params_batch,
                              policy="oracle" if policy == "best" else "random")
    if method == "optimal":
        exact = optimal.optimal_return if policy == "best" else optimal.random_return_exact
        n = int(np.asarray(jax.tree_util.tree_leaves(params_batch)[0]).shape[0])
        return [exact(env, jax.tree_util.tree_map(lambda x: x[i], params_batch))
                for i in range(n)]
    raise ValueError(f"unknown reference method {method!r}; expected optimal or oracle")


def level_references(method: str, env: Any, params_batch: Any) -> Sequence[float]:
    """Per-level references of a batch of levels (leading axis): ``optimal`` (exact,
    :mod:`metabench.envs.optimal`) or ``oracle`` (this module)."""
    return _per_level(method, env, params_batch, "best")


def level_randoms(method: str, env: Any, params_batch: Any) -> Sequence[float]:
    """The uniform random policy's expected return per level, measured the way ``method``'s
    reference is. A per-level reference needs a per-level random: a level whose reference is
    below the mean random return over levels would otherwise flip the sign of its scores."""
    return _per_level(method, env, params_batch, "random")
