"""The exact solver of metabench.envs.optimal: hand-solved levels, chains, and its optimal
policy played in the real jitted env matching the computed optimum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import envs
from metabench.envs import grids, optimal
from metabench.tasks import spec


def line_env(collect: bool = False) -> grids.GridEnv:
    """A 1x3 tabular board with one object (not registered)."""
    def base():
        return grids.GridParams(
            walls=jnp.zeros((1, 3), bool), obj_reward=jnp.ones(1, jnp.float32),
            obj_term=jnp.zeros(1, jnp.float32), obj_respawn=jnp.zeros(1, jnp.float32),
            obj_type=jnp.zeros(1, jnp.int32), obj_active=jnp.ones(1, bool),
            obj_pos=jnp.array([2], jnp.int32), start_pos=jnp.int32(0),
            max_steps_in_episode=jnp.int32(3), level_seed=jnp.int32(-1))
    return grids.GridEnv("test-line" + ("-collect" if collect else ""), height=1, width=3,
                         num_objects=1, num_types=1, tabular=True, base=base,
                         level=grids.no_level, level_fields=(), collect_actions=collect)


@pytest.mark.parametrize("term,respawn,steps,expected", [
    (0.0, 0.0, 1, 0.0),     # the object is two cells away
    (0.0, 0.0, 2, 1.0),     # E, E
    (0.0, 0.0, 9, 1.0),     # never comes back
    (0.0, 0.5, 4, 1.5),     # collect at step 2, respawns at step 3 w.p. 1/2, stay at step 4
    (0.5, 1.0, 4, 1.5),     # the first collection ends the episode w.p. 1/2
    (0.0, 1.0, 6, 3.0),     # steps 2, 4, 6
])
def test_hand_solved_line(term, respawn, steps, expected):
    env = line_env()
    p = env._base().replace(obj_term=jnp.array([term], jnp.float32),
                            obj_respawn=jnp.array([respawn], jnp.float32),
                            max_steps_in_episode=jnp.int32(steps))
    assert optimal.optimal_return(env, p) == pytest.approx(expected, abs=1e-12)


def test_hand_solved_random_and_collect_actions():
    env = line_env()
    p = env._base().replace(start_pos=jnp.int32(1), max_steps_in_episode=jnp.int32(1))
    assert optimal.optimal_return(env, p) == pytest.approx(1.0)
    # of the 9 actions only E reaches the object (NE / SE leave the board: stay)
    assert optimal.random_return_exact(env, p) == pytest.approx(1 / 9)
    env = line_env(collect=True)
    assert optimal.optimal_return(env, p) == pytest.approx(1.0)  # collect E
    assert optimal.random_return_exact(env, p) == pytest.approx(1 / 18)
    # collecting does not move the agent: collect E twice with an instant respawn in between
    p2 = p.replace(obj_respawn=jnp.array([1.0], jnp.float32), max_steps_in_episode=jnp.int32(3))
    assert optimal.optimal_return(env, p2) == pytest.approx(2.0)


def test_values_are_indexed_like_the_observation():
    env = line_env()
    p = env._base().replace(obj_respawn=jnp.array([1.0], jnp.float32))
    gamma = 0.9
    v = optimal.optimal_values(env, p, gamma)
    assert v.shape == (env.num_states,)
    # standing on the object's cell, object present: collect now (stay), then every 2 steps
    on = int(grids.tabular_index(2, np.array([True])))
    assert v[on] == pytest.approx(1 / (1 - gamma ** 2), rel=1e-4)
    obs, _ = env.reset(jax.random.PRNGKey(0), p)
    start = v[int(np.argmax(obs))]
    assert start == pytest.approx(gamma * v[on], rel=1e-4)  # one step away (0 -> 1 -> 2)


@pytest.mark.parametrize("env_id", ["chain/short", "chain/long-noisy", "chain/short-distractor"])
def test_chains_optimum_is_one_and_random_zero(env_id):
    env, _ = envs.make(env_id)
    for length, good in ((1, 0), (7, 1), (30, 0)):
        p = env.default_params.replace(chain_length=jnp.int32(length),
                                       good_action=jnp.int32(good))
        assert optimal.optimal_return(env, p) == 1.0
        assert optimal.random_return_exact(env, p) == 0.0


def test_unsolvable_envs_raise_a_clear_error():
    for env_id in ("grid/random-dense", "grid/procgen", "gymnax/CartPole-v1"):
        env, p = envs.make(env_id)
        assert not optimal.can_solve(env)
        with pytest.raises(optimal.UnsolvableEnvError, match="tabular grids"):
            optimal.optimal_return(env, p)


def play(env, params, policy: np.ndarray, episodes: int, seed: int = 0):
    """Mean and std error of the undiscounted return of ``episodes`` episodes in the real env,
    acting by ``policy[t, state index]`` in the first half of the episodes and uniformly at
    random in the second (one compiled call)."""
    horizon = int(params.max_steps_in_episode)
    table = jnp.asarray(policy, jnp.int32)

    def episode(key, random):
        k_reset, k_run = jax.random.split(key)
        _, state = env.reset(k_reset, params)

        def step(carry, key):
            state, ret, alive = carry
            k_act, k_step = jax.random.split(key)
            greedy = table[state.time, grids.tabular_index(state.agent, state.present)]
            action = jnp.where(random, jax.random.randint(k_act, (), 0, env.num_actions),
                               greedy)
            _, state, r, term, trunc, _ = env.step(k_step, state, action, params)
            ret = ret + jnp.where(alive, r, 0.0)
            return (state, ret, alive & ~(term | trunc)), None

        (_, ret, _), _ = jax.lax.scan(step, (state, 0.0, jnp.bool_(True)),
                                      jax.random.split(k_run, horizon))
        return ret

    random = jnp.arange(2 * episodes) >= episodes
    rets = np.asarray(jax.jit(jax.vmap(episode))(
        jax.random.split(jax.random.PRNGKey(seed), 2 * episodes), random)).reshape(2, episodes)
    return rets.mean(1), rets.std(1) / np.sqrt(episodes)


@pytest.mark.parametrize("env_id,steps", [("grid/tabular-dense", 30),
                                          ("grid/tabular-longer-collect", 25)])
def test_optimal_policy_achieves_the_optimum_in_the_real_env(env_id, steps):
    env, p = envs.make(env_id, max_steps_in_episode=steps)
    best = optimal.optimal_return(env, p)
    policy = optimal.optimal_policy(env, p)
    assert policy.shape == (steps, env.num_states)
    rnd = optimal.random_return_exact(env, p)
    mean, se = play(env, p, policy, 3000)
    assert abs(mean[0] - best) < 4 * se[0] + 1e-6, (mean, se, best)
    assert abs(mean[1] - rnd) < 4 * se[1] + 1e-6, (mean, se, rnd)
    assert best > rnd


def test_results_are_cached():
    env, p = envs.make("grid/tabular-sparse")
    a = optimal.optimal_return(env, p)
    key = optimal.cache_key(env, p, "max")
    assert optimal._RESULTS[key] == a
    optimal._RESULTS[key] = 123.0
    try:
        assert optimal.optimal_return(env, p) == 123.0
    finally:
        optimal._RESULTS[key] = a


# --- task plumbing: normalise.reference optimal / oracle -------------------------------------

GRID_TASK = """
id: grid-opt
total_timesteps: 512
seed: 0
train:
  - env: grid/tabular-sparse
    params: {{max_steps_in_episode: 20, level_seed: {{uniform: [1000, 2000]}}}}
    normalise: {{random: 0.0, reference: 1.0}}
test:
  - env: {test_env}
    params: {{max_steps_in_episode: 20, level_seed: {{uniform: [1000, 2000]}}}}
    normalise: {{random: -0.5, reference: {ref}}}
agents:
  drift: {{num_envs: 4, rollout_len: 32, epochs: 1, minibatches: 1}}
budget: {{seeds: 3, max_seconds_per_env: 600}}
scoring: {{bootstrap_reps: 50, baselines: {{drift: ppo_clip}}}}
"""


def grid_task(tmp_path, ref="optimal", test_env="grid/tabular-sparse"):
    from metabench.tasks import spec
    from helpers import write_task

    return spec.load(write_task(tmp_path, GRID_TASK.format(ref=ref, test_env=test_env),
                                "grid-opt"), calibration={})


def test_spec_accepts_per_level_references_and_fingerprints_them(tmp_path):
    t = grid_task(tmp_path)
    n = t.test[0].normalise
    assert n.method == "optimal" and n.per_level and n.reference is None
    assert t.canonical()["test"][0]["normalise"]["reference"] == "optimal"
    fixed = grid_task(tmp_path, ref="1.0")
    assert fixed.test[0].normalise.method == "fixed" and fixed.test[0].normalise.reference == 1.0
    assert fixed.fingerprint() != t.fingerprint()
    oracle_task = grid_task(tmp_path, ref="oracle", test_env="grid/procgen")
    assert oracle_task.test[0].normalise.method == "oracle"
    assert oracle_task.fingerprint() != t.fingerprint()


@pytest.mark.parametrize("ref,test_env,words", [
    ("optimum", "grid/tabular-sparse", ["a number or one of optimal, oracle", "'optimum'"]),
    ("optimal", "grid/procgen", ["exact solver", "grid/procgen", "oracle"]),
    ("optimal", "grid/random-small", ["exact solver", "grid/random-small"]),
])
def test_spec_errors_for_per_level_references(tmp_path, ref, test_env, words):
    from metabench.tasks.spec import SpecError

    with pytest.raises(SpecError) as e:
        grid_task(tmp_path, ref=ref, test_env=test_env)
    msg = str(e.value)
    assert "grid-opt.yaml" in msg and e.value.key == "test[0].normalise.reference", msg
    for w in words:
        assert w in msg, msg


def test_spec_rejects_oracle_for_a_non_grid_env(tmp_path):
    from metabench.tasks import spec
    from metabench.tasks.spec import SpecError
    from helpers import TINY_TASK, write_task

    text = TINY_TASK.format(steps=4096).replace("{random: 22.0, reference: 500.0}\ntest",
                                                "{random: 22.0, reference: oracle}\ntest", 1)
    with pytest.raises(SpecError) as e:
        spec.load(write_task(tmp_path, text), calibration={})
    assert e.value.key == "train[0].normalise.reference" and "grid env" in str(e.value)


def test_harness_normalises_each_seed_by_its_levels_optimum(tmp_path):
    from metabench import harness

    t = grid_task(tmp_path)
    spec_ = t.test[0]
    run = harness.train_env(harness.reference_rule("ppo_clip"), t, spec_, range(3))
    assert run.failure is None and run.references is not None
    # the params each seed trained on, re-derived independently: the sampler on the family's
    # init key split (drift: rng, k_net, k_env, k_params)
    env, _, sampler = spec.make_env(spec_)
    keys = harness.seed_keys(t.seed, range(3))
    for i, key in enumerate(keys):
        params = sampler(jax.random.split(key, 4)[3])
        assert run.references[i] == pytest.approx(optimal.optimal_return(env, params))
        assert run.randoms[i] == pytest.approx(optimal.random_return_exact(env, params))
    part = harness.env_part(run, t.scoring.window)
    for i, r in enumerate(part["runs"]):
        assert r["reference_method"] == "optimal" and r["reference"] == run.references[i]
        # the level's own random return, not the task's calibrated mean (-0.5)
        assert r["random"] == run.randoms[i] != -0.5
        assert r["score"] == pytest.approx((r["final_return"] - r["random"])
                                           / (r["reference"] - r["random"]))
    e = part["env"]
    assert e["reference_method"] == "optimal"
    assert e["reference"] == pytest.approx(np.mean(run.references))
    assert e["reference_range"] == [min(run.references), max(run.references)]
    rec = harness.assemble(harness.rule_block(harness.reference_rule("ppo_clip")), t, "test",
                           [part])
    # the leaderboard's reader of records works with per-run references
    from metabench.site import model

    envs_, mat = model.score_matrix(rec)
    assert mat[:, 0] == pytest.approx([r["score"] for r in part["runs"]])
    rnd, ref = model._normaliser(rec, envs_[0])
    assert list(ref) == run.references and list(rnd) == run.randoms
    # shards merge into one summary over all runs
    a = {"env": dict(e), "runs": part["runs"][:1]}
    b = {"env": dict(e), "runs": part["runs"][1:]}
    merged = harness.merge_parts([a, b])[0]["env"]
    assert merged["reference"] == pytest.approx(e["reference"])
    # a failed env still scores the floor, with no reference
    failed = harness.failed_part(spec_, [0, 1], "killed")
    assert all(r["status"] == "failed" and r["score"] is None and r["reference"] is None
               for r in failed["runs"])
    assert failed["env"]["reference"] is None


def test_calibrate_records_how_every_reference_is_obtained(tmp_path):
    import yaml

    from metabench.tasks import calibrate, spec
    from helpers import write_task

    text = GRID_TASK.format(ref="optimal", test_env="grid/tabular-sparse").replace(
        "{random: 0.0, reference: 1.0}", "{random: calibrated, reference: 1.0}")
    path = write_task(tmp_path, text, "grid-opt")
    t = spec.load(path)
    calibrate.calibrate(t, tasks_dir=tmp_path, log=lambda *_: None)
    lock = yaml.safe_load((tmp_path / spec.CALIBRATION_FILE).read_text())
    entry = lock["envs"][t.test[0].calibration_key()]
    ref = entry["reference"]["optimal"]
    assert ref["levels"] == calibrate.REFERENCE_LEVELS and "backward induction" in ref["how"]
    assert 0.0 <= ref["min"] <= ref["mean"] <= ref["max"] <= 1.0
    assert "random" in entry
    refs = lock["references"]["grid-opt"]
    assert refs["train[0] tabular-sparse"] == {
        "method": "fixed", "value": 1.0,
        "source": "a number in grid-opt.yaml (its source is the YAML comment beside it)"}
    assert refs["test[0] tabular-sparse"]["method"] == "optimal"
    assert spec.load(path).train[0].normalise.random == entry["random"]


def test_oracle_is_strong_on_a_tabular_level():
    from metabench.envs import oracle

    env, p = envs.make("grid/tabular-sparse")
    best = optimal.optimal_return(env, p)
    got = oracle.oracle_return(env, p, num_envs=8, episodes=2)
    assert got == pytest.approx(best)  # a deterministic walk to the +1 object


def test_oracle_levels_get_their_own_random_return():
    """procgen levels differ wildly (the oracle gets 3 to 83 on held-out levels), so each
    level's score needs that level's random return: measured by the same simulation."""
    from metabench.envs import make
    from metabench.envs.oracle import level_randoms, level_references

    env, _ = make("grid/procgen")
    batch = jax.vmap(env.sample_params)(jax.random.split(jax.random.PRNGKey(3), 2))
    refs = level_references("oracle", env, batch)
    rnds = level_randoms("oracle", env, batch)
    assert all(r < o for r, o in zip(rnds, refs)), (rnds, refs)
    assert rnds[0] != rnds[1]
