"""The meta-gradient family: the return function, the exact meta-gradient, online adaptation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import harness, leaderboard, results, spec
from metabench.families import metagrad as mg
from metabench.rl import truncated_gae
from tests.conftest import write_task


def test_lambda_return_matches_a_hand_computation():
    # One env, 3 steps: r = 1, 2, 3; the episode terminates after step 2, so step 1's return
    # does not see step 3, and step 3 bootstraps from next_value on truncation.
    x = mg.Inputs(reward=jnp.array([[1.0], [2.0], [3.0]]),
                  value=jnp.array([[0.5], [0.4], [0.3]]),
                  next_value=jnp.array([[0.4], [9.0], [2.0]]),
                  terminated=jnp.array([[False], [True], [False]]),
                  truncated=jnp.array([[False], [False], [True]]))
    gamma, lam = 0.9, 0.5
    g3 = 3.0 + gamma * 2.0
    g2 = 2.0
    g1 = 1.0 + gamma * ((1 - lam) * 0.4 + lam * g2)
    np.testing.assert_allclose(np.asarray(mg.lambda_return(x, gamma, lam))[:, 0],
                               [g1, g2, g3], rtol=1e-6)
    out = mg.metagrad_gamma(gamma=gamma, lambda_=lam).apply(
        mg.metagrad_gamma(gamma=gamma, lambda_=lam).init(None), x)
    np.testing.assert_allclose(np.asarray(out.g)[:, 0], [g1, g2, g3], rtol=1e-5)
    assert set(out.eta) == {"gamma", "lambda"}
    assert float(out.eta["gamma"]) == pytest.approx(gamma, rel=1e-6)


@pytest.mark.parametrize("name,adapted", [("a2c_fixed", set()), ("metagrad_gamma", {"gamma"}),
                                          ("metagrad_gamma_lambda", {"gamma", "lambda"})])
def test_only_adapted_meta_parameters_get_a_gradient(name, adapted):
    rule = getattr(mg, name)()
    x = mg.random_inputs(jax.random.PRNGKey(1))
    grads = jax.grad(lambda mp: jnp.sum(rule.apply(mp, x).g))(rule.init(None))
    assert {k for k, v in grads.items() if float(jnp.abs(v)) > 0} == adapted
    report = mg.check(rule, rule.init(None), name)
    assert report.passed, report.format()
    assert report.get("adapts").passed == bool(adapted)


def test_check_rejects_bad_return_functions():
    good = mg.a2c_fixed()
    wrong_shape = mg.UpdateRule(good.init, lambda mp, x: mg.Outputs(x.reward[0], {}))
    assert not mg.check(wrong_shape, good.init(None)).get("output_shape").passed
    nan = mg.UpdateRule(good.init, lambda mp, x: mg.Outputs(x.reward * jnp.nan, {}))
    assert not mg.check(nan, good.init(None)).get("finite").passed
    bare = mg.UpdateRule(good.init, lambda mp, x: x.reward)
    report = mg.check(bare, good.init(None))
    assert not report.passed and "metagrad.Outputs" in report.get("runs").detail
    with pytest.raises(ValueError, match="gamma and lambda_ must be in"):
        mg.metagrad_gamma(gamma=1.0)
    with pytest.raises(ValueError, match="gamma_bar"):
        mg.Config(gamma_bar=1.5)


def _batch(key, t=6, b=3, obs_dim=4, dtype=jnp.float64):
    k = jax.random.split(key, 6)
    term = jax.random.uniform(k[3], (t, b)) < 0.15
    return mg.Batch(obs=jax.random.normal(k[0], (t, b, obs_dim), dtype),
                    action=jax.random.randint(k[1], (t, b), 0, 2),
                    reward=jax.random.normal(k[2], (t, b), dtype),
                    terminated=term, truncated=jnp.zeros((t, b), bool),
                    value=jax.random.normal(k[4], (t, b), dtype),
                    next_value=jax.random.normal(k[5], (t, b), dtype))


def test_meta_gradient_equals_finite_differences():
    """d J'(theta'(eta)) / d eta through clipping and a warmed-up Adam step, against central
    differences in float64."""
    with jax.enable_x64(True):
        rule = mg.metagrad_gamma_lambda(gamma=0.9, lambda_=0.8)
        config = mg.Config(hidden=(8,), lr=0.05, max_grad_norm=1.0, gamma_bar=0.95)
        agent = mg.make_agent(rule, config, action_dim=2, continuous=False)
        params = agent.network.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.float64))
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        opt_state = agent.optimiser.init(params)
        eta = jax.tree_util.tree_map(lambda v: jnp.float64(v), rule.init(None))
        # Warm Adam up: its first step is ~lr * sign(g), almost flat in eta.
        update = jax.jit(agent.inner_update)
        for i in range(3):
            params, opt_state, _ = update(params, opt_state, _batch(jax.random.PRNGKey(10 + i)),
                                          eta)
        prev, nxt = _batch(jax.random.PRNGKey(1)), _batch(jax.random.PRNGKey(2))
        grads = jax.jit(agent.meta_gradient)(params, opt_state, prev, nxt, eta)

        _, adv = truncated_gae(nxt.reward, nxt.value, nxt.next_value, nxt.terminated,
                               nxt.truncated, 0.95, 1.0)

        @jax.jit
        def objective(e):
            new_params, _, _ = agent.inner_update(params, opt_state, prev, e)
            return agent.meta_loss(new_params, nxt, adv - nxt.value)

        for name in ("gamma", "lambda"):
            h = 1e-5
            up = dict(eta, **{name: eta[name] + h})
            down = dict(eta, **{name: eta[name] - h})
            fd = (objective(up) - objective(down)) / (2 * h)
            assert abs(float(fd)) > 1e-6, "degenerate case: the meta-gradient is ~0"
            assert float(grads[name]) == pytest.approx(float(fd), rel=1e-4, abs=1e-9)


METAGRAD_TASK = """
id: metagrad-tiny
total_timesteps: 1e5
seed: 0
train:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
test:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
agents:
  metagrad: {num_envs: 16, rollout_len: 16, meta_lr: 0.01}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {metagrad: a2c_fixed}}
"""


@pytest.fixture(scope="module")
def metagrad_records(tmp_path_factory):
    path = write_task(tmp_path_factory.mktemp("metagrad"), METAGRAD_TASK, "metagrad-tiny")
    task = spec.load(path)
    recs = {name: harness.evaluate(harness.reference_rule(name), task, "test")
            for name in ("a2c_fixed", "metagrad_gamma")}
    return task, recs


def test_a2c_learns_cartpole_and_metagrad_moves_gamma(metagrad_records):
    _, recs = metagrad_records
    for name, rec in recs.items():
        finals = [r["final_return"] for r in rec["runs"]]
        assert rec["status"] == "ok", (name, rec["runs"][0]["reason"])
        assert min(finals) > 60.0, (name, finals)  # a random policy scores ~22
    fixed = [r["traces"] for r in recs["a2c_fixed"]["runs"]]
    for tr in fixed:
        assert set(tr) == {"gamma", "lambda"}
        np.testing.assert_allclose(tr["gamma"]["values"], 0.99, rtol=1e-6)
    for tr in (r["traces"] for r in recs["metagrad_gamma"]["runs"]):
        gammas = np.asarray(tr["gamma"]["values"])
        assert gammas[0] == pytest.approx(0.99, abs=2e-3)
        assert np.abs(gammas - 0.99).max() > 1e-3, gammas[::10]  # frozen: < 1e-6
        np.testing.assert_allclose(tr["lambda"]["values"], 0.95, rtol=1e-6)
        assert len(tr["gamma"]["steps"]) == len(gammas)
        assert tr["gamma"]["steps"] == rec_steps(recs["metagrad_gamma"])


def rec_steps(rec):
    return rec["runs"][0]["curve"]["steps"]


def test_traces_are_recorded_and_plotted(metagrad_records, tmp_path):
    task, recs = metagrad_records
    out = tmp_path / "results" / task.id
    for name, rec in recs.items():
        results.write(out / f"{name}.json", rec)
    site = tmp_path / "site"
    leaderboard.build(tmp_path / "results", site, tasks_dir=None)
    pages = sorted((site / "submissions").rglob("*metagrad_gamma*.html"))
    assert pages, sorted(p.name for p in site.rglob("*.html"))
    html = pages[0].read_text()
    assert "Meta-parameters during training" in html and "CartPole-v1: gamma" in html
