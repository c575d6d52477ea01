"""What a grid level is: its parameters, the paper's settings (sizes, walls, objects) and the
jittable level generators that redraw a level per lifetime. :mod:`metabench.envs.grids` holds
the environment that plays a level, and the notes on how these follow Oh et al. (2020).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DEFAULT_LEVEL_SEED = 0


@struct.dataclass
class GridParams:
    """One level. Shapes are static per env id: ``[H, W]`` walls, ``[K]`` object slots."""

    walls: jax.Array
    """bool ``[H, W]``: wall cells (a padded env walls its unused area)."""
    obj_reward: jax.Array
    """float32 ``[K]``: reward for collecting each object."""
    obj_term: jax.Array
    """float32 ``[K]``: probability that collecting it ends the episode."""
    obj_respawn: jax.Array
    """float32 ``[K]``: per-step probability that an absent object comes back."""
    obj_type: jax.Array
    """int32 ``[K]``: observation channel of each object (random grids)."""
    obj_active: jax.Array
    """bool ``[K]``: which slots hold an object in this level."""
    obj_pos: jax.Array
    """int32 ``[K]``: fixed cell index ``row * W + col`` of each object (tabular grids)."""
    start_pos: jax.Array
    """int32: the agent's start cell, or -1 for a random free cell each episode."""
    max_steps_in_episode: jax.Array
    """int32: episodes are truncated after this many steps."""
    level_seed: jax.Array
    """int32: -1 uses these params as given; >= 0 redraws the level from this seed."""


# --- settings ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridSetting:
    """A fixed grid setting of the paper."""

    size: tuple[int, int]
    """(rows, cols)."""
    objects: tuple[tuple[float, float, float, int], ...]
    """(reward, termination prob, respawn prob, count) per object type."""
    max_steps: int
    tabular: bool
    walls: tuple[str, ...] = ()
    """Rows of ``#`` (wall) and ``.`` (free); empty for no walls."""


# wall maps of jinPrelude/LPG-miniworld-gymnasium (maps/*.txt, border removed)
LONGER_WALLS = (
    "....#....",
    ".........",
    "....#....",
    "...###...",
    "....#....",
    ".........",
    "....#....",
)
LONG_DENSE_WALLS = (
    "...........",
    ".....#.....",
    ".....#.....",
    ".....#.....",
    "##.#####.##",
    ".....#.....",
    ".....#.....",
    "...........",
    ".....#.....",
    ".....#.....",
    ".....#.....",
)
SMALL_WALLS = (
    ".......",
    "..#....",
    ".......",
    "....#..",
    ".......",
)
_DENSE = ((1.0, 0.0, 0.05, 2), (-1.0, 0.5, 0.1, 1), (-1.0, 0.0, 0.5, 1))
_LONG = ((1.0, 0.0, 0.01, 2), (-1.0, 0.5, 1.0, 2))

SETTINGS: dict[str, GridSetting] = {
    "tabular-dense": GridSetting((11, 11), _DENSE, 500, True),
    "tabular-sparse": GridSetting((13, 13), ((1.0, 1.0, 0.0, 1), (-1.0, 1.0, 0.0, 1)), 50, True),
    "tabular-long": GridSetting((11, 11), _LONG, 1000, True),
    "tabular-longer": GridSetting((7, 9), ((1.0, 0.1, 0.01, 2), (-1.0, 0.8, 1.0, 5)), 2000, True,
                                  LONGER_WALLS),
    "tabular-long_dense": GridSetting((11, 11), ((1.0, 0.0, 0.005, 4),), 2000, True,
                                      LONG_DENSE_WALLS),
    "random-dense": GridSetting((11, 11), _DENSE, 500, False),
    "random-long": GridSetting((11, 11), _LONG, 1000, False),
    "random-small": GridSetting((5, 7), ((1.0, 0.0, 0.05, 2), (-1.0, 0.5, 0.1, 2)), 500, False,
                                SMALL_WALLS),
    "random-small_sparse": GridSetting((5, 7), ((1.0, 1.0, 1.0, 1), (-1.0, 1.0, 1.0, 2)), 50,
                                       False),
    "random-very_dense": GridSetting((11, 11), ((1.0, 0.0, 1.0, 1),), 2000, False),
}

# grid/procgen
PROCGEN_MAX_SIZE = 11
PROCGEN_MIN_SIZE = 5
PROCGEN_MAX_OBJECTS = 5
PROCGEN_MAX_WALL_DENSITY = 0.25
PROCGEN_STEPS = (50, 1000)


def setting_params(s: GridSetting) -> GridParams:
    """The setting's params with placeholder cells (level generation fills them in)."""
    h, w = s.size
    walls = np.zeros((h, w), bool)
    if s.walls:
        walls = np.array([[ch == "#" for ch in row] for row in s.walls], bool)
        assert walls.shape == (h, w), (s, walls.shape)
    reward, term, respawn, types = [], [], [], []
    for t, (r, p_term, p_resp, count) in enumerate(s.objects):
        reward += [r] * count
        term += [p_term] * count
        respawn += [p_resp] * count
        types += [t] * count
    k = len(reward)
    return GridParams(
        walls=jnp.asarray(walls),
        obj_reward=jnp.asarray(reward, jnp.float32),
        obj_term=jnp.asarray(term, jnp.float32),
        obj_respawn=jnp.asarray(respawn, jnp.float32),
        obj_type=jnp.asarray(types, jnp.int32),
        obj_active=jnp.ones(k, bool),
        obj_pos=jnp.zeros(k, jnp.int32),
        start_pos=jnp.int32(0 if s.tabular else -1),
        max_steps_in_episode=jnp.int32(s.max_steps),
        level_seed=jnp.int32(-1),
    )


# --- level generation (jittable) ---------------------------------------------------------


def tabular_level(key: jax.Array, p: GridParams) -> GridParams:
    """Distinct random free cells for the start and every object slot (walls kept)."""
    k = p.obj_pos.shape[0]
    free = ~p.walls.reshape(-1)
    # argsort of uniform scores: a uniformly random ordering of the free cells (exact ints
    # and comparisons, so identical eagerly and under jit)
    scores = jnp.where(free, jax.random.uniform(key, free.shape), 2.0)
    cells = jnp.argsort(scores)[: k + 1].astype(jnp.int32)
    return p.replace(start_pos=cells[0], obj_pos=cells[1:])


def no_level(key: jax.Array, p: GridParams) -> GridParams:
    del key
    return p


def _loguniform(u, lo, hi):
    """Maps uniform [0, 1) draws to log-uniform [lo, hi)."""
    return jnp.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _shift_or(m: jax.Array) -> jax.Array:
    """``m`` OR its four neighbours (no wrap-around)."""
    out = m
    out = out.at[1:, :].set(out[1:, :] | m[:-1, :])
    out = out.at[:-1, :].set(out[:-1, :] | m[1:, :])
    out = out.at[:, 1:].set(out[:, 1:] | m[:, :-1])
    out = out.at[:, :-1].set(out[:, :-1] | m[:, 1:])
    return out


def procgen_level(key: jax.Array, p: GridParams) -> GridParams:
    n, k = PROCGEN_MAX_SIZE, PROCGEN_MAX_OBJECTS
    # one uniform draw, cut into pieces (fewer PRNG calls compile faster)
    u = jax.random.uniform(key, (5 + 4 * k + 2 * n * n,))
    u_size, u_density, u_count, u_steps = u[0:2], u[2], u[3], u[4]
    u_reward, u_zero, u_term, u_resp = (u[5 + i * k: 5 + (i + 1) * k] for i in range(4))
    u_walls = u[5 + 4 * k: 5 + 4 * k + n * n].reshape(n, n)
    u_root = u[5 + 4 * k + n * n:]

    span = n - PROCGEN_MIN_SIZE + 1
    h, w = PROCGEN_MIN_SIZE + jnp.minimum(jnp.floor(u_size * span), span - 1).astype(jnp.int32)
    rows, cols = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    inside = (rows < h) & (cols < w)
    free = inside & ~(u_walls < u_density * PROCGEN_MAX_WALL_DENSITY)
    # keep only the region of a random free root cell, so every free cell is reachable
    root = jnp.argmax(jnp.where(free.reshape(-1), u_root, -1.0))
    reach = (jnp.arange(n * n) == root).reshape(n, n) & free
    reach = jax.lax.fori_loop(0, n * n, lambda _, r: _shift_or(r) & free, reach)
    free = jnp.where(reach.sum() >= k + 2, reach, inside)

    count = 1 + jnp.minimum(jnp.floor(u_count * k), k - 1).astype(jnp.int32)
    reward = u_reward * 2.0 - 1.0
    reward = reward.at[0].set(jnp.abs(reward[0]))
    term = jnp.where(u_zero < 0.5, 0.0, _loguniform(u_term, 0.01, 1.0))
    respawn = _loguniform(u_resp, 0.005, 1.0)
    steps = jnp.round(_loguniform(u_steps, *PROCGEN_STEPS)).astype(jnp.int32)
    return p.replace(
        walls=~free,
        obj_reward=reward.astype(jnp.float32),
        obj_term=term.astype(jnp.float32),
        obj_respawn=respawn.astype(jnp.float32),
        obj_type=jnp.arange(k, dtype=jnp.int32),
        obj_active=jnp.arange(k) < count,
        obj_pos=jnp.zeros(k, jnp.int32),
        start_pos=jnp.int32(-1),
        max_steps_in_episode=steps,
    )


def procgen_base() -> GridParams:
    n, k = PROCGEN_MAX_SIZE, PROCGEN_MAX_OBJECTS
    return GridParams(
        walls=jnp.zeros((n, n), bool), obj_reward=jnp.zeros(k, jnp.float32),
        obj_term=jnp.zeros(k, jnp.float32), obj_respawn=jnp.zeros(k, jnp.float32),
        obj_type=jnp.arange(k, dtype=jnp.int32), obj_active=jnp.ones(k, bool),
        obj_pos=jnp.zeros(k, jnp.int32), start_pos=jnp.int32(-1),
        max_steps_in_episode=jnp.int32(PROCGEN_STEPS[1]), level_seed=jnp.int32(-1))


def level_key(seed: jax.Array) -> jax.Array:
    return jax.random.PRNGKey(jnp.maximum(jnp.asarray(seed, jnp.int32), 0))


def sample_procgen_params(key: jax.Array) -> GridParams:
    """A random ``grid/procgen`` level (jittable, vmappable); ``level_seed`` is kept at -1
    so the result can be used, and overridden, as is."""
    return procgen_level(key, procgen_base())
