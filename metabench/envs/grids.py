"""The grid worlds of Oh et al. 2020 (LPG), as jittable gymnax-style envs: ``grid/<name>``.

Every grid is a board of ``H x W`` cells (cell index ``row * W + col``), some of them walls,
with ``K`` object *slots*. An object has a reward, a probability of ending the episode when it
is collected, and a per-step probability of respawning once it is gone.

**Actions** (Oh et al. 2020, appendix A): every ``grid/<name>`` has **9** actions, 0 stay and
the eight compass moves 1 N (row - 1), 2 NE (row - 1, col + 1), 3 E (col + 1), 4 SE, 5 S
(row + 1), 6 SW, 7 W (col - 1), 8 NW. The agent moves to the target cell if it is on the board
and not a wall, otherwise it stays where it is (only the target cell matters: a diagonal move
squeezes between two walls). After moving (or staying) it collects a present object on its
cell (*auto-collect*). ``grid/<name>-collect`` has **18** actions: 0-8 move as above *without*
collecting; 9-17 do not move and collect the present object on the cell in direction
``action - 9`` (9: the agent's own cell), if that cell is on the board and not a wall. The
paper draws 9 or 18 actions per lifetime; here the action count is static per env id (the
agent's policy head has a static size inside one compiled call), so a task that wants both
lists both ids. ``env.num_actions`` and ``env.collect_actions`` say which set an env has.

**A step**, in this order:

1. move / collect as above. Collecting an object gives its reward, ends the episode
   (``terminated``) with its termination probability, and makes it absent;
2. every active object that was absent at the *start* of this step (so not one collected in
   step 1) reappears with its respawn probability: a tabular object at its fixed cell, even
   if the agent stands there (it is then collected the next time the agent moves onto, stays
   on or collects that cell); a random-grid object at a uniformly random free cell that holds
   neither the agent nor another present object (it stays absent if there is none);
3. ``time += 1``; ``truncated = time >= max_steps_in_episode and not terminated``.

When the episode ends the env auto-resets and puts the pre-reset observation in
``info["final_observation"]``. At reset every active object is present.

Two kinds (Oh et al. 2020, appendix A):

* **tabular** grids: objects have fixed cells (they respawn where they were) and the agent
  starts every episode in the same cell. The observation is the one-hot of
  ``cell * 2**K + mask`` with ``mask = sum_i present_i << i`` (size ``H * W * 2**K``), so the
  state (agent cell, which objects are present) is Markov and a tabular agent indexes its
  table by ``env.state_index(obs)`` (the argmax); ``tabular_index(cell, present)`` maps a
  state to that index (for exact solvers).
* **random** grids: objects are placed at random free cells at every reset and respawn at a
  random free cell; the agent starts at a random free cell. The observation is a binary map
  ``[H, W, T + 2]`` (float32): one channel per object *type* (objects with the same reward,
  termination and respawn probabilities share a type), one for the agent, one for walls.

Settings (rows x cols; objects as (reward, termination prob, respawn prob) x count; episode
length), as in the paper's appendix:

=========================  =====  ===========================================  =====
id                          size   objects                                      steps
=========================  =====  ===========================================  =====
grid/tabular-dense          11x11  (+1, 0, .05)x2, (-1, .5, .1), (-1, 0, .5)    500
grid/tabular-sparse         13x13  (+1, 1, 0), (-1, 1, 0)                       50
grid/tabular-long           11x11  (+1, 0, .01)x2, (-1, .5, 1)x2                1000
grid/tabular-longer         7x9    (+1, .1, .01)x2, (-1, .8, 1)x5; walls        2000
grid/tabular-long_dense     11x11  (+1, 0, .005)x4; walls                       2000
grid/random-dense           11x11  as tabular-dense                             500
grid/random-long            11x11  as tabular-long                              1000
grid/random-small           5x7    (+1, 0, .05)x2, (-1, .5, .1)x2; walls        500
grid/random-small_sparse    5x7    (+1, 1, 1), (-1, 1, 1)x2                     50
grid/random-very_dense      11x11  (+1, 0, 1)                                   2000
=========================  =====  ===========================================  =====

(each also as ``grid/<name>-collect``). The wall maps (``SETTINGS[name].walls``, ``#`` wall)
and the 7x9 / 5x7 sizes are those of one public re-implementation of the appendix figures,
jinPrelude/LPG-miniworld-gymnasium (github.com/jinPrelude/LPG-miniworld-gymnasium, its
``maps/*.txt`` without the border)::

    tabular-longer   tabular-long_dense   random-small
    ....#....        ...........          .......
    .........        .....#.....          ..#....
    ....#....        .....#.....          .......
    ...###...        .....#.....          ....#..
    ....#....        ##.#####.##          .......
    .........        .....#.....
    ....#....        .....#.....
                     ...........
                     .....#.....
                     .....#.....
                     .....#.....

The JAX re-implementation groove (Jackson et al. 2023, github.com/EmptyJackson/groove)
differs: its ``longer`` is 9x9 with a wall down the centre column open at rows 1 and 7, and 2
+ 3 objects (its own comment says the reference has 2 + 5; we use 2 + 5); its ``long_dense``
walls column 5 (open at rows 0 and 7) and row 4 (open at columns 2 and 8); its
``rand_small`` and ``rand_sparse`` are 7x7 (``rand_small`` with the same two wall cells,
(1, 2) and (3, 4)). It also has 5 actions (stay + 4 moves) rather than 9 / 18.

Remaining differences from the paper, and why:

* The object cells and start cell of the tabular grids are not read off the paper's figures:
  they are drawn from level seed 0 (see *levels* below). The figures give no coordinates.
* The 9- / 18-action choice is per env id, not drawn per lifetime (static policy-head size).
* The tabular observation includes the object-presence bits, which makes the state Markov
  (as groove does); the paper's exact tabular state encoding is not given in the appendix.

**Params and levels.** ``GridParams`` (a flax struct of arrays, shapes static per env id)
holds everything that defines a level: walls, each object slot's reward / termination /
respawn probability / type / active flag, fixed cells, start cell, episode length and
``level_seed``. Params can be vmapped, overridden (``envs.make("grid/tabular-dense",
max_steps_in_episode=100)``) or sampled per seed. ``level_seed`` is the level-distribution
hook: ``-1`` (the default) uses the params as given; ``>= 0`` makes ``finalise_params``
(which the task's param sampler calls, jitted, once per seed) redraw the level's random parts
from that seed:

* tabular grids: the object cells and the start cell (distinct free cells), fixed for the
  lifetime (every episode starts in that cell);
* random grids: nothing (their placements are already random every episode);
* ``grid/procgen``: everything (see below).

Every env's ``default_params`` is level 0 (stored with ``level_seed = -1``), so
``level_seed: 0`` reproduces the default. A task draws one level per seed with::

    - env: grid/procgen
      params: {level_seed: {uniform: [0, 1000000000]}}   # a fresh level per seed
      # or {choice: [0, 1, ..., 9]} for a fixed set; disjoint ranges for train / test levels

which needs no change to ``metabench/tasks/spec.py``: ``make_param_sampler`` casts the draw to the
field's int32 dtype and calls ``finalise_params``. ``env.sample_params(key)`` and
``sample_procgen_params(key)`` do the same from a PRNG key. When ``level_seed >= 0`` the
fields it redraws overwrite any override of theirs; the factory rejects that combination
when both are constants. With ``start_pos = -1`` (only by override) a tabular grid starts
each episode at a random free cell holding no active object.

**``grid/procgen``** (for held-out testing; 9 actions): a random grid of height and width in
[5, 11], padded to 11x11 with the unused area walled; interior walls with a per-level density
in [0, 0.25] (free cells not 4-connected to a random root cell become walls, so every free
cell is reachable; if fewer than 7 cells remain the level has no interior walls); 1 to 5
objects (a mask over 5 slots, each slot its own type/channel) with rewards U(-1, 1) (the
first made positive), termination probability 0 with probability 1/2 else log-uniform in
[0.01, 1], respawn probability log-uniform in [0.005, 1]; episode length log-uniform in [50,
1000]. Objects and start are random every episode, as in the random grids; observation
``[11, 11, 7]``. These ranges are ours (the paper has no such distribution; groove samples
similar ones).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import spaces

from metabench.envs.api import Env
from metabench.envs.grid_levels import (DEFAULT_LEVEL_SEED, PROCGEN_MAX_OBJECTS, PROCGEN_MAX_SIZE,
                                        SETTINGS, GridParams, level_key, no_level, procgen_base,
                                        procgen_level, sample_procgen_params, setting_params,
                                        tabular_level)
from metabench.envs.registry import EnvEntry, register

NUM_MOVES = 9
"""Actions of ``grid/<name>``: 0 stay, 1 N, 2 NE, 3 E, 4 SE, 5 S, 6 SW, 7 W, 8 NW."""
NUM_COLLECT_ACTIONS = 18
"""Actions of ``grid/<name>-collect``: 0-8 move (no collecting), 9-17 collect in a direction."""
# row / column offsets of directions 0..8: stay, N, NE, E, SE, S, SW, W, NW
DROW = np.array([0, -1, -1, 0, 1, 1, 1, 0, -1], np.int32)
DCOL = np.array([0, 0, 1, 1, 1, 0, -1, -1, -1], np.int32)
COLLECT_SUFFIX = "-collect"

@struct.dataclass
class GridState:
    agent: jax.Array     # int32 cell index
    obj_pos: jax.Array   # int32 [K] cell index of each object
    present: jax.Array   # bool [K] whether each object is on the board
    time: jax.Array      # int32 steps taken this episode


# --- the environment ---------------------------------------------------------------------


def tabular_index(cell: Any, present: Any) -> Any:
    """The tabular observation index of a state: ``cell * 2**K + sum_i present_i << i``, for
    the agent's cell index ``cell`` (``row * W + col``) and the ``[..., K]`` object-presence
    flags ``present``. Works on numpy and jax arrays (and batches of them)."""
    xp = jnp if isinstance(present, jax.Array) or isinstance(cell, jax.Array) else np
    present = xp.asarray(present).astype(xp.int32)
    k = present.shape[-1]
    mask = xp.sum(present * (2 ** xp.arange(k, dtype=xp.int32)), axis=-1)
    return xp.asarray(cell, xp.int32) * (2 ** k) + mask



class GridEnv(Env):
    """A grid world: ``reset(key, params)``, ``step(key, state, action, params)``.

    ``step`` returns ``(obs, state, reward, terminated, truncated, info)``, auto-resets when
    the episode ends, and puts the pre-reset observation in ``info["final_observation"]``.
    """

    jittable = True

    def __init__(self, name: str, *, height: int, width: int, num_objects: int,
                 num_types: int, tabular: bool, base: Callable[[], GridParams],
                 level: Callable[[jax.Array, GridParams], GridParams],
                 level_fields: tuple[str, ...], collect_actions: bool = False):
        self.name = name
        self.id = f"grid/{name}"
        self.height, self.width = height, width
        self.num_objects, self.num_types = num_objects, num_types
        self.tabular = tabular
        self.collect_actions = collect_actions
        """True: 18 actions (9 moves without collecting, 9 collects); False: 9 auto-collecting
        moves."""
        self.num_actions = NUM_COLLECT_ACTIONS if collect_actions else NUM_MOVES
        self._base = base
        self._level = level
        self.level_fields = level_fields
        """Fields that ``level_seed >= 0`` redraws."""
        self._default: GridParams | None = None

    # -- params --

    @property
    def default_params(self) -> GridParams:
        """Level ``DEFAULT_LEVEL_SEED`` of this env, stored with ``level_seed = -1``."""
        if self._default is None:
            base = self._base()
            self._default = jax.jit(self._level)(level_key(DEFAULT_LEVEL_SEED), base)
        return self._default

    @partial(jax.jit, static_argnums=0)
    def finalise_params(self, params: GridParams) -> GridParams:
        """Redraws the level from ``level_seed`` when it is >= 0 (jittable)."""
        drawn = self._level(level_key(params.level_seed), params)
        use = jnp.asarray(params.level_seed) >= 0
        return jax.tree_util.tree_map(lambda a, b: jnp.where(use, a, b), drawn, params)

    def sample_params(self, key: jax.Array) -> GridParams:
        """A random level: the default params with a random ``level_seed`` (jittable)."""
        seed = jax.random.randint(key, (), 0, np.iinfo(np.int32).max)
        return self.finalise_params(self.default_params.replace(level_seed=seed))

    # -- dynamics --

    @property
    def one_hot_obs(self) -> bool:
        """Every observation is exactly one-hot (tabular grids), so an agent may index a table
        by it instead of multiplying."""
        return bool(self.tabular)

    @property
    def num_states(self) -> int:
        """Tabular grids: the observation size ``H * W * 2**K``."""
        return self.height * self.width * 2 ** self.num_objects

    def tabular_index(self, state: GridState) -> jax.Array:
        """The tabular observation index of ``state`` (see the module's ``tabular_index``)."""
        return tabular_index(state.agent, state.present)

    @staticmethod
    def state_index(obs: jax.Array) -> jax.Array:
        """The state index a tabular observation one-hot encodes: ``argmax(obs)``."""
        return jnp.argmax(obs, axis=-1)

    def _obs(self, state: GridState, params: GridParams) -> jax.Array:
        cells = self.height * self.width
        if self.tabular:
            return jax.nn.one_hot(self.tabular_index(state), self.num_states, dtype=jnp.float32)
        agent = jax.nn.one_hot(state.agent, cells, dtype=jnp.float32)
        objs = jnp.zeros((cells, self.num_types), jnp.float32)
        objs = objs.at[state.obj_pos, params.obj_type].add(state.present.astype(jnp.float32))
        walls = params.walls.reshape(-1).astype(jnp.float32)
        obs = jnp.concatenate([jnp.minimum(objs, 1.0), agent[:, None], walls[:, None]], axis=1)
        return obs.reshape(self.height, self.width, self.num_types + 2)

    def _place(self, scores, params, agent, obj_pos, present, place):
        """Puts each slot with ``place`` on a random free cell (not a wall, the agent or
        another object; distinct cells); a slot with no room stays absent. ``scores``:
        uniform ``[H*W]``, the free cells with the highest scores are used."""
        cells, k = self.height * self.width, self.num_objects
        occupied = jnp.zeros(cells, jnp.int32).at[obj_pos].add(present.astype(jnp.int32)) > 0
        allowed = ~params.walls.reshape(-1) & ~occupied & (jnp.arange(cells) != agent)
        best, cell = jax.lax.top_k(jnp.where(allowed, scores, -1.0), k)
        rank = jnp.clip(jnp.cumsum(place) - 1, 0, k - 1)  # the i-th slot placed gets cell i
        ok = place & (best[rank] >= 0.0)
        return jnp.where(ok, cell[rank].astype(jnp.int32), obj_pos), present | ok

    def _reset(self, key: jax.Array, params: GridParams) -> tuple[jax.Array, GridState]:
        cells = self.height * self.width
        # one draw for everything (fewer PRNG calls compile faster)
        u = jax.random.uniform(key, (1 if self.tabular else 2, cells))
        free = ~params.walls.reshape(-1)
        if self.tabular:
            on_obj = jnp.zeros(cells, jnp.int32).at[params.obj_pos].add(
                params.obj_active.astype(jnp.int32)) > 0
            free = free & ~on_obj
        random_start = jnp.argmax(jnp.where(free, u[0], -1.0))
        agent = jnp.where(params.start_pos >= 0, params.start_pos, random_start).astype(jnp.int32)
        if self.tabular:
            obj_pos = params.obj_pos.astype(jnp.int32)
            present = params.obj_active
        else:
            obj_pos, present = self._place(u[1], params, agent,
                                           jnp.zeros(self.num_objects, jnp.int32),
                                           jnp.zeros(self.num_objects, bool), params.obj_active)
        state = GridState(agent=agent, obj_pos=obj_pos, present=present, time=jnp.int32(0))
        return self._obs(state, params), state

    def _neighbour(self, cell, direction, params: GridParams):
        """``(target, ok)``: the cell in ``direction`` (0-8) from ``cell`` and whether it is on
        the board and not a wall."""
        h, w = self.height, self.width
        r = cell // w + jnp.asarray(DROW)[direction]
        c = cell % w + jnp.asarray(DCOL)[direction]
        on = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        target = (jnp.clip(r, 0, h - 1) * w + jnp.clip(c, 0, w - 1)).astype(jnp.int32)
        return target, on & ~params.walls.reshape(-1)[target]

    @partial(jax.jit, static_argnums=0)
    def reset(self, key: jax.Array, params: GridParams) -> tuple[jax.Array, GridState]:
        return self._reset(key, params)

    @partial(jax.jit, static_argnums=0)
    def step(self, key, state: GridState, action, params: GridParams):
        k_step, k_reset = jax.random.split(key)
        cells, k = self.height * self.width, self.num_objects
        u = jax.random.uniform(k_step, (2 * k + (0 if self.tabular else cells),))
        u_term, u_resp = u[:k], u[k:2 * k]
        action = jnp.clip(jnp.asarray(action, jnp.int32), 0, self.num_actions - 1)
        if self.collect_actions:
            moving = action < NUM_MOVES
            direction = jnp.where(moving, action, action - NUM_MOVES)
        else:
            moving, direction = jnp.bool_(True), action
        # the cell in `direction` from the agent, or the agent's own if off the board / a wall
        target, ok = self._neighbour(state.agent, direction, params)
        agent = jnp.where(moving & ok, target, state.agent).astype(jnp.int32)
        if self.collect_actions:
            # a move collects nothing; a collect action takes the object on its target cell
            collect_cell, collecting = target, ~moving & ok
        else:
            collect_cell, collecting = agent, jnp.bool_(True)

        hit = state.present & (state.obj_pos == collect_cell) & collecting
        reward = jnp.sum(jnp.where(hit, params.obj_reward, 0.0)).astype(jnp.float32)
        terminated = jnp.any(hit & (u_term < params.obj_term))
        present = state.present & ~hit
        # objects absent at the start of this step come back with their respawn probability
        respawn = (~state.present & params.obj_active
                   & (u_resp < params.obj_respawn))
        if self.tabular:
            obj_pos = state.obj_pos  # at its fixed cell, even under the agent
            present = present | respawn
        else:
            obj_pos, present = self._place(u[2 * k:], params, agent,
                                           state.obj_pos, present, respawn)
        time = state.time + 1
        truncated = (time >= params.max_steps_in_episode) & ~terminated
        state_st = GridState(agent=agent, obj_pos=obj_pos, present=present, time=time)
        obs_st = self._obs(state_st, params)

        obs_re, state_re = self._reset(k_reset, params)
        done = terminated | truncated
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), state_re, state_st)
        obs = jnp.where(done, obs_re, obs_st)
        return obs, state, reward, terminated, truncated, {"final_observation": obs_st}

    # -- spaces --

    def observation_space(self, params: GridParams | None = None) -> spaces.Box:
        if self.tabular:
            shape = (self.num_states,)
        else:
            shape = (self.height, self.width, self.num_types + 2)
        return spaces.Box(0.0, 1.0, shape, jnp.float32)

    def action_space(self, params: GridParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.num_actions)

    def __repr__(self) -> str:
        return f"GridEnv({self.name!r})"


# --- construction and registration -------------------------------------------------------


def override_params(env_id: str, params: Any, overrides: dict[str, Any],
                    level_fields: Sequence[str] = ()) -> Any:
    """``params.replace(**overrides)``, checking names, shapes, and that ``level_seed >= 0``
    is not combined with fields it would redraw."""
    fields = {f.name for f in dataclasses.fields(params)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{env_id} has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters are: {', '.join(sorted(fields))}")
    seed = overrides.get("level_seed")
    clash = sorted(set(overrides) & set(level_fields))
    if seed is not None and int(np.asarray(seed)) >= 0 and clash:
        raise ValueError(f"{env_id}: level_seed={int(np.asarray(seed))} redraws "
                         f"{', '.join(clash)}; set them with level_seed=-1 instead")
    cast = {}
    for name, value in overrides.items():
        default = jnp.asarray(getattr(params, name))
        v = jnp.asarray(value, dtype=default.dtype)
        if v.shape != default.shape:
            raise ValueError(f"{env_id}: parameter {name} must have shape {default.shape}, "
                             f"got {v.shape}")
        cast[name] = v
    return params.replace(**cast)


def _env_for_setting(name: str) -> GridEnv:
    collect = name.endswith(COLLECT_SUFFIX)
    s = SETTINGS[name[: -len(COLLECT_SUFFIX)] if collect else name]
    k = sum(o[3] for o in s.objects)
    return GridEnv(name, height=s.size[0], width=s.size[1], num_objects=k,
                   num_types=len(s.objects), tabular=s.tabular,
                   base=lambda: setting_params(s),
                   level=tabular_level if s.tabular else no_level,
                   level_fields=("obj_pos", "start_pos") if s.tabular else (),
                   collect_actions=collect)


def _procgen_env() -> GridEnv:
    n, k = PROCGEN_MAX_SIZE, PROCGEN_MAX_OBJECTS
    level_fields = tuple(f.name for f in dataclasses.fields(GridParams) if f.name != "level_seed")
    return GridEnv("procgen", height=n, width=n, num_objects=k, num_types=k, tabular=False,
                   base=procgen_base, level=procgen_level, level_fields=level_fields)


_ENVS: dict[str, GridEnv] = {}


def make_env(name: str) -> GridEnv:
    """The (cached) env instance for ``grid/<name>``: one instance per id, so jitted
    ``reset``/``step`` compile once."""
    if name not in _ENVS:
        _ENVS[name] = _procgen_env() if name == "procgen" else _env_for_setting(name)
    return _ENVS[name]


def _factory(name: str) -> Callable[..., tuple[GridEnv, GridParams]]:
    def make(**overrides: Any) -> tuple[GridEnv, GridParams]:
        env = make_env(name)
        params = env.default_params
        if overrides:
            params = override_params(env.id, params, overrides, env.level_fields)
            params = env.finalise_params(params)
        return env, params

    return make


def _note(name: str) -> str:
    if name == "procgen":
        return ("LPG-style procedurally generated grid (held-out levels), 9 actions: set "
                "level_seed to draw a level per seed")
    collect = name.endswith(COLLECT_SUFFIX)
    s = SETTINGS[name[: -len(COLLECT_SUFFIX)] if collect else name]
    kind = ("tabular (one-hot (cell, objects present) obs)" if s.tabular
            else "random objects (map obs)")
    acts = "18 actions (9 moves + 9 collects)" if collect else "9 actions (auto-collect)"
    return f"LPG grid world, {kind}, {s.size[0]}x{s.size[1]}, {s.max_steps} steps, {acts}"


GRID_NAMES = (*SETTINGS, *(n + COLLECT_SUFFIX for n in SETTINGS), "procgen")
"""Every registered ``grid/<name>``."""

for _name in GRID_NAMES:
    register(EnvEntry(id=f"grid/{_name}", factory=_factory(_name), jittable=True,
                      note=_note(_name)), overwrite=True)
