"""The EPG family: REINFORCE's returns and loss, the loss network, checks, learning CartPole,
and ``metabench discover epg`` end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import harness, spec, submission
from metabench.cli import main
from metabench.families import epg
from metabench.rules import UpdateRule, no_params

from conftest import write_task

TASK = """
id: epg-cartpole
description: the EPG agent on CartPole
total_timesteps: 100000
seed: 0
train:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
test:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
agents:
  epg: {}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200}
"""


def _inputs(b: int = 2, t: int = 4, **fields) -> epg.Inputs:
    base = dict(reward=jnp.ones((b, t)), done=jnp.zeros((b, t)),
                log_prob=jnp.full((b, t), -0.5), entropy=jnp.full((b, t), 0.7),
                value=jnp.ones((b, t)), memory=jnp.zeros((b, t, epg.MEMORY_DIM)),
                bootstrap=jnp.zeros((b, t)))
    base.update({k: jnp.asarray(v, jnp.float32) for k, v in fields.items()})
    return epg.Inputs(**base)


HAND = _inputs(reward=[[1, 2, 3, 4], [1, 1, 1, 1]],
               # env 0 is cut by a time limit after t=1; env 1 terminates after t=2
               done=[[0, 1, 0, 0], [0, 0, 1, 0]],
               bootstrap=[[7, 6, 9, 10], [9, 9, 0, 2]])
# gamma = 0.5; G_t = r_t + gamma * (bootstrap_t where cut at t (done, or t = 3) else G_t+1):
#   env 0: G_3 = 4 + 5 = 9, G_2 = 3 + 4.5 = 7.5, G_1 = 2 + 3 = 5 (cut), G_0 = 1 + 2.5 = 3.5
#   env 1: G_3 = 1 + 1 = 2, G_2 = 1 + 0 = 1 (terminal), G_1 = 1.5, G_0 = 1.75
HAND_RETURNS = np.array([[3.5, 5.0, 7.5, 9.0], [1.75, 1.5, 1.0, 2.0]])


def test_returns_to_go_cut_at_episode_ends_and_bootstrapped():
    got = epg.returns_to_go(HAND.reward, HAND.done, HAND.bootstrap, 0.5)
    np.testing.assert_allclose(np.asarray(got), HAND_RETURNS, rtol=1e-6)


def test_reinforce_loss_equals_its_hand_computed_value():
    rule = epg.reinforce(gamma=0.5, ent_coef=0.1, vf_coef=0.5)
    got = np.asarray(rule.apply({}, HAND))
    adv = HAND_RETURNS - 1.0  # V = 1, log pi = -0.5, H = 0.7
    np.testing.assert_allclose(got, 0.5 * adv + 0.5 * adv**2 - 0.07, rtol=1e-6)
    assert got[0, 0] == pytest.approx(1.25 + 3.125 - 0.07)
    # The policy gradient is -(G - V) on log pi; the value head regresses on G.
    g = jax.grad(lambda lp, v: jnp.sum(rule.apply({}, HAND._replace(log_prob=lp, value=v))),
                 argnums=(0, 1))(HAND.log_prob, HAND.value)
    np.testing.assert_allclose(np.asarray(g[0]), -adv, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g[1]), -adv, rtol=1e-6)  # -2 * vf_coef * (G - V)


def test_epg_at_initialisation_is_reinforce_and_its_gradients_flow():
    rule, ref = epg.epg(), epg.reinforce()
    params = rule.init(jax.random.PRNGKey(1))
    x = epg.random_inputs(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(rule.apply(params, x)), np.asarray(ref.apply({}, x)))

    def loss(mp, lp, mem):
        return jnp.mean(rule.apply(mp, x._replace(log_prob=lp, memory=mem)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    g_meta, g_lp, _ = grad(params, x.log_prob, x.memory)
    leaves = jax.tree_util.tree_leaves(g_meta)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    # With the output layer at zero only that layer moves at first, but it does move.
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    assert np.all(np.isfinite(np.asarray(g_lp))) and np.any(np.asarray(g_lp) != 0)

    # Away from the initialisation every layer gets a gradient, and the learned term changes
    # the gradient on log pi and reads the memory unit.
    moved = jax.tree_util.tree_map(
        lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    g_meta, g_lp2, g_mem = grad(moved, x.log_prob, x.memory)
    for path, g in jax.tree_util.tree_leaves_with_path(g_meta):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
    assert not np.allclose(np.asarray(g_lp2), np.asarray(g_lp))
    assert np.any(np.asarray(g_mem) != 0)
    assert epg.check(rule, moved, "epg-moved").passed


@pytest.mark.parametrize("name", ["reinforce", "epg"])
def test_reference_rules_pass_the_check(name):
    ref = harness.reference_rule(name)
    report = epg.check(ref.rule, ref.meta_params, name)
    assert report.passed, report.format()
    assert report.get("gradients_flow").passed


def test_check_fails_clearly_for_bad_rules():
    def mean_only(p, x):
        return jnp.mean(x.log_prob, axis=1)

    def nan(p, x):
        return x.log_prob * jnp.nan

    def boom(p, x):
        raise RuntimeError("boom")

    def entropy_only(p, x):
        return -x.entropy

    shape = epg.check(UpdateRule(no_params, mean_only), {}, "mean_only")
    assert not shape.passed and not shape.get("output_shape").passed
    assert "expected a per-step loss of shape (4, 16), got (4,)" in shape.format()
    bad = epg.check(UpdateRule(no_params, nan), {}, "nan")
    assert not bad.passed and not bad.get("finite").passed
    assert not bad.get("finite_gradients").passed
    crash = epg.check(UpdateRule(no_params, boom), {}, "boom")
    assert not crash.passed and "boom" in crash.get("runs").detail
    # A loss with no gradient on log pi is still a loss: reported, not refused.
    ent = epg.check(UpdateRule(no_params, entropy_only), {}, "entropy_only")
    assert ent.passed and not ent.get("gradients_flow").passed


def test_config_validation():
    with pytest.raises(ValueError, match="must divide num_envs"):
        epg.Config(num_envs=6, minibatches=4)
    with pytest.raises(ValueError, match="network"):
        epg.Config(network="transformer")
    with pytest.raises(ValueError, match="lr must be positive"):
        epg.Config(lr=0.0)


def test_continuous_actions_and_minibatches_over_envs_train_end_to_end():
    from metabench import envs

    env, _ = envs.make("gymnax/Pendulum-v1")
    cfg = epg.Config(num_envs=4, rollout_len=32, epochs=2, minibatches=2)
    trainer = epg.make_train(env, cfg, epg.reinforce(), total_timesteps=4 * 32 * 7)
    metrics = jax.jit(trainer.train)(jax.random.PRNGKey(0), {})
    assert metrics.loss.shape == (7,) and np.all(np.isfinite(np.asarray(metrics.loss)))
    # Pendulum truncates at 200 steps: 224 steps in each of 4 envs completes 4 episodes.
    assert int(np.asarray(metrics.episodes).sum()) == 4
    assert np.all(np.asarray(metrics.returns_sum) <= 0)  # Pendulum's rewards are costs


def test_reinforce_learns_cartpole(tmp_path):
    task = spec.load(write_task(tmp_path, TASK, "epg-cartpole"))
    run = harness.train_env(harness.reference_rule("reinforce"), task, task.test[0], [0, 1])
    finals = [r["final_return"] for r in harness.run_records(run, 0.05)]
    assert run.failure is None and min(finals) > 100, finals  # random: about 22


TINY = """
id: epg-tiny
description: a tiny CartPole task for ES on EPG's loss
total_timesteps: 8192
seed: 0
train:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
test:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
agents:
  epg: {num_envs: 8, rollout_len: 32}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200}
"""


def test_discover_epg_writes_a_submission_the_checks_accept(tmp_path, capsys):
    import json

    path = write_task(tmp_path, TINY, "epg-tiny")
    out = tmp_path / "run"
    assert main(["discover", "epg", "--task", str(path), "--population", "4", "--seeds", "2",
                 "--generations", "2", "--sigma", "0.1", "--out", str(out)]) == 0
    curve = [json.loads(line) for line in (out / "curve.jsonl").open()]
    assert [c["generation"] for c in curve] == [1, 2]
    assert all(np.isfinite(c["fitness_mean"]) for c in curve)
    assert curve[0]["fitness_max"] > 0.0  # REINFORCE-initialised losses learn a little
    assert curve[-1]["env_steps"] == 2 * 4 * 2 * 8192

    folder = out / "submission"
    sub = submission.load(folder)
    assert sub.family == "epg" and sub.factory == "epg" and sub.params_file == "params.npz"
    assert sub.disclosure.task == "epg-tiny" and sub.disclosure.env_steps == 2 * 4 * 2 * 8192
    capsys.readouterr()
    assert main(["check", str(folder)]) == 0
    assert "conformance: passed" in capsys.readouterr().out
    # The search moved the loss away from REINFORCE.
    init = epg.epg().init(jax.random.PRNGKey(0))
    found = submission.load_params(folder / "params.npz")
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(found)))
    assert diff > 0
