"""The pettingzoo backend: agents as env copies, games ending together, team returns recorded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mpe2 import simple_spread_v3

from metabench import envs, harness
from metabench.tasks import spec
from metabench.envs import conformance, pettingzoo
from metabench.envs.hostenv import seeds_from_keys

TASK_ENVS = sorted({e.env for t in ("marl-transfer-v1", "marl-transfer-v1-quick")
                    for e in spec.load(t).train + spec.load(t).test})


@pytest.mark.parametrize("env_id", TASK_ENVS)
def test_task_envs_conform(env_id):
    env, _ = envs.make(env_id)
    # 12 copies are whole games for every task env; MPE episodes are 25 steps.
    conformance.check(env_id, num_envs=12, steps=30, expect_done=True)
    assert 12 % env.num_agents == 0


def test_agents_step_like_the_plain_parallel_env_and_games_end_together():
    env, params = envs.make("pettingzoo/mpe.simple_spread_v3", max_cycles=4)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)  # 3 copies = one game of 3 agents
    obs, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    game = simple_spread_v3.parallel_env(max_cycles=4)
    plain, _ = game.reset(seed=int(seeds_from_keys(np.asarray(keys))[0]))
    agents = game.possible_agents
    assert np.allclose(obs, np.stack([plain[a] for a in agents]))
    step = jax.jit(jax.vmap(env.step, in_axes=(0, 0, 0, None)))
    for t in range(4):
        actions = jnp.array([(t + i) % 5 for i in range(3)])
        obs, state, r, term, trunc, info = step(keys, state, actions, params)
        p_obs, p_r, p_te, p_tr, _ = game.step({a: int(actions[i]) for i, a in enumerate(agents)})
        assert np.allclose(info["final_observation"], np.stack([p_obs[a] for a in agents]))
        assert np.allclose(r, [p_r[a] for a in agents])
        assert not np.asarray(term).any()
        # max_cycles ends the episode of every agent at once: all truncated on step 4 only.
        assert np.asarray(trunc).tolist() == [t == 3] * 3
    assert not np.allclose(obs, info["final_observation"])  # the game was reset
    log = env.episode_log()
    assert len(log) == 1 and log[0]["steps"].tolist() == [4]
    assert np.isclose(log[0]["team"][0], log[0]["agents"][0].sum())
    env.release()


def test_heterogeneous_games_and_partial_games_are_refused():
    # Mixed-role games are not registered; building one anyway names the reason.
    assert "pettingzoo/mpe.simple_adversary_v3" not in envs.registered("pettingzoo")
    with pytest.raises(ValueError, match="adversary_0 and agent_0 have different spaces"):
        pettingzoo._factory("mpe", "simple_adversary_v3")()
    task = spec.load("marl-transfer-v1-quick")
    ref = harness.reference_rule("ppo_clip")
    bad = dataclasses.replace(task, agents={**task.agents, "drift": {
        **task.agents["drift"], "num_envs": 8}})
    run = harness.train_env(ref, bad, bad.train[0], range(1))
    assert "num_envs (8) must be a multiple of 3" in run.failure


def test_records_carry_team_and_per_agent_returns():
    task = spec.load("marl-transfer-v1-quick")
    task = dataclasses.replace(task, total_timesteps=12 * 128 * 3)
    run = harness.train_env(harness.reference_rule("ppo_clip"), task, task.train[0], range(2))
    part = harness.env_part(run, 0.5)
    assert part["env"]["env_steps_per_seed"] == 12 * 128 * 3
    for rec in part["runs"]:
        agents = rec["agent_returns"]
        assert sorted(agents) == ["agent_0", "agent_1", "agent_2"]
        assert np.isclose(rec["team_return"], sum(agents.values()))
        # The score is each agent's own return (every agent is an env of the vmapped batch),
        # not the team's: the mean of the per-agent returns over the same window, a third of
        # the team return. These games' returns are negative distances (random: -25.6).
        assert -60 < rec["final_return"] < 0
        assert rec["final_return"] == pytest.approx(np.mean(list(agents.values())), rel=0.05)
        assert rec["final_return"] == pytest.approx(rec["team_return"] / 3, rel=0.05)
    assert np.isclose(part["env"]["team_return"],
                      np.mean([r["team_return"] for r in part["runs"]]))


def test_leaderboard_tables_show_team_and_agent_returns_only_for_multi_agent_records():
    from metabench.site.pages import env_table, runs_table, table_html

    rec = {"envs": [{"name": "spread", "team_return": -45.5}],
           "runs": [{"env": "spread", "seed": 0, "status": "ok", "final_return": -15.2,
                     "team_return": -45.5, "agent_returns": {"<b>a</b>": -15.0, "b": -15.5}}]}
    env_html, runs_html = table_html(env_table(rec)), table_html(runs_table(rec))
    assert "mean team return" in env_html and "-45.50" in env_html
    assert "team return" in runs_html and "&lt;b&gt;a&lt;/b&gt; -15.00, b -15.50" in runs_html
    single = {"envs": [{"name": "x"}], "runs": [{"env": "x", "seed": 0, "status": "ok"}]}
    assert "team return" not in table_html(env_table(single)) + table_html(runs_table(single))
