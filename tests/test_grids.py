"""The LPG grid worlds (grid/*) and delayed chains (chain/*): conformance and hand-played
episodes."""

from __future__ import annotations

import functools
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import envs
from metabench.envs import conformance, make_param_sampler
from metabench.tasks.spec import ParamDistribution
from metabench.envs import grids
from metabench.envs.grids import GridEnv, GridParams, sample_procgen_params
from metabench.tasks import spec as spec_mod
from metabench.tasks.spec import EnvSpec, Normalise

GRID_IDS = [f"grid/{n}" for n in grids.GRID_NAMES]
# the conformance rollout compiles once per id: every setting, two 18-action ids, procgen
CONFORM_IDS = [f"grid/{n}" for n in (*grids.SETTINGS, "tabular-dense-collect",
                                      "random-small-collect", "procgen")]
CHAIN_IDS = ["chain/short", "chain/long", "chain/short-noisy", "chain/long-noisy",
             "chain/short-distractor", "chain/long-distractor"]
N, STEPS = 3, 12


def test_ids_are_registered():
    assert envs.registered("grid") == sorted(GRID_IDS)
    assert envs.registered("chain") == sorted(CHAIN_IDS)
    for i in GRID_IDS + CHAIN_IDS:
        assert envs.entry(i).jittable and envs.entry(i).offline and envs.entry(i).note


def _rollout(env):
    """A jitted batch rollout with uniformly random actions; params are an argument, so
    different params of the same env reuse one compilation."""
    run = conformance.rollout_fn(env, env.default_params, N, STEPS)

    def rollout(key, params):
        t = run(key, params)
        return t.obs0, (t.obs, t.reward, t.terminated, t.truncated, t.final_observation)

    return rollout


@pytest.mark.parametrize("env_id", CONFORM_IDS + CHAIN_IDS)
def test_env_conforms_under_jit_and_vmap(env_id):
    env, params = envs.make(env_id)
    assert env.id == env_id and env.jittable
    rollout = _rollout(env)
    out = rollout(jax.random.PRNGKey(0), params)
    obs0, (obs, r, term, trunc, final) = out
    space = env.observation_space(params)
    assert obs0.shape == (N, *space.shape) and obs.shape == final.shape == (STEPS, N, *space.shape)
    assert obs0.dtype == obs.dtype == final.dtype == jnp.float32 == space.dtype
    assert float(obs.min()) >= space.low and float(obs.max()) <= space.high
    assert r.shape == term.shape == trunc.shape == (STEPS, N)
    assert r.dtype == jnp.float32 and term.dtype == trunc.dtype == jnp.bool_
    assert np.all(np.isfinite(np.asarray(r)))
    assert not np.any(np.asarray(term) & np.asarray(trunc))
    # no episode ended: the observation is the step's own; otherwise it is a fresh reset
    done = np.asarray(term | trunc)
    np.testing.assert_array_equal(np.asarray(obs)[~done], np.asarray(final)[~done])
    n_actions = 2 if env_id.startswith("chain/") else 18 if env_id.endswith("-collect") else 9
    assert env.action_space(params).n == n_actions

    # same key, same trajectory; another key, another one
    again = rollout(jax.random.PRNGKey(0), params)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = rollout(jax.random.PRNGKey(1), params)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(other)))

    if env_id.startswith("grid/"):
        # truncation at the episode length: no object ends the episode, 5 steps per episode
        p = params.replace(max_steps_in_episode=jnp.int32(5),
                           obj_term=jnp.zeros_like(params.obj_term))
        _, (obs, r, term, trunc, final) = rollout(jax.random.PRNGKey(2), p)
        assert not np.any(np.asarray(term))
        expected = (np.arange(STEPS) % 5 == 4)[:, None].repeat(N, axis=1)
        np.testing.assert_array_equal(np.asarray(trunc), expected)


# --- hand-played levels --------------------------------------------------------------------
#
#   A  +  .  .      3 rows x 4 cols (cell = row * 4 + col)
#   .  #  .  -      A: start (cell 0); +: reward +1, never terminates, respawns w.p. 1 (cell 1)
#   .  .  .  .      #: wall (cell 5); -: reward -1, always terminates, never respawns (cell 7)

H, W = 3, 4
STAY, N_, NE, E_, SE, S_, SW, W_, NW = range(9)
COLLECT = 9  # + direction: 9 own cell, 10 N, ..., 17 NW


@functools.lru_cache(maxsize=None)
def _tiny_env(tabular: bool, collect: bool) -> GridEnv:
    """One env instance per kind, so its jitted step compiles once for all tests."""
    return GridEnv("tiny", height=H, width=W, num_objects=2, num_types=2, tabular=tabular,
                   base=lambda: _tiny_params(), level=grids.no_level, level_fields=(),
                   collect_actions=collect)


def _tiny_params(max_steps: int = 100) -> GridParams:
    return GridParams(
        walls=jnp.zeros((H, W), bool).at[1, 1].set(True),
        obj_reward=jnp.array([1.0, -1.0], jnp.float32),
        obj_term=jnp.array([0.0, 1.0], jnp.float32),
        obj_respawn=jnp.array([1.0, 0.0], jnp.float32),
        obj_type=jnp.array([0, 1], jnp.int32),
        obj_active=jnp.ones(2, bool),
        obj_pos=jnp.array([1, 7], jnp.int32),
        start_pos=jnp.int32(0),
        max_steps_in_episode=jnp.int32(max_steps),
        level_seed=jnp.int32(-1),
    )


def _tiny(tabular: bool, max_steps: int = 100, collect: bool = False):
    return _tiny_env(tabular, collect), _tiny_params(max_steps)


def _play(env, params, actions, seed=0):
    key = jax.random.PRNGKey(seed)
    obs, state = env.reset(key, params)
    out = []
    for a in actions:
        key, k = jax.random.split(key)
        obs, state, r, term, trunc, info = env.step(k, state, a, params)
        out.append((obs, state, float(r), bool(term), bool(trunc), info["final_observation"]))
    return out


def _index(cell, present):
    return cell * 4 + present[0] + 2 * present[1]


def test_tabular_grid_hand_played_episode_with_nine_actions():
    env, params = _tiny(tabular=True)
    assert env.num_actions == 9 and not env.collect_actions
    assert env.action_space(params).n == 9
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    assert obs.shape == (H * W * 4,) == env.observation_space(params).shape
    assert int(env.state_index(obs)) == _index(0, (1, 1)) == 3
    actions = [N_, E_, STAY, STAY, SE, SW, W_, NE, SW, E_, E_, NE]
    steps = _play(env, params, actions)
    cells = [int(s.agent) for _, s, *_ in steps[:-1]]
    # N off the board: stays; E onto +1 (collected); stay (+1 respawns under the agent); stay
    # (collects it again); SE; SW; W; NE into the wall: stays; SW off the board: stays; E; E;
    # NE onto -1, which ends the episode
    assert cells == [0, 1, 1, 1, 6, 9, 8, 8, 8, 9, 10]
    assert [r for _, _, r, *_ in steps] == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, -1]
    present = [tuple(np.asarray(s.present).astype(int)) for _, s, *_ in steps[:-1]]
    assert present[:5] == [(1, 1), (0, 1), (1, 1), (0, 1), (1, 1)]
    for obs, s, *_ in steps[:-1]:
        assert int(env.state_index(obs)) == int(env.tabular_index(s)) == _index(
            int(s.agent), np.asarray(s.present).astype(int))
        assert float(obs.sum()) == 1.0
    assert [t for *_, t, _, _ in steps] == [False] * 11 + [True]
    obs, state, _, term, trunc, final = steps[-1]
    assert term and not trunc
    assert int(env.state_index(final)) == _index(7, (1, 0))  # where the episode ended
    # a fresh episode from the fixed start cell with every object present
    assert int(state.agent) == 0 and int(state.time) == 0
    assert int(env.state_index(obs)) == 3


def test_diagonal_moves_need_only_a_free_target_cell():
    # a wall at (0, 1) and (1, 0): NE / SW / NW / SE slip between walls when the target is free
    env, params = _tiny(tabular=True)
    params = params.replace(walls=jnp.zeros((H, W), bool).at[0, 1].set(True).at[1, 0].set(True),
                            obj_pos=jnp.array([10, 11], jnp.int32),
                            obj_active=jnp.zeros(2, bool))
    steps = _play(env, params, [SE, NW, S_, E_, NW, N_, SW, W_])
    # SE from 0 to (1, 1); NW back to 0; S into a wall; E into a wall; NW off the board;
    # N off the board; SW off the board; W off the board
    assert [int(s.agent) for _, s, *_ in steps] == [5, 0, 0, 0, 0, 0, 0, 0]
    assert all(r == 0.0 and not t for _, _, r, t, *_ in steps)


def test_collect_actions_hand_played_episode():
    env, params = _tiny(tabular=True, collect=True)
    assert env.num_actions == 18 and env.collect_actions
    assert env.action_space(params).n == 18
    actions = [E_, COLLECT + STAY, COLLECT + S_, SE, COLLECT + W_, COLLECT + N_,
               COLLECT + NW, COLLECT + E_]
    steps = _play(env, params, actions)
    # E onto +1: a move collects nothing; collect here: +1; collect S: a wall, nothing (+1
    # respawns); SE; collect W: a wall; collect N: an empty cell; collect NW (cell 1): +1
    # without moving; collect E (cell 7): -1, which ends the episode
    assert [int(s.agent) for _, s, *_ in steps[:-1]] == [1, 1, 1, 6, 6, 6, 6]
    assert [r for _, _, r, *_ in steps] == [0, 1, 0, 0, 0, 0, 1, -1]
    present = [tuple(np.asarray(s.present).astype(int)) for _, s, *_ in steps[:-1]]
    assert present == [(1, 1), (0, 1), (1, 1), (1, 1), (1, 1), (1, 1), (0, 1)]
    assert [t for *_, t, _, _ in steps] == [False] * 7 + [True]
    assert int(env.state_index(steps[-1][5])) == _index(6, (1, 0))
    # walking onto the -1 object and staying there never collects it
    steps = _play(env, params, [S_, S_, E_, E_, NE, STAY, STAY])
    assert [int(s.agent) for _, s, *_ in steps] == [4, 8, 9, 10, 7, 7, 7]
    assert all(r == 0.0 and not t for _, _, r, t, *_ in steps)
    # collecting through a wall: from cell 4, collect E targets the wall at cell 5, and the
    # +1 behind it (moved to cell 6) stays
    p2 = params.replace(obj_pos=jnp.array([6, 7], jnp.int32))
    steps = _play(env, p2, [S_, COLLECT + E_, COLLECT + NE, COLLECT + SW])
    assert [r for _, _, r, *_ in steps] == [0, 0, 0, 0]
    assert np.asarray(steps[-1][1].present).tolist() == [True, True]


def test_termination_wins_over_truncation():
    env, params = _tiny(tabular=True, max_steps=3)
    steps = _play(env, params, [STAY, STAY, STAY, STAY])
    # the third step hits the limit: truncated; then a new episode from the start cell
    assert [(t, tr) for *_, t, tr, _ in steps[:3]] == [(False, False)] * 2 + [(False, True)]
    assert int(steps[2][1].agent) == 0 and int(steps[2][1].time) == 0
    # S to cell 4, SE to cell 9 on the last step: truncated; with the -1 object moved to
    # cell 9 that last step terminates instead
    steps = _play(env, params.replace(max_steps_in_episode=jnp.int32(2)), [S_, SE])
    assert steps[1][2:5] == (0.0, False, True)
    params = params.replace(obj_pos=jnp.array([1, 9], jnp.int32))
    steps = _play(env, params.replace(max_steps_in_episode=jnp.int32(2)), [S_, SE])
    assert steps[1][2:5] == (-1.0, True, False)


def test_tabular_index_and_observation_sizes():
    assert grids.tabular_index(5, [1, 0, 1]) == 5 * 8 + 5
    assert int(grids.tabular_index(jnp.int32(5), jnp.array([True, False, True]))) == 45
    np.testing.assert_array_equal(
        grids.tabular_index(np.array([0, 2]), np.array([[0, 1], [1, 1]])), [2, 11])
    for name, s in grids.SETTINGS.items():
        for suffix in ("", "-collect"):
            env, params = envs.make(f"grid/{name}{suffix}")
            k, (h, w) = sum(o[3] for o in s.objects), s.size
            assert (env.height, env.width, env.num_objects) == (h, w, k)
            assert env.action_space(params).n == env.num_actions == (18 if suffix else 9)
            assert env.collect_actions == bool(suffix)
            shape = (h * w * 2 ** k,) if s.tabular else (h, w, len(s.objects) + 2)
            assert env.observation_space(params).shape == shape
    env, params = envs.make("grid/tabular-longer")
    assert env.observation_space(params).shape == (7 * 9 * 2 ** 7,)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    assert int(env.state_index(obs)) == int(params.start_pos) * 128 + 127


def test_paper_settings():
    s = grids.SETTINGS
    assert {n: (v.size, v.max_steps, v.tabular) for n, v in s.items()} == {
        "tabular-dense": ((11, 11), 500, True),
        "tabular-sparse": ((13, 13), 50, True),
        "tabular-long": ((11, 11), 1000, True),
        "tabular-longer": ((7, 9), 2000, True),
        "tabular-long_dense": ((11, 11), 2000, True),
        "random-dense": ((11, 11), 500, False),
        "random-long": ((11, 11), 1000, False),
        "random-small": ((5, 7), 500, False),
        "random-small_sparse": ((5, 7), 50, False),
        "random-very_dense": ((11, 11), 2000, False),
    }
    dense = ((1, 0, .05, 2), (-1, .5, .1, 1), (-1, 0, .5, 1))
    long = ((1, 0, .01, 2), (-1, .5, 1, 2))
    assert s["tabular-dense"].objects == s["random-dense"].objects == dense
    assert s["tabular-sparse"].objects == ((1, 1, 0, 1), (-1, 1, 0, 1))
    assert s["tabular-long"].objects == s["random-long"].objects == long
    assert s["tabular-longer"].objects == ((1, .1, .01, 2), (-1, .8, 1, 5))
    assert s["tabular-long_dense"].objects == ((1, 0, .005, 4),)
    assert s["random-small"].objects == ((1, 0, .05, 2), (-1, .5, .1, 2))
    assert s["random-small_sparse"].objects == ((1, 1, 1, 1), (-1, 1, 1, 2))
    assert s["random-very_dense"].objects == ((1, 0, 1, 1),)
    walls = {
        "tabular-longer": ["....#....", ".........", "....#....", "...###...", "....#....",
                           ".........", "....#...."],
        "tabular-long_dense": ["...........", ".....#.....", ".....#.....", ".....#.....",
                               "##.#####.##", ".....#.....", ".....#.....", "...........",
                               ".....#.....", ".....#.....", ".....#....."],
        "random-small": [".......", "..#....", ".......", "....#..", "......."],
    }
    for name in grids.SETTINGS:
        _, params = envs.make(f"grid/{name}")
        got = ["".join("#" if x else "." for x in row) for row in np.asarray(params.walls)]
        h, w = grids.SETTINGS[name].size
        assert got == walls.get(name, ["." * w] * h), name
        if grids.SETTINGS[name].tabular:
            cells = np.append(np.asarray(params.obj_pos), int(params.start_pos))
            assert not np.asarray(params.walls).reshape(-1)[cells].any()
            assert len(set(cells.tolist())) == len(cells)


def test_levels_redraw_objects_and_start_per_lifetime():
    env, base = envs.make("grid/tabular-longer")
    dist = {"level_seed": ParamDistribution.parse({"uniform": [0, 1e9]})}
    p = jax.jit(jax.vmap(make_param_sampler(env, base, dist)))(
        jax.random.split(jax.random.PRNGKey(0), 32))
    starts, objs = np.asarray(p.start_pos), np.asarray(p.obj_pos)
    free = ~np.asarray(base.walls).reshape(-1)
    assert len(set(starts.tolist())) > 10 and len({o.tobytes() for o in objs}) == 32
    for start, o in zip(starts, objs):
        cells = np.append(o, start)
        assert free[cells].all() and len(set(cells.tolist())) == len(cells)
    np.testing.assert_array_equal(np.asarray(p.walls[3]), np.asarray(base.walls))
    # the start cell is fixed for the lifetime: every episode of a level starts there
    level = jax.tree_util.tree_map(lambda x: x[5], p)
    _, states = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(
        jax.random.split(jax.random.PRNGKey(1), 8), level)
    assert np.all(np.asarray(states.agent) == starts[5])
    assert np.asarray(states.present).all()


def test_random_grid_respawns_elsewhere_and_observes_a_map():
    env, params = _tiny(tabular=False)
    params = params.replace(obj_respawn=jnp.array([1.0, 1.0], jnp.float32),
                            obj_term=jnp.zeros(2, jnp.float32))
    key = jax.random.PRNGKey(3)
    obs, state = env.reset(key, params)
    assert obs.shape == (H, W, 4) and env.observation_space(params).shape == (H, W, 4)
    walls = np.asarray(params.walls).reshape(-1)
    for t in range(30):
        pos, present = np.asarray(state.obj_pos), np.asarray(state.present)
        agent = int(state.agent)
        assert not walls[agent] and not walls[pos].any() and pos[0] != pos[1]
        assert agent not in pos[present]
        o = np.asarray(obs).reshape(H * W, 4)
        assert o[:, 2].tolist() == np.eye(H * W)[agent].tolist()
        assert o[:, 3].tolist() == walls.astype(float).tolist()
        for k in range(2):
            assert o[:, k].sum() == present[k] and (not present[k] or o[pos[k], k] == 1)
        key, k_act, k_step = jax.random.split(key, 3)
        action = int(jax.random.randint(k_act, (), 0, 9))
        obs, new, r, term, trunc, _ = env.step(k_step, state, action, params)
        hit = present & (pos == int(new.agent))
        assert float(r) == float(np.dot(hit, [1.0, -1.0]))
        # collected objects are gone this step and (respawn prob 1) back on the next
        assert not np.any(np.asarray(new.present)[hit])
        assert np.all(np.asarray(new.present)[~present])
        state = new


def test_params_validation():
    with pytest.raises(ValueError, match="no parameter.*obj_rewards.*obj_reward"):
        envs.make("grid/tabular-dense", obj_rewards=1.0)
    with pytest.raises(ValueError, match="shape"):
        envs.make("grid/tabular-dense", obj_reward=[1.0, 2.0])
    with pytest.raises(ValueError, match="redraws obj_pos"):
        envs.make("grid/tabular-dense", level_seed=3, obj_pos=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="chain_length must be in"):
        envs.make("chain/short", chain_length=31)
    with pytest.raises(ValueError, match="good_action must be 0 or 1"):
        envs.make("chain/short", good_action=2)
    _, p = envs.make("grid/tabular-dense", max_steps_in_episode=77)
    assert int(p.max_steps_in_episode) == 77 and p.max_steps_in_episode.dtype == jnp.int32
    # level 0 is the default level; another seed moves the objects, not their kinds
    _, d = envs.make("grid/tabular-dense")
    _, p0 = envs.make("grid/tabular-dense", level_seed=0)
    _, p5 = envs.make("grid/tabular-dense", level_seed=5)
    np.testing.assert_array_equal(np.asarray(p0.obj_pos), np.asarray(d.obj_pos))
    assert not np.array_equal(np.asarray(p5.obj_pos), np.asarray(d.obj_pos))
    np.testing.assert_array_equal(np.asarray(p5.obj_reward), np.asarray(d.obj_reward))
    cells = np.append(np.asarray(p5.obj_pos), int(p5.start_pos))
    assert len(set(cells.tolist())) == len(cells)


# --- delayed chains ------------------------------------------------------------------------


@pytest.mark.parametrize("first", [0, 1])
def test_chain_delayed_reward(first):
    env, params = envs.make("chain/short", chain_length=7, good_action=0)
    key = jax.random.PRNGKey(first)
    obs, state = env.reset(key, params)
    assert int(jnp.argmax(obs)) == 0
    rewards, terms, seen = [], [], []
    for t in range(7):
        key, k = jax.random.split(key)
        action = first if t == 0 else t % 2  # later actions don't matter
        obs, state, r, term, trunc, info = env.step(k, state, action, params)
        rewards.append(float(r))
        terms.append(bool(term))
        assert not bool(trunc)
        seen.append(int(jnp.argmax(info["final_observation"])))
    assert rewards == [0.0] * 6 + [1.0 if first == 0 else -1.0]
    assert terms == [False] * 6 + [True]  # the episode is exactly chain_length steps
    # the state index encodes the branch: 1 + branch * max_length + pos - 1
    assert seen == [1 + first * 30 + i for i in range(7)]
    assert int(state.pos) == 0 and int(jnp.argmax(obs)) == 0  # auto-reset


def test_noisy_chain_rewards_are_plus_or_minus_one():
    env, params = envs.make("chain/long-noisy", chain_length=50, good_action=1)
    assert float(params.noise_scale) == 1.0
    n, steps = 64, 60
    t = conformance.rollout_fn(env, params, n, steps)(jax.random.PRNGKey(0))
    r, term = np.asarray(t.reward), np.asarray(t.terminated)
    assert term.sum() == n  # every copy ends exactly once, after 50 steps
    assert term[49].all() and not term[:49].any()
    assert set(np.unique(r[~term]).tolist()) == {-1.0, 1.0}
    assert abs(r[~term].mean()) < 0.05  # 64 * 59 fair coin flips
    assert set(np.unique(r[term]).tolist()) <= {-1.0, 1.0}
    # the final reward is +1 exactly when the first action was the good one
    steps_ = _play(env, params.replace(chain_length=jnp.int32(5)), [1, 0, 0, 0, 0, 0])
    assert steps_[4][2:4] == (1.0, True)
    steps_ = _play(env, params.replace(chain_length=jnp.int32(5)), [0, 1, 1, 1, 1])
    assert steps_[4][2:4] == (-1.0, True)
    assert all(abs(s[2]) == 1.0 for s in steps_)
    # noise_scale 0 turns the noise off
    quiet = params.replace(chain_length=jnp.int32(5), noise_scale=jnp.float32(0.0))
    assert [s[2] for s in _play(env, quiet, [1, 0, 0, 0, 0])] == [0.0] * 4 + [1.0]


@pytest.mark.parametrize("good", [0, 1])
def test_distractor_chain_observes_two_informative_bits_and_noise(good):
    env, params = envs.make("chain/long-distractor", chain_length=4, good_action=good)
    assert env.observation_space(params).shape == (22,)
    obs, _ = env.reset(jax.random.PRNGKey(0), params)
    assert np.asarray(obs)[:2].tolist() == [1.0, 0.0]
    for first in (0, 1):
        steps = _play(env, params, [first, 0, 1, 0, 1], seed=first)
        info = [np.asarray(s[0])[:2].tolist() for s in steps]
        finals = [np.asarray(s[5])[:2].tolist() for s in steps]
        taken = [0.0, 1.0] if first == good else [0.0, 0.0]
        # three steps along the branch, the fourth ends it (final obs still on the branch,
        # the returned obs is the next episode's start), then one step of the next episode
        assert info == [taken, taken, taken, [1.0, 0.0], [0.0, float(good == 1)]]
        assert finals[:4] == [taken] * 4
        assert [s[2] for s in steps[:4]] == [0.0, 0.0, 0.0, 1.0 if first == good else -1.0]
    # the 5 returned observations and the episode's last one (final_observation of step 4;
    # on the other steps final_observation is the returned observation)
    bits = np.stack([np.asarray(s[0])[2:] for s in steps] + [np.asarray(steps[3][5])[2:]])
    assert bits.shape == (6, 20) and set(np.unique(bits).tolist()) == {0.0, 1.0}
    assert len({b.tobytes() for b in bits}) == 6  # fresh bits at every observation


def test_chain_length_drawn_per_lifetime():
    env, base = envs.make("chain/short")
    dist = {"level_seed": ParamDistribution.parse({"uniform": [0, 1e9]})}
    p = jax.jit(jax.vmap(make_param_sampler(env, base, dist)))(
        jax.random.split(jax.random.PRNGKey(0), 256))
    lengths = np.asarray(p.chain_length)
    assert lengths.min() >= 5 and lengths.max() <= 30 and len(set(lengths.tolist())) > 20
    assert set(np.asarray(p.good_action).tolist()) == {0, 1}
    _, level0 = envs.make("chain/short", level_seed=0)
    assert int(level0.chain_length) == int(base.chain_length)  # the default is level 0
    s = jax.jit(env.sample_params)(jax.random.PRNGKey(1))
    assert 5 <= int(s.chain_length) <= 30 and int(s.level_seed) >= 0


# --- procgen -------------------------------------------------------------------------------


def _connected(free: np.ndarray) -> bool:
    cells = list(zip(*np.nonzero(free)))
    seen, todo = {cells[0]}, deque([cells[0]])
    while todo:
        r, c = todo.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            n = (r + dr, c + dc)
            if 0 <= n[0] < free.shape[0] and 0 <= n[1] < free.shape[1] and free[n] \
                    and n not in seen:
                seen.add(n)
                todo.append(n)
    return len(seen) == len(cells)


def test_procgen_levels_differ_and_are_valid():
    env, base = envs.make("grid/procgen")
    levels = jax.jit(jax.vmap(sample_procgen_params))(jax.random.split(jax.random.PRNGKey(0), 16))

    @jax.jit
    def resets(params):
        keys = jax.random.split(jax.random.PRNGKey(1), 8)
        return jax.vmap(jax.vmap(env.reset, in_axes=(0, None)), in_axes=(None, 0))(keys, params)

    obs, states = resets(levels)
    walls = np.asarray(levels.walls)
    assert len({w.tobytes() for w in walls}) == 16
    assert len(set(np.asarray(levels.max_steps_in_episode).tolist())) > 8
    counts = np.asarray(levels.obj_active).sum(1)
    assert counts.min() >= 1 and counts.max() <= 5 and len(set(counts.tolist())) > 1
    assert np.all(np.asarray(levels.obj_reward)[:, 0] > 0)
    p_term, p_resp = np.asarray(levels.obj_term), np.asarray(levels.obj_respawn)
    assert np.all((p_term >= 0) & (p_term <= 1) & (p_resp > 0) & (p_resp <= 1))
    for i in range(16):
        free = ~walls[i]
        assert _connected(free) and free.sum() >= 7
        rows, cols = np.nonzero(free)
        assert rows.max() < 11 and cols.max() < 11 and free[0].any() and free[:, 0].any()
        agent = np.asarray(states.agent[i])
        pos, present = np.asarray(states.obj_pos[i]), np.asarray(states.present[i])
        active = np.asarray(levels.obj_active[i])
        assert np.all(free.reshape(-1)[agent])
        for j in range(8):
            assert np.array_equal(present[j], active)
            p = pos[j][active]
            assert np.all(free.reshape(-1)[p]) and len(set(p.tolist())) == len(p)
            assert agent[j] not in p
    # the default level is level 0 and what a task's sampler draws from level_seed
    spec = EnvSpec("procgen", "grid/procgen",
                   {"level_seed": ParamDistribution.parse({"uniform": [0, 1e9]})},
                   Normalise(None, 1.0, False), {})
    env2, _, sampler = spec_mod.make_env(spec)
    assert env2 is env
    drawn = jax.jit(jax.vmap(sampler))(jax.random.split(jax.random.PRNGKey(0), 2))
    assert not np.array_equal(np.asarray(drawn.walls[0]), np.asarray(drawn.walls[1]))
    assert drawn.walls.shape == (2, *base.walls.shape)
