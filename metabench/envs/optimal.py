"""Exact optimal (and uniform-random) returns of the LPG envs, computed from their dynamics.

Used to normalise scores as ``(R - random) / (optimal - random)`` per level (a task's
``normalise: {reference: optimal}``), and by ``discover lpg`` for the true state values.

**Tabular grids** (``grid/tabular-*``, with or without ``-collect``). The state is (agent cell,
presence mask) with ``mask = sum_i present_i << i``, exactly the index of the tabular
observation (``cell * 2**K + mask``). One step of the env (see :mod:`metabench.envs.grids`):
move (or stay) to a target cell; collect the present objects on the collect cell (the
agent's new cell for auto-collect moves; the target cell of a collect action), adding their
rewards, terminating with probability ``1 - prod(1 - term_i)``, and clearing their bits; then
every active object absent at the *start* of the step reappears independently with its
respawn probability. With ``V`` a value over (cell, mask), the value of arriving at (or
collecting on) cell ``c`` from starting mask ``m`` is::

    Y[c, m] = reward[c, m] + cont[c, m] * E_R[ V[c', (m | R) & ~hit[c, m]] ]

where ``R`` is the random set of respawns among ``~m & active``. The expectation over ``R``
factors over slots: with ``U[c', m] = V[c', m & ~objects_on[c]]`` (a gather), ``E_R[U(m|R)]``
is ``T_K ... T_1 U`` where ``T_i`` replaces, on the half of the mask axis whose bit ``i`` is 0,
``U`` by ``p_i U[bit i set] + (1 - p_i) U`` (``K`` cheap passes instead of a ``2**K x 2**K``
matrix). Backward induction over the time to go (``max_steps_in_episode`` steps; termination
absorbs, truncation ends) gives the optimal expected undiscounted return from the start state;
the same recursion with the mean over actions gives the uniform-random policy's; value
iteration with a discount gives the discounted optimal values ``V*[cell * 2**K + mask]``.

**Chains** (``chain/*``): a recursion over (steps taken, branch), optimum 1 (the noise has
mean 0); random 0.

**Random grids and procgen** are not solved here (objects respawn at random cells, so the
state space is far larger): :func:`optimal_return` raises :class:`UnsolvableEnvError`; tasks
use ``reference: oracle`` there (:mod:`metabench.envs.oracle`).

Results are cached per (env id, params) within a process.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import jax
import numpy as np

from metabench.envs import chains, grids

__all__ = [
    "UnsolvableEnvError",
    "can_solve",
    "optimal_return",
    "random_return_exact",
    "optimal_values",
    "optimal_policy",
    "TabularModel",
    "tabular_model",
]


class UnsolvableEnvError(ValueError):
    """The exact solver does not handle this env (say which envs it does)."""


def _env_id(env: Any) -> str:
    return str(getattr(env, "id", env))


def can_solve(env: Any) -> bool:
    """Whether :func:`optimal_return` handles ``env``: tabular grids and chains."""
    if isinstance(env, chains.ChainEnv):
        return True
    return isinstance(env, grids.GridEnv) and bool(env.tabular)


def _require(env: Any) -> None:
    if not can_solve(env):
        raise UnsolvableEnvError(
            f"{_env_id(env)}: no exact optimum; the solver handles tabular grids "
            f"(grid/tabular-*) and chains (chain/*) only: objects that respawn at random "
            f"cells make the state space intractable (use reference: oracle or a number)")


# --- tabular grid model ---------------------------------------------------------------------


class TabularModel(NamedTuple):
    """One tabular grid level as arrays (``C = H*W`` cells, ``M = 2**K`` masks, ``A`` actions)."""

    cells: int
    num_objects: int
    start: int
    """Start state index ``cell * M + mask``."""
    horizon: int
    move: np.ndarray
    """int ``[C, 9]``: the agent's cell after a move in each direction (0 = stay)."""
    collect_target: np.ndarray | None
    """int ``[C, 9]``: collect actions' target cell, or ``C`` (a dummy cell with nothing on
    it) when off the board or a wall; None for auto-collect envs."""
    reward: np.ndarray
    """``[C + 1, M]``: reward of collecting on cell c from mask m."""
    cont: np.ndarray
    """``[C + 1, M]``: probability the episode goes on after collecting on cell c."""
    clear: np.ndarray
    """int ``[C + 1, M]``: the mask after collecting on cell c."""
    respawn: np.ndarray
    """``[K]``: per-step respawn probability (0 for inactive slots)."""


def _leaves(params: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def cache_key(env: Any, params: Any, *extra: Any) -> tuple:
    h = hashlib.sha256()
    for x in _leaves(params):
        h.update(str((x.dtype, x.shape)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return (_env_id(env), h.hexdigest(), *extra)


_MODELS: dict[tuple, TabularModel] = {}


def tabular_model(env: Any, params: Any) -> TabularModel:
    """The level's transition structure (cached)."""
    _require(env)
    key = cache_key(env, params)
    if key in _MODELS:
        return _MODELS[key]
    h, w, k = int(env.height), int(env.width), int(env.num_objects)
    c_n, m_n = h * w, 2 ** k
    walls = np.asarray(params.walls, bool).reshape(-1)
    if walls.size != c_n:
        raise ValueError(f"{_env_id(env)}: params have {walls.size} cells, expected {c_n}")
    rows, cols = np.divmod(np.arange(c_n), w)
    drow, dcol = np.asarray(grids.DROW), np.asarray(grids.DCOL)
    r2, c2 = rows[:, None] + drow[None, :], cols[:, None] + dcol[None, :]
    on = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
    target = np.clip(r2, 0, h - 1) * w + np.clip(c2, 0, w - 1)
    ok = on & ~walls[target]
    move = np.where(ok, target, np.arange(c_n)[:, None])
    collect = env.collect_actions
    collect_target = np.where(ok, target, c_n) if collect else None

    active = np.asarray(params.obj_active, bool).reshape(k)
    pos = np.asarray(params.obj_pos, np.int64).reshape(k)
    rew = np.asarray(params.obj_reward, np.float64).reshape(k)
    term = np.asarray(params.obj_term, np.float64).reshape(k)
    resp = np.where(active, np.asarray(params.obj_respawn, np.float64).reshape(k), 0.0)
    masks = np.arange(m_n)
    bits = (masks[:, None] >> np.arange(k)[None, :]) & 1  # [M, K]
    # objects on each cell (plus the dummy cell C, which holds none); inactive slots hold none
    on_cell = np.zeros((c_n + 1, k), bool)
    on_cell[pos[active], np.flatnonzero(active)] = True
    hit = bits[None, :, :].astype(bool) & on_cell[:, None, :]  # [C+1, M, K]
    reward = (hit * rew).sum(-1)
    cont = np.where(hit, 1.0 - term, 1.0).prod(-1)
    weights = (1 << np.arange(k))
    clear = masks[None, :] & ~(on_cell @ weights)[:, None]
    start_cell = int(np.asarray(params.start_pos))
    if start_cell < 0:
        raise UnsolvableEnvError(f"{_env_id(env)}: start_pos = -1 (a random start cell per "
                                 f"episode) is not supported by the exact solver")
    start_mask = int((active * weights).sum())  # every active object present at reset
    model = TabularModel(c_n, k, start_cell * m_n + start_mask,
                         int(np.asarray(params.max_steps_in_episode)), move, collect_target,
                         reward, cont, clear.astype(np.int64), resp)
    _MODELS[key] = model
    return model


def _respawn_expectation(u: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``E_R[u[:, m | R]]`` for ``u`` of shape ``[N, 2**K]``, ``R`` the independent respawns
    (slot i with probability ``p[i]``) among the bits absent from ``m``: slot by slot."""
    k = p.shape[0]
    n = u.shape[0]
    for i in range(k):
        if p[i] <= 0.0:
            continue
        # bit i of the mask is axis 1 of [N, 2**(K-1-i), 2, 2**i]
        v = u.reshape(n, 2 ** (k - 1 - i), 2, 2 ** i)
        absent, present = v[:, :, 0, :], v[:, :, 1, :]
        out = np.empty_like(v)
        out[:, :, 0, :] = p[i] * present + (1.0 - p[i]) * absent
        out[:, :, 1, :] = present
        u = out.reshape(n, -1)
    return u


def _q_values(m: TabularModel, v: np.ndarray, discount: float = 1.0) -> np.ndarray:
    """``Q[C, M, A]`` for the next-state values ``v[C, M]`` (undiscounted: the value with
    one less step to go)."""
    c_n = m.cells
    rows = np.arange(c_n)[:, None]
    if m.collect_target is None:
        # arrive at c (move), collect there, respawn
        u = v[rows, m.clear[:c_n]]
        y = m.reward[:c_n] + m.cont[:c_n] * discount * _respawn_expectation(u, m.respawn)
        return np.moveaxis(y[m.move], 1, 2)  # y[move[s, a], mask] -> [C, M, 9]
    # moves without collecting
    z = discount * _respawn_expectation(v, m.respawn)
    q_move = np.moveaxis(z[m.move], 1, 2)
    q_col = np.empty_like(q_move)
    for d in range(m.collect_target.shape[1]):
        t = m.collect_target[:, d]  # [C], C means "nothing to collect"
        u = v[rows, m.clear[t]]  # stay at s, clear the objects on t
        g = _respawn_expectation(u, m.respawn)
        q_col[:, :, d] = m.reward[t] + m.cont[t] * discount * g
    return np.concatenate([q_move, q_col], axis=2)


def _backward(m: TabularModel, mode: str, keep_policy: bool = False):
    v = np.zeros((m.cells, 2 ** m.num_objects))
    policy = []
    for _ in range(m.horizon):
        q = _q_values(m, v)
        if keep_policy:
            policy.append(q.argmax(-1).astype(np.int8).reshape(-1))
        v = q.max(-1) if mode == "max" else q.mean(-1)
    return v.reshape(-1), policy[::-1]


_RESULTS: dict[tuple, float] = {}


def _chain_value(env: Any, params: Any, mode: str) -> float:
    """Expected return from the chain's start by a recursion over (steps taken, branch)."""
    length = int(np.asarray(params.chain_length))
    good = int(np.asarray(params.good_action))

    def mean_reward(step: int, branch: int) -> float:
        # the final step pays +1 on the good branch, else -1; earlier steps' noise has mean 0
        return (1.0 if branch == good else -1.0) if step >= length else 0.0

    first = []
    for a in (0, 1):  # the first action picks the branch; later actions do not matter
        rest = 0.0  # expected reward of steps pos+1 .. length after pos steps, backwards
        for pos in range(length - 1, 0, -1):
            rest = mean_reward(pos + 1, a) + rest
        first.append(mean_reward(1, a) + rest)
    return max(first) if mode == "max" else float(np.mean(first))


def _solve(env: Any, params: Any, mode: str) -> float:
    _require(env)
    key = cache_key(env, params, mode)
    if key not in _RESULTS:
        if isinstance(env, chains.ChainEnv):
            _RESULTS[key] = float(_chain_value(env, params, mode))
        else:
            m = tabular_model(env, params)
            v, _ = _backward(m, mode)
            _RESULTS[key] = float(v[m.start])
    return _RESULTS[key]


def optimal_return(env: Any, params: Any) -> float:
    """The optimal expected undiscounted return of one episode of ``env`` on the level
    ``params`` (one level: unbatched params), from its start state over
    ``max_steps_in_episode`` steps. Raises :class:`UnsolvableEnvError` for envs it cannot
    solve."""
    return _solve(env, params, "max")


def random_return_exact(env: Any, params: Any) -> float:
    """The expected return of one episode under the uniform-random policy, exactly."""
    return _solve(env, params, "mean")


def optimal_policy(env: Any, params: Any) -> np.ndarray:
    """A tabular grid's optimal finite-horizon policy: int8 ``[T, C * 2**K]``, the action
    at time ``t`` (steps taken) in state ``cell * 2**K + mask``."""
    m = tabular_model(env, params)
    _, policy = _backward(m, "max", keep_policy=True)
    return np.stack(policy)


def optimal_values(env: Any, params: Any, gamma: float, tol: float = 1e-6,
                   max_iters: int = 100_000) -> np.ndarray:
    """Discounted infinite-horizon optimal values ``V*[cell * 2**K + mask]`` of a tabular
    grid (value iteration to a sup-norm change below ``tol``; termination absorbs with value
    0), indexed like the tabular observation: ``V[obs.argmax()]``."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    m = tabular_model(env, params)
    key = cache_key(env, params, "values", float(gamma), float(tol))
    if key in _VALUES:
        return _VALUES[key].copy()
    v = np.zeros((m.cells, 2 ** m.num_objects))
    for _ in range(max_iters):
        new = _q_values(m, v, discount=gamma).max(-1)
        delta = np.abs(new - v).max()
        v = new
        if delta < tol:
            break
    _VALUES[key] = v.reshape(-1)
    return _VALUES[key].copy()


_VALUES: dict[tuple, np.ndarray] = {}
