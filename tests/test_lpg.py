"""The LPG family: targets, the backward LSTM, the agent update and learning."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import harness
from metabench.tasks import spec
from metabench.families import lpg
from metabench.rl import truncated_gae

from helpers import CARTPOLE_SPLITS, write_task

M = lpg.PRED_DIM


def test_two_hot_is_exact_in_expectation_and_clips():
    bins = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(lpg.two_hot(jnp.array(0.5), bins), [0.0, 0.75, 0.25])
    np.testing.assert_allclose(lpg.two_hot(jnp.array(-1.0), bins), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(lpg.two_hot(jnp.array(7.0), bins), [0.0, 0.0, 1.0])
    x = jnp.linspace(-0.99, 1.99, 17)
    np.testing.assert_allclose(lpg.two_hot(x, bins) @ bins, x, rtol=1e-6, atol=1e-6)


def _inputs_with_values(values, values_next, reward, terminated, done):
    """Inputs whose y encodes the given values exactly under actor_critic's bins."""
    bins = lpg.value_bins(100.0)
    enc = lambda v: lpg.two_hot(jnp.asarray(v, jnp.float32), bins)  # noqa: E731
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return lpg.Inputs(f(reward), f(terminated), f(done), jnp.full(np.shape(reward), 0.9),
                      jnp.full(np.shape(reward), 0.5), enc(values), enc(values_next))


@pytest.mark.parametrize("p_ten, mean", [(0.7, 7.0), (0.3, 3.0)])
def test_actor_critic_value_is_unbiased_under_stochastic_targets(p_ten, mean):
    """The family fits y by KL(y || y_hat), whose minimiser over random targets is the
    normalised geometric mean exp(E[log y_hat]). With actor_critic's targets, targets of 0
    and 10 (probabilities 1 - p, p) must read out their mean within one bin width; a
    two-hot target reads out 3.36 in both cases (the bias this rule avoids)."""
    rule = lpg.actor_critic()
    # Two one-step episodes (terminated: the lambda-return is the reward).
    x = _inputs_with_values([[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 10.0]], [[1, 1]], [[1, 1]])
    y_hat = np.asarray(rule.apply({}, x).y_hat[0], np.float64)  # [2, m]
    bins = np.asarray(lpg.value_bins(100.0), np.float64)
    width = bins[1] - bins[0]
    log = lambda d: np.log(np.maximum(d, 1e-30))  # noqa: E731  (as the family's KL does)

    def minimiser(dists, p):
        g = (1 - p) * log(dists[0]) + p * log(dists[1])
        y = np.exp(g - g.max())
        return y / y.sum()

    y = minimiser(y_hat, p_ten)
    assert abs(y @ bins - mean) < width, (y @ bins, mean)
    assert abs(y @ bins - mean) < 0.05  # in fact far tighter than a bin
    # The same minimiser for two-hot targets ignores the probabilities altogether.
    two = np.asarray(lpg.two_hot(jnp.array([0.0, 10.0]), jnp.asarray(bins)), np.float64)
    assert minimiser(two, p_ten) @ bins == pytest.approx(minimiser(two, 1 - p_ten) @ bins)


def test_actor_critic_targets_are_gae_and_the_lambda_return():
    # Two envs, four steps; env 0 terminates at t=1, env 1 is truncated at t=2.
    v = [[1.0, 2.0], [3.0, -1.0], [0.5, 4.0], [2.0, 2.0]]
    v_next = [[3.0, -1.0], [9.0, 4.0], [2.0, 7.0], [1.0, 5.0]]
    r = [[1.0, 0.0], [1.0, 2.0], [0.0, 1.0], [-1.0, 1.0]]
    term = [[0, 0], [1, 0], [0, 0], [0, 0]]
    done = [[0, 0], [1, 0], [0, 1], [0, 0]]
    x = _inputs_with_values(v, v_next, r, term, done)
    out = lpg.actor_critic(gae_lambda=0.8).apply({}, x)
    adv, target = truncated_gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(v_next),
                                jnp.asarray(term, bool),
                                jnp.asarray(np.array(done) * (1 - np.array(term)), bool),
                                0.9, 0.8)
    np.testing.assert_allclose(out.pi_hat, adv, rtol=1e-3, atol=1e-3)
    # By hand (gamma 0.9, lambda 0.8, so the trace decays by 0.72), independently of
    # truncated_gae. Env 0: t=1 terminates, so A_1 = r_1 - v_1 = 1 - 3 = -2.
    assert float(out.pi_hat[1, 0]) == pytest.approx(-2.0, abs=1e-3)
    # Env 0 inside its second episode: the rollout's last step bootstraps,
    # A_3 = -1 + 0.9 * 1 - 2 = -2.1, and A_2 = (0 + 0.9 * 2 - 0.5) + 0.72 * A_3 = -0.212.
    assert float(out.pi_hat[3, 0]) == pytest.approx(-2.1, abs=1e-3)
    assert float(out.pi_hat[2, 0]) == pytest.approx(-0.212, abs=1e-3)
    # Truncation at t=2 in env 1 bootstraps: A_2 = 1 + 0.9 * 7 - 4 = 3.3.
    assert float(out.pi_hat[2, 1]) == pytest.approx(3.3, abs=1e-3)
    # Inside env 1's episode lambda weighs the later errors: delta_1 = 2 + 0.9 * 4 + 1 = 6.6,
    # A_1 = 6.6 + 0.72 * 3.3 = 8.976; delta_0 = 0 - 0.9 - 2 = -2.9, A_0 = -2.9 + 0.72 * 8.976.
    assert float(out.pi_hat[1, 1]) == pytest.approx(8.976, abs=1e-3)
    assert float(out.pi_hat[0, 1]) == pytest.approx(3.56272, abs=1e-3)
    decoded = out.y_hat @ lpg.value_bins(100.0)
    np.testing.assert_allclose(decoded, target, rtol=1e-3, atol=2e-3)
    # y_hat reads out the lambda-return A + v: 3.56272 + 2 at t=0 of env 1.
    assert float(decoded[0, 1]) == pytest.approx(5.56272, abs=2e-3)


def test_lpg_network_runs_backwards_and_resets_at_episode_ends():
    rule = lpg.lpg(hidden=16)
    mp = rule.init(jax.random.PRNGKey(0))
    x = lpg.random_inputs(jax.random.PRNGKey(1), t=10, n=3)
    x = x._replace(done=jnp.zeros_like(x.done).at[4, 1].set(1.0),
                   terminated=jnp.zeros_like(x.done))
    base = rule.apply(mp, x)
    assert base.pi_hat.shape == (10, 3) and base.y_hat.shape == (10, 3, M)
    np.testing.assert_allclose(base.y_hat.sum(-1), 1.0, rtol=1e-5)
    # Backwards in time: changing the reward at t=7 changes targets at t <= 7 only...
    moved = rule.apply(mp, x._replace(reward=x.reward.at[7, 0].add(1.0)))
    diff = np.abs(np.asarray(moved.pi_hat - base.pi_hat))[:, 0]
    assert np.all(diff[8:] == 0) and np.all(diff[:8] > 0)
    # ...and in env 1 the episode ending at t=4 shields t <= 4 from what comes after.
    moved = rule.apply(mp, x._replace(reward=x.reward.at[6, 1].add(1.0)))
    diff = np.abs(np.asarray(moved.pi_hat - base.pi_hat))[:, 1]
    assert np.all(diff[:5] == 0) and np.all(diff[5:7] > 0) and np.all(diff[7:] == 0)
    # Other envs are untouched.
    assert np.all(np.asarray(moved.pi_hat - base.pi_hat)[:, [0, 2]] == 0)


@pytest.mark.parametrize("name", sorted(lpg.REFERENCE_RULES))
def test_reference_rules_pass_the_check(name):
    rule = lpg.REFERENCE_RULES[name].factory()
    report = lpg.check(rule, rule.init(jax.random.PRNGKey(0)), name)
    assert report.passed, report.format()
    assert report.get("episode_boundaries").passed


def test_check_catches_bad_rules():
    def not_a_distribution(p, x):
        return lpg.Outputs(x.reward, x.y * 2.0)

    report = lpg.check(lpg.UpdateRule(lambda _: {}, not_a_distribution), {})
    assert not report.passed and not report.get("y_hat_distribution").passed

    def forward_sum(p, x):  # leaks the next episode into earlier targets
        return lpg.Outputs(jnp.broadcast_to(x.reward.sum(0), x.reward.shape), x.y)

    report = lpg.check(lpg.UpdateRule(lambda _: {}, forward_sum), {})
    assert report.passed and not report.get("episode_boundaries").passed

    report = lpg.check(lpg.UpdateRule(lambda _: {}, lambda p, x: x.reward), {})
    assert not report.passed and not report.get("output_shape").passed


def test_agent_update_follows_the_targets():
    """With pi_hat > 0 on every step the update raises log pi of the actions taken, and it
    moves y towards y_hat (KL falls)."""
    from metabench.envs import make

    env, params = make("gymnax/CartPole-v1")
    cfg = lpg.Config(num_envs=4, rollout_len=8, lr=0.05, optimiser="sgd", network="mlp",
                     hidden=(16,))
    target_y = jax.nn.one_hot(3, M)

    def fixed(p, x):
        return lpg.Outputs(jnp.ones_like(x.reward), jnp.broadcast_to(target_y, x.y.shape))

    agent = lpg.make_agent(env, cfg, lpg.UpdateRule(lambda _: {}, fixed),
                           sample_params=lambda _: params)
    state = agent.init(jax.random.PRNGKey(0))
    state, traj, _ = agent.rollout(state)

    def stats(p):
        x = agent.rule_inputs(p, traj)
        kl = jnp.sum(x.y * (jnp.log(x.y) - jnp.log(jnp.maximum(target_y, 1e-30))), -1)
        return float(jnp.mean(jnp.log(x.pi_a))), float(jnp.mean(kl))

    logp0, kl0 = stats(state.params)
    new, loss, out = agent.update(state, {}, traj)
    logp1, kl1 = stats(new.params)
    assert logp1 > logp0 and kl1 < kl0
    assert np.isfinite(float(loss)) and out.pi_hat.shape == (8, 4)


class Clock:
    """A deterministic gymnax-like env whose state is the step count t = 1, 2, ... (it goes on
    across episodes, so every step is told apart) and whose reward is t. Step t terminates the
    episode when t % 7 == 0 and is otherwise truncated by a time limit when t % 3 == 0. The
    observation after step t is one-hot(1 + t % 8); after an episode end it is the reset
    observation one-hot(0), and the true next state is in info["final_observation"]."""

    default_params = None
    size = 9

    def reset(self, key, params):
        return jax.nn.one_hot(0, self.size), jnp.int32(0)

    def step(self, key, state, action, params):
        t = state + 1
        final = jax.nn.one_hot(1 + t % 8, self.size)
        term = t % 7 == 0
        trunc = (t % 3 == 0) & ~term
        obs = jnp.where(term | trunc, jax.nn.one_hot(0, self.size), final)
        return obs, t, t.astype(jnp.float32), term, trunc, {"final_observation": final}

    def action_space(self, params):
        return types.SimpleNamespace(n=2)

    def observation_space(self, params):
        return types.SimpleNamespace(shape=(self.size,))


def test_rule_inputs_tell_truncations_from_terminations_and_read_y_of_the_final_obs():
    """Inside the agent's loop: at a time limit the rule sees done = 1 and terminated = 0 (so
    a value-based rule bootstraps there), and y(s_t+1) is y of the true next state, not of
    the reset observation the env returns after an episode end."""
    cfg = lpg.Config(num_envs=2, rollout_len=24, network="tabular")
    agent = lpg.make_agent(Clock(), cfg, lpg.actor_critic(), sample_params=lambda _: None)
    state = agent.init(jax.random.PRNGKey(0))
    # Random tables: at their zero initialisation y is uniform in every state.
    params = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape), state.params)
    _, traj, _ = agent.rollout(state._replace(params=params))
    x = agent.rule_inputs(params, traj)
    t = np.arange(1, 25)
    term, trunc = t % 7 == 0, (t % 3 == 0) & (t % 7 != 0)
    assert trunc.sum() == 7 and term.sum() == 3
    for n in range(2):
        np.testing.assert_array_equal(np.asarray(x.terminated[:, n]), term)
        np.testing.assert_array_equal(np.asarray(x.done[:, n]), term | trunc)
        np.testing.assert_array_equal(np.asarray(x.reward[:, n]), t)
    # y of the true next states, written out: the tabular y head is the table's y columns.
    _, y_logits = agent.network.apply(params, jax.nn.one_hot(1 + t % 8, Clock.size))
    want = np.asarray(jax.nn.softmax(y_logits, -1))
    for n in range(2):
        np.testing.assert_allclose(np.asarray(x.y_next[:, n]), want, rtol=1e-5, atol=1e-6)
    # Where an episode ends, the next step's y(s) is the reset state's, and differs.
    ends = np.flatnonzero((term | trunc)[:-1])
    assert np.abs(np.asarray(x.y_next[ends, 0] - x.y[ends + 1, 0])).max() > 1e-2
    # Away from episode ends y(s_t+1) is the next step's y(s).
    inner = np.flatnonzero(~(term | trunc)[:-1])
    np.testing.assert_allclose(np.asarray(x.y_next[inner]), np.asarray(x.y[inner + 1]),
                               rtol=1e-5, atol=1e-6)


def test_meta_gradient_flows_through_the_agent_update():
    from metabench.envs import make

    env, params = make("gymnax/CartPole-v1")
    cfg = lpg.Config(num_envs=4, rollout_len=8, network="mlp", hidden=(16,))
    rule = lpg.lpg(hidden=8)
    agent = lpg.make_agent(env, cfg, rule, sample_params=lambda _: params)
    state = agent.init(jax.random.PRNGKey(0))
    state, traj, _ = agent.rollout(state)
    mp = rule.init(jax.random.PRNGKey(1))

    def after(mp):
        new, _, _ = agent.update(state, mp, traj)
        logits, _ = agent.network.apply(new.params, traj.obs.reshape((-1, 4)))
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    g = jax.grad(after)(mp)
    norms = [float(jnp.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(g)]
    assert all(np.isfinite(norms)) and max(norms) > 0


A2C_TASK = """
id: lpg-cartpole
description: the LPG agent on CartPole
total_timesteps: 200000
seed: 0
""" + CARTPOLE_SPLITS + """agents:
  lpg: {num_envs: 16, rollout_len: 20, lr: 0.001, network: mlp, hidden: [64, 64],
        ent_coef: 0.01}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {lpg: actor_critic}}
"""


def test_actor_critic_in_the_lpg_slot_learns_cartpole(tmp_path):
    task = spec.load(write_task(tmp_path, A2C_TASK, "lpg-cartpole"))
    run = harness.train_env(harness.reference_rule("actor_critic"), task, task.test[0], [0, 1])
    finals = [r["final_return"] for r in harness.run_records(run, 0.05)]
    # Random: about 22. Measured 130 and 183 on one 2-core machine (numerics, and so these
    # returns, differ between CPUs; other machines gave both above 150).
    assert run.failure is None and min(finals) > 90 and np.mean(finals) > 120, finals


GRID_TASK = """
id: lpg-dense
description: the LPG agent, tabular, on the dense grid
total_timesteps: 200000
seed: 0
train:
  - env: grid/tabular-dense
    normalise: {random: 0.0, reference: 10.0}
test:
  - env: grid/tabular-dense
    normalise: {random: 0.0, reference: 10.0}
agents:
  lpg: {num_envs: 16, rollout_len: 20, lr: 4.0, optimiser: sgd, network: tabular,
        ent_coef: 0.01}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {lpg: actor_critic}}
"""


def test_actor_critic_learns_the_dense_tabular_grid(tmp_path):
    from metabench.tasks.calibrate import random_return

    task = spec.load(write_task(tmp_path, GRID_TASK, "lpg-dense"))
    env = task.test[0]
    random = random_return(env)["random"]
    run = harness.train_env(harness.reference_rule("actor_critic"), task, env, [0, 1])
    finals = [r["final_return"] for r in harness.run_records(run, 0.05)]
    # 500-step episodes with two +1 objects: random walks collect about as much -1 as +1.
    assert abs(random) < 1.0 and run.failure is None
    assert min(finals) > random + 2.5, (random, finals)


def test_submit_scores_the_tasks_families_and_skips_the_others(tmp_path, capsys):
    from pathlib import Path

    from metabench.cli import main

    text = GRID_TASK.replace("total_timesteps: 200000", "total_timesteps: 20000")
    path = write_task(tmp_path, text, "lpg-dense")
    root = Path(__file__).resolve().parent.parent / "submissions" / "baselines"
    code = main(["submit", str(root / "actor_critic"), str(root / "dqn"), "--task", str(path),
                 "--results", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0
    assert "dqn: skipped, task lpg-dense has no td_loss agent" in out
    rec = json.loads((tmp_path / "results" / "lpg-dense" / "actor_critic.json").read_text())
    assert rec["rule"]["family"] == "lpg" and rec["status"] == "ok"


def test_shipped_lpg_learns_held_out_grid_layouts(tmp_path):
    """The shipped parameters (from `metabench discover lpg`, see metabench/params/) load as
    the `lpg` reference rule and train a tabular agent on dense-grid layouts never used in
    meta-training to well above a random policy."""
    from metabench.tasks.calibrate import random_return

    ref = harness.reference_rule("lpg")
    assert ref.note.startswith("meta-trained by `metabench discover lpg`"), ref.note
    text = GRID_TASK.replace("total_timesteps: 200000", "total_timesteps: 300000").replace(
        "  - env: grid/tabular-dense\n    normalise: {random: 0.0, reference: 10.0}\nagents",
        "  - env: grid/tabular-dense\n    params: {level_seed: {uniform: [1000000, 2000000]}}\n"
        "    normalise: {random: 0.0, reference: 10.0}\nagents")
    task = spec.load(write_task(tmp_path, text, "lpg-dense"))
    env = task.test[0]
    assert "level_seed" in env.params
    random = random_return(env)["random"]
    run = harness.train_env(ref, task, env, [0, 1])
    finals = [r["final_return"] for r in harness.run_records(run, 0.05)]
    # Measured (random -0.42): shipped 9.2 and 3.9; LPG at two random initialisations 0.59,
    # -0.69, -0.29 and -2.3. The bar sits between them.
    assert run.failure is None and min(finals) > random + 3.0, (random, finals)


def test_a_tabular_head_looks_rows_up_exactly_as_the_one_hot_product():
    # The lookup is an optimisation only: same parameters, outputs and gradients as the
    # dense product on one-hot observations (the grids' tabular states, plain chains).
    from metabench.envs import make

    for env_id, one_hot in (("grid/tabular-dense", True), ("chain/short", True),
                            ("chain/short-distractor", False)):
        env, _ = make(env_id)
        assert env.one_hot_obs is one_hot, env_id
    obs = jax.nn.one_hot(jnp.array([3, 0, 7, 3]), 11)
    dense, table = lpg.LPGNetwork(5, "tabular"), lpg.LPGNetwork(5, "tabular", one_hot=True)
    params = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape),
        dense.init(jax.random.PRNGKey(0), obs))
    t_def = jax.tree_util.tree_structure(table.init(jax.random.PRNGKey(0), obs))
    t_params = jax.tree_util.tree_unflatten(t_def, jax.tree_util.tree_leaves(params))

    def loss(net, p):
        pi, y = net.apply(p, obs)
        return jnp.sum(jnp.sin(pi)) + jnp.sum(y ** 2)

    for a, b in zip(dense.apply(params, obs), table.apply(t_params, obs)):
        np.testing.assert_array_equal(a, b)
    ga = jax.tree_util.tree_leaves(jax.grad(lambda p: loss(dense, p))(params))
    gb = jax.tree_util.tree_leaves(jax.grad(lambda p: loss(table, p))(t_params))
    for a, b in zip(ga, gb):
        np.testing.assert_array_equal(a, b)
