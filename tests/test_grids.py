"""The LPG grid worlds (grid/*) and delayed chains (chain/*): conformance and hand-played
episodes."""

from __future__ import annotations

from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import envs
from metabench.envs import ParamDistribution, conformance, make_param_sampler
from metabench.envs import grids
from metabench.envs.grids import GridEnv, GridParams, sample_procgen_params
from metabench.spec import EnvSpec, Normalise

GRID_IDS = [f"grid/{n}" for n in (*grids.SETTINGS, "procgen")]
CHAIN_IDS = ["chain/short", "chain/long", "chain/short-noisy", "chain/long-noisy",
             "chain/short-distractor", "chain/long-distractor"]
N, STEPS = 3, 12
UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3


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


@pytest.mark.parametrize("env_id", GRID_IDS + CHAIN_IDS)
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
    assert env.action_space(params).n == (2 if env_id.startswith("chain/") else 4)

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


# --- a hand-played 3x3 grid ----------------------------------------------------------------
#
#   A +  .      A: start (cell 0); +: reward +1, never terminates, respawns w.p. 1 (cell 1)
#   .  #  .     #: wall (cell 4)
#   .  .  -     -: reward -1, always terminates, never respawns (cell 8)


def _tiny(tabular: bool, max_steps: int = 100) -> tuple[GridEnv, GridParams]:
    params = GridParams(
        walls=jnp.zeros((3, 3), bool).at[1, 1].set(True),
        obj_reward=jnp.array([1.0, -1.0], jnp.float32),
        obj_term=jnp.array([0.0, 1.0], jnp.float32),
        obj_respawn=jnp.array([1.0, 0.0], jnp.float32),
        obj_type=jnp.array([0, 1], jnp.int32),
        obj_active=jnp.ones(2, bool),
        obj_pos=jnp.array([1, 8], jnp.int32),
        start_pos=jnp.int32(0),
        max_steps_in_episode=jnp.int32(max_steps),
        level_seed=jnp.int32(-1),
    )
    env = GridEnv("tiny", height=3, width=3, num_objects=2, num_types=2, tabular=tabular,
                  base=lambda: params, level=grids._no_level, level_fields=())
    return env, params


def _play(env, params, actions, seed=0):
    key = jax.random.PRNGKey(seed)
    obs, state = env.reset(key, params)
    out = []
    for a in actions:
        key, k = jax.random.split(key)
        obs, state, r, term, trunc, info = env.step(k, state, a, params)
        out.append((obs, state, float(r), bool(term), bool(trunc), info["final_observation"]))
    return out


def test_tabular_grid_hand_played_episode():
    env, params = _tiny(tabular=True)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    assert obs.shape == (9,) and int(jnp.argmax(obs)) == 0
    assert np.asarray(state.present).tolist() == [True, True]
    actions = [RIGHT, UP, LEFT, RIGHT, DOWN, RIGHT, DOWN, DOWN]
    steps = _play(env, params, actions)
    cells = [int(s.agent) for _, s, *_ in steps[:-1]]
    # right onto +1; up into the edge; left; right onto +1 again; down into the wall; right;
    # down; down onto -1, which ends the episode
    assert cells == [1, 1, 0, 1, 1, 2, 5]
    assert [r for _, _, r, *_ in steps] == [1, 0, 0, 1, 0, 0, 0, -1]
    present = [np.asarray(s.present).tolist() for _, s, *_ in steps[:-1]]
    # collected at once; the agent standing on its cell holds the respawn back; it is back
    # once the agent left
    assert present[0] == [False, True] and present[1] == [False, True]
    assert present[2] == [True, True] and present[3] == [False, True]
    for obs, s, *_ in steps[:-1]:
        assert int(jnp.argmax(obs)) == int(s.agent) and float(obs.sum()) == 1.0
    assert [t for *_, t, _, _ in steps] == [False] * 7 + [True]
    obs, state, _, term, trunc, final = steps[-1]
    assert term and not trunc
    assert int(jnp.argmax(final)) == 8  # where the episode ended
    assert int(state.agent) == 0 and int(state.time) == 0 and int(jnp.argmax(obs)) == 0
    assert np.asarray(state.present).tolist() == [True, True]  # a fresh episode


def test_termination_wins_over_truncation():
    env, params = _tiny(tabular=True, max_steps=3)
    steps = _play(env, params, [RIGHT, RIGHT, DOWN, DOWN])
    # the third step hits the limit: truncated; then a new episode from the start cell
    assert [(t, tr) for *_, t, tr, _ in steps[:3]] == [(False, False)] * 2 + [(False, True)]
    assert int(steps[2][1].agent) == 0
    params = params.replace(obj_pos=jnp.array([1, 2], jnp.int32))  # -1 object at cell 2
    steps = _play(env, params.replace(max_steps_in_episode=jnp.int32(2)), [RIGHT, RIGHT])
    assert steps[1][2:5] == (-1.0, True, False)


def test_random_grid_respawns_elsewhere_and_observes_a_map():
    env, params = _tiny(tabular=False)
    params = params.replace(obj_respawn=jnp.array([1.0, 1.0], jnp.float32),
                            obj_term=jnp.zeros(2, jnp.float32))
    key = jax.random.PRNGKey(3)
    obs, state = env.reset(key, params)
    assert obs.shape == (3, 3, 4) and env.observation_space(params).shape == (3, 3, 4)
    for t in range(30):
        pos, present = np.asarray(state.obj_pos), np.asarray(state.present)
        agent = int(state.agent)
        walls = np.asarray(params.walls).reshape(-1)
        assert not walls[agent] and not walls[pos].any() and pos[0] != pos[1]
        assert agent not in pos[present]
        o = np.asarray(obs).reshape(9, 4)
        assert o[:, 2].tolist() == np.eye(9)[agent].tolist()
        assert o[:, 3].tolist() == walls.astype(float).tolist()
        for k in range(2):
            assert o[:, k].sum() == present[k] and (not present[k] or o[pos[k], k] == 1)
        key, k_act, k_step = jax.random.split(key, 3)
        action = int(jax.random.randint(k_act, (), 0, 4))
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


def test_chain_noise_and_distractors():
    env, params = envs.make("chain/short-noisy", chain_length=5, good_action=1)
    steps = _play(env, params, [1, 0, 0, 0, 0])
    rewards = [s[2] for s in steps]
    assert all(r != 0.0 for r in rewards[:4]) and rewards[4] == 1.0
    env, params = envs.make("chain/long-distractor", chain_length=5)
    steps = _play(env, params, [0] * 3)
    bits = np.stack([np.asarray(s[0])[101:] for s in steps])
    assert bits.shape == (3, 20) and set(np.unique(bits)) <= {0.0, 1.0} and bits.std() > 0
    assert [int(np.argmax(np.asarray(s[0])[:101])) for s in steps] == [1, 2, 3]


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
    env2, _, sampler = spec.make()
    assert env2 is env
    drawn = jax.jit(jax.vmap(sampler))(jax.random.split(jax.random.PRNGKey(0), 2))
    assert not np.array_equal(np.asarray(drawn.walls[0]), np.asarray(drawn.walls[1]))
    assert drawn.walls.shape == (2, *base.walls.shape)
