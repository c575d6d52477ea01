"""The meta-gradient family: the return function, the exact meta-gradient, online adaptation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import envs, harness, results
from metabench.site.build import build
from metabench.tasks import spec
from metabench.families import metagrad as mg
from metabench.rl import truncated_gae
from metabench.rules import UpdateRule
from tests.helpers import CARTPOLE_SPLITS, write_task
from tests.test_rl import EpisodesEnv


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


def _warm_agent():
    """A float64 agent after three Adam steps (its first step is ~lr * sign(g), almost flat
    in eta), and a fixed (previous, next) pair of rollouts. Call under ``enable_x64``."""
    rule = mg.metagrad_gamma_lambda(gamma=0.9, lambda_=0.8)
    config = mg.Config(hidden=(8,), lr=0.05, max_grad_norm=1.0, gamma_bar=0.95)
    agent = mg.make_agent(rule, config, action_dim=2, continuous=False)
    params = agent.network.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.float64))
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    opt_state = agent.optimiser.init(params)
    eta = jax.tree_util.tree_map(lambda v: jnp.float64(v), rule.init(None))
    update = jax.jit(agent.inner_update)
    for i in range(3):
        params, opt_state, _ = update(params, opt_state, _batch(jax.random.PRNGKey(10 + i)), eta)
    return agent, params, opt_state, eta, _batch(jax.random.PRNGKey(1)), _batch(
        jax.random.PRNGKey(2))


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_gae_targets(b: mg.Batch, gamma: float, lambda_: float) -> np.ndarray:
    """GAE(lambda) value targets by an explicit backward loop: bootstrap from next_value
    unless terminated, cut the trace at every episode end."""
    r, v, nv = (np.asarray(a, np.float64) for a in (b.reward, b.value, b.next_value))
    term, done = np.asarray(b.terminated), np.asarray(b.terminated) | np.asarray(b.truncated)
    adv, acc = np.zeros_like(r), np.zeros(r.shape[1])
    for t in reversed(range(len(r))):
        acc = r[t] + gamma * np.where(term[t], 0.0, nv[t]) - v[t] + np.where(
            done[t], 0.0, gamma * lambda_ * acc)
        adv[t] = acc
    return adv + v


def test_meta_loss_is_minus_the_policy_gradient_surrogate_by_hand():
    rule = mg.a2c_fixed()
    agent = mg.make_agent(rule, mg.Config(hidden=(4,)), action_dim=2, continuous=False)
    obs = jnp.asarray(np.arange(16, dtype=np.float32).reshape(2, 2, 4) / 8.0 - 1.0)
    params = agent.network.init(jax.random.PRNGKey(3), obs[0])
    action = jnp.array([[0, 1], [1, 1]])
    adv = np.array([[1.5, -2.0], [0.5, 3.0]], np.float32)
    zeros, no = jnp.zeros((2, 2)), jnp.zeros((2, 2), bool)
    batch = mg.Batch(obs, action, zeros, no, no, zeros, zeros)
    logits = np.asarray(agent.network.apply(params, obs.reshape(4, 4))[0], np.float64)
    logp = _np_log_softmax(logits)[np.arange(4), np.asarray(action).ravel()].reshape(2, 2)
    # -J' = -(1/4) sum_ij A_ij log pi(a_ij | s_ij): the meta-objective is maximised
    want = -(adv * logp).sum() / 4
    assert float(agent.meta_loss(params, batch, jnp.asarray(adv))) == pytest.approx(
        want, rel=1e-5)
    assert abs(want) > 0.1  # not a degenerate case where the sign would not show


def test_meta_gradient_ascends_an_independent_meta_objective():
    """Stepping eta against d(-J')/d eta raises J' = mean((g_bar - v) log pi_theta'(a'|s'))
    computed here in numpy; stepping along it lowers J'. A sign flip anywhere in the
    meta-gradient (the surrogate, the advantage, the gradient) reverses both."""
    with jax.enable_x64(True):
        agent, params, opt_state, eta, prev, nxt = _warm_agent()
        grads = jax.jit(agent.meta_gradient)(params, opt_state, prev, nxt, eta)
        adv = _np_gae_targets(nxt, 0.95, 1.0) - np.asarray(nxt.value)
        a = np.asarray(nxt.action).ravel()

        def j_prime(e):
            new, _, _ = agent.inner_update(params, opt_state, prev, e)
            logits = np.asarray(agent.network.apply(new, nxt.obs.reshape(-1, 4))[0])
            logp = _np_log_softmax(logits)[np.arange(len(a)), a].reshape(adv.shape)
            return float(np.mean(adv * logp))

        def moved(h):
            return {k: eta[k] + h * jnp.sign(grads[k]) for k in eta}

        j0, j_down, j_up = j_prime(eta), j_prime(moved(-0.05)), j_prime(moved(0.05))
        assert j_down > j0 > j_up, (j_down, j0, j_up)


def test_the_family_moves_eta_down_the_meta_gradient():
    """Update 1 adapts eta with Adam on d(-J')/d eta of update 0 measured on rollout 1: its
    first moment is 0.1 x that gradient (recomputed here from the states) and its first step
    is -meta_lr x its sign. Update 0 has no previous rollout and leaves eta alone."""
    env, env_params = envs.make("gymnax/CartPole-v1")
    rule = mg.metagrad_gamma_lambda()
    cfg = mg.Config(num_envs=4, rollout_len=8, hidden=(16,), meta_lr=0.01)
    trainer = mg.make_train(env, cfg, rule, total_timesteps=64, env_params=env_params)
    eta0 = rule.init(None)
    step = jax.jit(trainer.step)
    s1, _ = step(trainer.init(jax.random.PRNGKey(0)), eta0, 0)
    s2, m1 = step(s1, eta0, 1)
    assert all(float(v) == 0.0 for v in s1.eta_delta.values())
    agent = mg.make_agent(rule, cfg, action_dim=2, continuous=False)
    grads = agent.meta_gradient(s1.prev_params, s1.prev_opt_state, s1.prev_batch,
                                s2.prev_batch, eta0)
    mu = s2.meta_opt_state[0].mu
    for k in ("gamma", "lambda"):
        g, d = float(grads[k]), float(s2.eta_delta[k])
        assert abs(g) > 1e-6, (k, g)
        assert float(mu[k]) == pytest.approx(0.1 * g, rel=1e-3), k
        assert np.sign(d) == -np.sign(g) and abs(d) == pytest.approx(0.01, rel=0.05), (k, d)
    gamma1 = float(jax.nn.sigmoid(eta0["gamma"] + s2.eta_delta["gamma"]))
    assert float(m1.traces["gamma"]) == pytest.approx(gamma1, rel=1e-6)


def test_the_rule_is_told_to_bootstrap_only_at_truncations():
    """With gymnax's flags (a terminal limit step is also `truncated`) the rule still sees
    `truncated` only where the episode was cut in a non-terminal state, `terminated` where it
    ended, and next_value = V(final observation), not V(reset observation)."""
    seen = []
    base = mg.a2c_fixed(gamma=0.9, lambda_=0.5)

    def apply(meta_params, x):
        out = base.apply(meta_params, x)
        jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]), x.next_value,
                           x.terminated, x.truncated, out.g)
        return out

    rule = UpdateRule(base.init, apply)
    cfg = mg.Config(num_envs=2, rollout_len=8, hidden=(8,))
    trainer = mg.make_train(EpisodesEnv(both_flags=True), cfg, rule, total_timesteps=16)
    state = trainer.init(jax.random.PRNGKey(0))
    jax.jit(trainer.step)(state, rule.init(None), 0)
    assert len(seen) == 1
    next_value, term, trunc, g = seen[0]
    _, final, reward, want_term, want_trunc = EpisodesEnv.expected(8)
    net = mg.make_agent(rule, cfg, 2, False).network
    v_final = np.asarray(net.apply(state.params, jnp.asarray(final), method=net.value))
    v_reset = np.asarray(net.apply(state.params, EpisodesEnv.obs_of(0, 1)[None],
                                   method=net.value))
    assert abs(v_final[2] - v_reset[0]) > 1e-3  # the two candidates are told apart
    for b in range(2):
        np.testing.assert_array_equal(term[:, b], want_term)
        np.testing.assert_array_equal(trunc[:, b], want_trunc)
        np.testing.assert_allclose(next_value[:, b], v_final, rtol=1e-5, atol=1e-6)
        # the lambda-return ends each episode: step 2 bootstraps from V(final), step 5 not
        assert g[2, b] == pytest.approx(reward[2] + 0.9 * v_final[2], rel=1e-5)
        assert g[5, b] == pytest.approx(reward[5], rel=1e-6)


def test_meta_gradient_equals_finite_differences():
    """d J'(theta'(eta)) / d eta through clipping and a warmed-up Adam step, against central
    differences in float64."""
    with jax.enable_x64(True):
        agent, params, opt_state, eta, prev, nxt = _warm_agent()
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
""" + CARTPOLE_SPLITS + """agents:
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
        # Measured at 1e5 steps: a2c_fixed 163 and 146, metagrad_gamma 500 and 468; a
        # random policy scores ~22, and a learner with a broken critic clears 60.
        assert min(finals) > {"a2c_fixed": 80.0, "metagrad_gamma": 250.0}[name], (name, finals)
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
    build(tmp_path / "results", site, tasks_dir=None)
    pages = sorted((site / "submissions").rglob("*metagrad_gamma*.html"))
    assert pages, sorted(p.name for p in site.rglob("*.html"))
    html = pages[0].read_text()
    assert "Meta-parameters during training" in html and "CartPole-v1: gamma" in html
