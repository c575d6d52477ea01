"""The drift family's reference rules: formulas, mirror laws, LPO's PPO initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import nets
from metabench.families import drift
from metabench.rules import UpdateRule, no_params
from tests.test_rl import EpisodesEnv

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
    # the A < 0 branch by hand: r = 0.5, A = -1 -> log(2) - 0.6 tanh(log(2) / 0.6) = 0.201457
    neg = drift.Inputs(jnp.array([0.5]), jnp.log(jnp.array([0.5])), jnp.array([-1.0]))
    assert float(drift.dpo().apply({}, neg)[0]) == pytest.approx(0.201457, abs=1e-6)


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


def _recording(rule, seen, fn):
    """``rule`` that also appends ``fn(x)`` (numpy) to ``seen`` at every call."""
    def apply(meta_params, x):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), fn(x))
        return rule.apply(meta_params, x)

    return UpdateRule(rule.init, apply)


def test_continuous_actions_run_and_the_update_raises_the_surrogate():
    from metabench import envs

    env, params = envs.make("gymnax/Pendulum-v1")
    cfg = drift.Config(num_envs=4, rollout_len=32, epochs=2, minibatches=2)
    seen = []
    # mean (r - 1) A per minibatch: 0 at epoch 0's first minibatch; after gradient steps it
    # is > 0 when the policy moves towards positive advantages, < 0 for a wrong-sign policy
    # gradient, ~0 for none
    rule = _recording(drift.dpo(), seen, lambda x: jnp.mean((x.ratio - 1.0) * x.advantage))
    trainer = drift.make_train(env, cfg, rule, total_timesteps=4 * 32 * 7)
    metrics = jax.jit(trainer.train)(jax.random.PRNGKey(0), {})
    assert metrics.loss.shape == (7,) and np.all(np.isfinite(np.asarray(metrics.loss)))
    # Pendulum truncates at 200 steps: 224 steps in each of 4 envs completes 4 episodes
    assert int(np.asarray(metrics.episodes).sum()) == 4
    assert np.all(np.asarray(metrics.returns_sum) <= 0)  # Pendulum's rewards are costs
    gains = np.asarray(seen).reshape(7, 2, 2)  # [update, epoch, minibatch]
    assert np.all(np.abs(gains[:, 0, 0]) < 1e-6)  # ratio 1 up to rounding
    # Per minibatch the gain is noisy (a step on one minibatch can lower another's); over
    # the run, the second epoch's minibatches gain on average (a wrong sign loses).
    assert gains[:, 1].mean() > 0, gains


def _np_gae(r, v, nv, term, trunc, gamma, lam):
    adv, acc = np.zeros_like(r), np.zeros(r.shape[1:])
    for t in reversed(range(len(r))):
        acc = r[t] + gamma * np.where(term[t], 0.0, nv[t]) - v[t] + np.where(
            term[t] | trunc[t], 0.0, gamma * lam * acc)
        adv[t] = acc
    return adv


@pytest.mark.parametrize("both_flags", [False, True])
def test_gae_in_the_loop_bootstraps_truncations_from_the_final_observation(monkeypatch,
                                                                            both_flags):
    """The advantages PPO learns from equal GAE(0.99, 0.95) computed here from the env's
    known episodes: V(final observation) at the truncation (step 2), no bootstrap at the
    termination (step 5), V(next observation) at the rollout's end. The critic then moves
    towards the targets."""
    seen = []

    def recording_gae(*args):
        out = drift_gae(*args)
        jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]), *args[:5], *out)
        return out

    drift_gae = drift.truncated_gae
    monkeypatch.setattr(drift, "truncated_gae", recording_gae)
    cfg = drift.Config(num_envs=2, rollout_len=8, epochs=4, minibatches=1, lr=1e-2,
                       anneal_lr=False, hidden=(16,))
    trainer = drift.make_train(EpisodesEnv(both_flags), cfg, drift.ppo_clip(),
                               total_timesteps=16)
    state = trainer.init(jax.random.PRNGKey(0))
    new_state, _ = jax.jit(trainer.step)(state, {}, 0)
    (r, v, nv, term, trunc, adv, target), = seen
    obs, final, reward, want_term, want_trunc = EpisodesEnv.expected(8)
    net = nets.ActorCritic(action_dim=2, hidden=(16,))

    def value(params, o):
        return np.asarray(net.apply(params, jnp.asarray(o), method=net.value), np.float64)

    v_obs, v_final = value(state.params, obs), value(state.params, final)
    assert abs(v_final[2] - v_obs[3]) > 1e-3  # V(final obs) and V(reset obs) differ
    want = _np_gae(reward[:, None], v_obs[:, None], v_final[:, None], want_term[:, None],
                   want_trunc[:, None], 0.99, 0.95)[:, 0]
    for b in range(2):
        np.testing.assert_allclose(adv[:, b], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(target[:, b], want + v_obs, rtol=1e-5, atol=1e-5)
    # by hand at the episode ends: 3 + 0.99 V(final) at the cut, the bare reward 3 at the end
    assert want[2] == pytest.approx(3 + 0.99 * v_final[2] - v_obs[2], rel=1e-6)
    assert want[5] == pytest.approx(3 - v_obs[5], rel=1e-6)
    before = np.mean(want ** 2)  # (V - target)^2 with target = want + V
    after = np.mean((value(new_state.params, obs) - want - v_obs) ** 2)
    assert after < 0.9 * before, (before, after)


def test_normalize_obs_starts_each_update_at_ratio_one():
    """The first minibatch of every update sees ratio 1: learning normalises the rollout's
    observations with the statistics it acted with (here they change between updates)."""
    seen = []
    rule = _recording(drift.ppo_clip(), seen, lambda x: jnp.max(jnp.abs(x.ratio - 1.0)))
    cfg = drift.Config(num_envs=2, rollout_len=8, epochs=2, minibatches=1, lr=1e-2,
                       anneal_lr=False, hidden=(16,), normalize_obs=True)
    trainer = drift.make_train(EpisodesEnv(), cfg, rule, total_timesteps=48)
    state = trainer.init(jax.random.PRNGKey(0))
    step = jax.jit(trainer.step)
    for i in range(3):
        state, _ = step(state, {}, i)
    gaps = np.asarray(seen).reshape(3, 2)  # [update, epoch]
    assert float(state.obs_stats.count) == 48
    assert np.all(gaps[:, 0] < 1e-6), gaps
    assert np.all(gaps[:, 1] > 1e-3), gaps  # the policy did move: ratios show it
