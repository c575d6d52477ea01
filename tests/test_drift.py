"""The drift family's reference rules: formulas, mirror laws, LPO's PPO initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench.families import drift
from metabench.rules import UpdateRule, no_params

GRID = drift.mirror_grid()
R, A = np.asarray(GRID.ratio, np.float64), np.asarray(GRID.advantage, np.float64)


def test_ppo_clip_equals_its_formula():
    eps = 0.2
    got = np.asarray(drift.ppo_clip(eps).apply({}, GRID))
    # r A - drift must equal PPO's min(r A, clip(r) A)
    want_objective = np.minimum(R * A, np.clip(R, 1 - eps, 1 + eps) * A)
    np.testing.assert_allclose(R * A - got, want_objective, atol=1e-5)
    np.testing.assert_allclose(got, np.maximum((R - np.clip(R, 1 - eps, 1 + eps)) * A, 0),
                               atol=1e-6)


def test_dpo_equals_its_formula():
    alpha, beta = 2.0, 0.6
    got = np.asarray(drift.dpo(alpha, beta).apply({}, GRID))
    pos = (R - 1) * A
    neg = np.log(R) * A
    want = np.where(A >= 0, np.maximum(pos - alpha * np.tanh(pos / alpha), 0),
                    np.maximum(neg - beta * np.tanh(neg / beta), 0))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a hand value: r = 2, A = 1 -> 1 - 2 tanh(0.5)
    one = drift.Inputs(jnp.array([2.0]), jnp.log(jnp.array([2.0])), jnp.array([1.0]))
    assert float(drift.dpo().apply({}, one)[0]) == pytest.approx(1 - 2 * np.tanh(0.5), abs=1e-6)


@pytest.mark.parametrize("name,rule", [("ppo_clip", drift.ppo_clip()), ("dpo", drift.dpo())])
def test_reference_drifts_pass_the_check(name, rule):
    report = drift.check(rule, {}, name)
    assert report.passed, report.format()
    assert report.get("mirror_valid").passed and report.to_dict()["mirror_valid"] is True


def test_invalid_drifts_fail_the_mirror_check():
    def linear(meta_params, x):  # negative for r < 1 when A > 0, slope A at r = 1
        return (x.ratio - 1.0) * x.advantage

    def abs_drift(meta_params, x):  # non-negative and zero at 1, but a kink: slope != 0
        return jnp.abs(x.ratio - 1.0)

    bad = drift.check(UpdateRule(no_params, linear), {}, "linear")
    assert not bad.get("non_negative").passed and not bad.get("mirror_valid").passed
    assert bad.to_dict()["mirror_valid"] is False
    # an invalid mirror drift is still a rule: reported, not refused
    assert bad.passed and "not a valid mirror drift" in bad.format()
    kink = drift.check(UpdateRule(no_params, abs_drift), {}, "abs")
    assert kink.get("non_negative").passed and kink.get("zero_at_ratio_one").passed
    assert not kink.get("zero_gradient_at_ratio_one").passed
    assert not kink.get("mirror_valid").passed
    # the KL-like r - 1 - log r is a valid drift
    kl = drift.check(UpdateRule(no_params, lambda p, x: x.ratio - 1 - x.log_ratio), {}, "kl")
    assert kl.passed, kl.format()


def test_check_reports_shape_nan_and_exceptions():
    def scalar(p, x):
        return jnp.sum(x.ratio)

    def nan(p, x):
        return x.ratio * jnp.nan

    def boom(p, x):
        raise RuntimeError("boom")

    assert not drift.check(UpdateRule(no_params, scalar), {}).get("output_shape").passed
    assert not drift.check(UpdateRule(no_params, nan), {}).get("finite").passed
    report = drift.check(UpdateRule(no_params, boom), {})
    assert not report.passed and "boom" in report.get("runs").detail


def test_lpo_at_initialisation_equals_ppo_clip():
    rule = drift.lpo()
    params = rule.init(jax.random.PRNGKey(3))
    got = np.asarray(rule.apply(params, GRID))
    ppo = np.asarray(drift.ppo_clip().apply({}, GRID))
    # equal up to LPO's shift of 1e-4 (the shifted ReLU)
    np.testing.assert_allclose(got, np.maximum(ppo - 1e-4, 0), atol=1e-6)
    # and the same gradient in r wherever PPO's drift is not within the shift of zero
    g = jax.vmap(jax.grad(lambda r, a: rule.apply(params, drift.Inputs(r[None], jnp.log(r[None]),
                                                                        a[None]))[0]))
    gp = jax.vmap(jax.grad(lambda r, a: drift.ppo_clip().apply({}, drift.Inputs(
        r[None], jnp.log(r[None]), a[None]))[0]))
    mask = (ppo > 1e-3) | (ppo == 0)
    np.testing.assert_allclose(np.asarray(g(GRID.ratio, GRID.advantage))[mask],
                               np.asarray(gp(GRID.ratio, GRID.advantage))[mask], atol=1e-5)
    assert drift.check(rule, params, "lpo").passed


def test_lpo_features_and_trained_params_change_it():
    x = drift.Inputs(jnp.array([2.0]), jnp.log(jnp.array([2.0])), jnp.array([3.0]))
    f = np.asarray(drift.lpo_features(x))[0]
    l2 = np.log(2.0)
    np.testing.assert_allclose(f, [-1, 1, l2, l2**2, -3, 3, 3 * l2, 3 * l2**2], rtol=1e-6)
    rule = drift.lpo()
    params = rule.init(jax.random.PRNGKey(0))
    bumped = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    assert not np.allclose(np.asarray(rule.apply(bumped, GRID)),
                           np.asarray(rule.apply(params, GRID)))


def test_config_validation():
    with pytest.raises(ValueError, match="must divide"):
        drift.Config(num_envs=3, rollout_len=5, minibatches=2)
    with pytest.raises(ValueError, match="network"):
        drift.Config(network="transformer")


def test_gaussian_policy_maths_match_the_formula():
    from scipy.stats import norm

    from metabench import nets

    mean, log_std = np.array([[0.3, -1.0]]), np.array([[0.1, -0.5]])
    out = jnp.asarray(np.concatenate([mean, log_std], axis=-1))
    a = jnp.array([[0.5, -0.2]])
    want = norm.logpdf(np.asarray(a), mean, np.exp(log_std)).sum()
    assert float(nets.log_prob(out, a, True)[0]) == pytest.approx(want, rel=1e-5)
    want_h = norm.entropy(mean, np.exp(log_std)).sum()
    assert float(nets.entropy(out, True)[0]) == pytest.approx(want_h, rel=1e-5)
    samples = nets.sample(jax.random.PRNGKey(0), jnp.repeat(out, 20000, axis=0), True)
    np.testing.assert_allclose(np.asarray(samples).mean(0), mean[0], atol=0.03)
    np.testing.assert_allclose(np.asarray(samples).std(0), np.exp(log_std[0]), rtol=0.03)


def test_continuous_actions_train_end_to_end():
    from metabench import envs

    env, params = envs.make("gymnax/Pendulum-v1")
    cfg = drift.Config(num_envs=4, rollout_len=32, epochs=2, minibatches=2)
    trainer = drift.make_train(env, cfg, drift.dpo(), total_timesteps=4 * 32 * 7)
    metrics = jax.jit(trainer.train)(jax.random.PRNGKey(0), {})
    assert metrics.loss.shape == (7,) and np.all(np.isfinite(np.asarray(metrics.loss)))
    # Pendulum truncates at 200 steps: 224 steps in each of 4 envs completes 4 episodes
    assert int(np.asarray(metrics.episodes).sum()) == 4
    assert np.all(np.asarray(metrics.returns_sum) <= 0)  # Pendulum's rewards are costs
