"""metabench's RL formulas against rlax (DeepMind's reference RL maths), and against the
papers' own formulas written out in numpy where rlax has none.

rlax is time-major per sequence (``[T]``; ``vmap`` over the batch) and knows one
``discount_t`` per step. metabench keeps ``terminated`` and ``truncated`` apart and, on a
truncation, bootstraps from the value of the *true* final observation (before the auto-reset),
never on a termination. The rollouts below have both, and each test shows how metabench's
inputs map to rlax's discount and bootstrap arguments:

- ``discount_t = gamma * (1 - terminated_t)``: only a termination stops the bootstrap;
- the bootstrap value is ``V(true s_t+1)`` (metabench's ``next_value`` / ``q_target_t`` of
  the final observation), which differs from the next step's ``V(s_t+1)`` after an episode
  end (that one is the reset observation's);
- the trace of a multi-step return is cut at every episode end (``lambda_t = 0``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import nets
from metabench import rl
from metabench.families import drift, epg, lpg, td_loss
from metabench.families import metagrad as mg

with warnings.catch_warnings():
    # tfp-nightly, which rlax reaches through distrax, reads a deprecated jax.core name
    warnings.simplefilter("ignore", DeprecationWarning)
    import rlax

# rlax 0.1.8 announces that its own distribution helpers will move to distrax
pytestmark = pytest.mark.filterwarnings(
    "ignore:Rlax .* will be deprecated:PendingDeprecationWarning")

GAMMA, LAMBDA = 0.97, 0.8
TOL = dict(rtol=1e-5, atol=1e-5)


# --- a rollout with terminations and truncations ----------------------------------------


class Rollout:
    """A time-major ``[T, B]`` rollout as the families record it.

    ``v_tm1[t]`` is V(s_t) of the observation acted on; ``v_t[t]`` is V of the true next
    observation. Within an episode ``v_t[t] == v_tm1[t+1]`` (the same observation); after an
    episode end ``v_tm1[t+1]`` is the reset observation's value and ``v_t[t]`` that of the
    final observation, unrelated draws."""

    def __init__(self, seed: int, t: int = 24, b: int = 6):
        rng = np.random.default_rng(seed)
        u = rng.uniform(size=(t, b))
        term, trunc = u < 0.12, (u >= 0.12) & (u < 0.24)
        # Both kinds of end at the rollout's last step and back to back, whatever the seed.
        term[-1, 0], trunc[-1, 0], trunc[-1, 1], term[-1, 1] = True, False, True, False
        term[3:5, 2], trunc[3:5, 2], trunc[3:5, 3], term[3:5, 3] = True, False, True, False
        v_obs = rng.normal(size=(t + 1, b))  # V of each observation acted on, and one more
        v_final = rng.normal(size=(t, b))  # V of the true final observation of an episode
        done = term | trunc
        self.reward = rng.normal(size=(t, b)).astype(np.float32)
        self.term, self.trunc, self.done = term, trunc, done
        self.v_tm1 = v_obs[:-1].astype(np.float32)
        self.v_t = np.where(done, v_final, v_obs[1:]).astype(np.float32)
        assert term.any() and trunc.any()

    def rlax_lambda_returns(self, gamma, lambda_):
        """``G`` by ``rlax.lambda_returns``, one sequence per env."""
        discount = gamma * (1.0 - self.term)  # no bootstrap after a termination
        lambdas = lambda_ * (1.0 - self.done)  # the trace is cut at every episode end...
        # ...where rlax's v_t, the value bootstrapped from at t, is V(true s_t+1).
        return np.asarray(_rlax_lambda_returns(
            jnp.asarray(self.reward), jnp.asarray(discount, jnp.float32), jnp.asarray(self.v_t),
            jnp.asarray(lambdas, jnp.float32)))

    def rlax_gae(self, gamma, lambda_):
        """Advantages by ``rlax.truncated_generalized_advantage_estimation``.

        rlax's ``values[t+1]`` is both the bootstrap of step t and the baseline of step t+1,
        which differ across an episode end; so each episode piece within the rollout is its
        own rlax sequence, whose last value is V(true final observation) and whose last
        discount is 0 after a termination and gamma after a truncation (or at the rollout's
        end, where the episode goes on). Pieces are zero-padded to the rollout's length to
        run in one call, with lambda 0 at the piece's last step so that the padding never
        reaches it."""
        t_len, b_len = self.reward.shape
        pieces = []  # (env, first step, last step)
        for b in range(b_len):
            ends = [e for e in range(t_len) if self.done[e, b] or e == t_len - 1]
            pieces += [(b, s, e) for s, e in zip([0] + [e + 1 for e in ends[:-1]], ends)]
        r, disc, lam = (np.zeros((len(pieces), t_len), np.float32) for _ in range(3))
        values = np.zeros((len(pieces), t_len + 1), np.float32)
        for i, (b, s, e) in enumerate(pieces):
            n = e + 1 - s
            r[i, :n] = self.reward[s:e + 1, b]
            disc[i, :n] = gamma
            disc[i, n - 1] *= 1.0 - self.term[e, b]
            lam[i, :n - 1] = lambda_
            values[i, :n] = self.v_tm1[s:e + 1, b]
            values[i, n] = self.v_t[e, b]
        adv = np.asarray(_rlax_gae(jnp.asarray(r), jnp.asarray(disc), jnp.asarray(lam),
                                   jnp.asarray(values)))
        out = np.zeros_like(self.reward)
        for i, (b, s, e) in enumerate(pieces):
            out[s:e + 1, b] = adv[i, :e + 1 - s]
        return out


_rlax_lambda_returns = jax.jit(jax.vmap(rlax.lambda_returns, in_axes=1, out_axes=1))
_rlax_gae = jax.jit(jax.vmap(rlax.truncated_generalized_advantage_estimation))


ROLLOUTS = [Rollout(seed) for seed in range(2)]


def test_the_rollouts_are_consistent_episodes():
    for ro in ROLLOUTS:
        inside = ~ro.done[:-1]
        np.testing.assert_array_equal(ro.v_t[:-1][inside], ro.v_tm1[1:][inside])
        assert (ro.v_t[:-1][~inside] != ro.v_tm1[1:][~inside]).all()


# --- lambda-returns and GAE --------------------------------------------------------------


@pytest.mark.parametrize("ro", ROLLOUTS)
def test_truncated_gae_equals_rlax(ro):
    """metabench/rl.py's GAE (shared by the drift family's PPO) and its lambda-return."""
    adv, target = rl.truncated_gae(jnp.asarray(ro.reward), jnp.asarray(ro.v_tm1),
                                   jnp.asarray(ro.v_t), jnp.asarray(ro.term),
                                   jnp.asarray(ro.trunc), GAMMA, LAMBDA)
    np.testing.assert_allclose(adv, ro.rlax_gae(GAMMA, LAMBDA), **TOL)
    np.testing.assert_allclose(target, ro.rlax_lambda_returns(GAMMA, LAMBDA), **TOL)
    # lambda = 1 and 0: the Monte-Carlo return to the episode's end and the one-step target
    _, mc = rl.truncated_gae(jnp.asarray(ro.reward), jnp.asarray(ro.v_tm1),
                             jnp.asarray(ro.v_t), jnp.asarray(ro.term),
                             jnp.asarray(ro.trunc), GAMMA, 1.0)
    np.testing.assert_allclose(mc, ro.rlax_lambda_returns(GAMMA, 1.0), **TOL)
    adv0, _ = rl.truncated_gae(jnp.asarray(ro.reward), jnp.asarray(ro.v_tm1),
                               jnp.asarray(ro.v_t), jnp.asarray(ro.term),
                               jnp.asarray(ro.trunc), GAMMA, 0.0)
    np.testing.assert_allclose(adv0, ro.rlax_gae(GAMMA, 0.0), **TOL)


@pytest.mark.parametrize("ro", ROLLOUTS)
def test_metagrad_lambda_return_equals_rlax(ro):
    x = mg.Inputs(jnp.asarray(ro.reward), jnp.asarray(ro.v_tm1), jnp.asarray(ro.v_t),
                  jnp.asarray(ro.term), jnp.asarray(ro.trunc))
    # gamma and lambda as traced scalars, as the adapted meta-parameters are
    g = jax.jit(mg.lambda_return)(x, jnp.float32(GAMMA), jnp.float32(LAMBDA))
    np.testing.assert_allclose(g, ro.rlax_lambda_returns(GAMMA, LAMBDA), **TOL)
    # the reference rules squash gamma and lambda through a sigmoid of their logits
    rule = mg.a2c_fixed(GAMMA, LAMBDA)
    out = rule.apply(rule.init(None), x)
    gamma, lambda_ = float(out.eta["gamma"]), float(out.eta["lambda"])
    np.testing.assert_allclose(out.g, ro.rlax_lambda_returns(gamma, lambda_), **TOL)


@pytest.mark.parametrize("ro", ROLLOUTS)
def test_lpg_actor_critic_targets_equal_rlax(ro):
    """pi_hat is GAE(lambda) and y_hat a discretised Gaussian on the lambda-return, with the
    value read out of y as E_y[bin]."""
    v_max, m = 10.0, lpg.PRED_DIM
    bins = lpg.value_bins(v_max, m)
    t, b = ro.reward.shape
    # y(s) as two-hot distributions whose mean over the bins is the rollout's value
    y, y_next = (lpg.two_hot(jnp.asarray(v), bins) for v in (ro.v_tm1, ro.v_t))
    x = lpg.Inputs(jnp.asarray(ro.reward), jnp.asarray(ro.term, jnp.float32),
                   jnp.asarray(ro.done, jnp.float32), jnp.full((t, b), GAMMA, jnp.float32),
                   jnp.full((t, b), 0.5, jnp.float32), jnp.asarray(y), jnp.asarray(y_next))
    out = lpg.actor_critic(gae_lambda=LAMBDA, v_max=v_max).apply({}, x)
    np.testing.assert_allclose(out.pi_hat, ro.rlax_gae(GAMMA, LAMBDA), **TOL)
    g = ro.rlax_lambda_returns(GAMMA, LAMBDA)
    sigma = 0.75 * 2.0 * v_max / (m - 1)
    want = lpg.gaussian_bins(jnp.clip(jnp.asarray(g), -v_max, v_max), bins, sigma)
    np.testing.assert_allclose(out.y_hat, want, **TOL)


@pytest.mark.parametrize("ro", ROLLOUTS)
def test_epg_returns_to_go_equal_rlax(ro):
    """EPG's discounted return to go (batch-major ``[B, T]``) is rlax's lambda-return with
    lambda = 1 inside an episode and 0 at its end, where it bootstraps from V(true s_t+1);
    the family hands ``bootstrap = 0`` after a termination, rlax ``discount = 0``."""
    bootstrap = np.where(ro.term, 0.0, ro.v_t).astype(np.float32)
    g = epg.returns_to_go(jnp.asarray(ro.reward.T), jnp.asarray(ro.done.T, jnp.float32),
                          jnp.asarray(bootstrap.T), GAMMA)
    np.testing.assert_allclose(np.asarray(g).T, ro.rlax_lambda_returns(GAMMA, 1.0), **TOL)


# --- Q-learning --------------------------------------------------------------------------


def transitions(seed: int, batch: int = 64, actions: int = 4):
    """Replay transitions as the td_loss family samples them: the buffer keeps ``terminated``
    and the true final observation, so ``discount_t = gamma (1 - terminated)`` and a truncated
    transition keeps gamma, bootstrapping from Q(true final obs) in ``q_t``/``q_target_t``."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(size=batch)
    terminated, truncated = u < 0.2, (u >= 0.2) & (u < 0.4)
    assert terminated.any() and truncated.any()
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    x = td_loss.Inputs(f(batch, actions), jnp.asarray(rng.integers(0, actions, batch)),
                       f(batch), jnp.asarray(GAMMA * (1.0 - terminated), jnp.float32),
                       f(batch, actions), f(batch, actions))
    return x, terminated, truncated


@pytest.mark.parametrize("seed", [0, 1])
def test_dqn_and_double_dqn_equal_rlax(seed):
    x, _, _ = transitions(seed)
    td = jax.vmap(rlax.q_learning)(x.q_tm1, x.a_tm1, x.r_t, x.discount_t, x.q_target_t)
    np.testing.assert_allclose(td_loss.dqn().apply({}, x), td ** 2, **TOL)
    # double Q: the online net at s' selects, the target net evaluates
    td2 = jax.vmap(rlax.double_q_learning)(x.q_tm1, x.a_tm1, x.r_t, x.discount_t,
                                           x.q_target_t, x.q_t)
    np.testing.assert_allclose(td_loss.ddqn().apply({}, x), td2 ** 2, **TOL)
    # and the same gradient in Q(s, .): rlax stops the target's gradient
    for rule, fn, extra in ((td_loss.dqn(), rlax.q_learning, (x.q_target_t,)),
                            (td_loss.ddqn(), rlax.double_q_learning, (x.q_target_t, x.q_t))):
        ours = jax.grad(lambda q: jnp.mean(rule.apply({}, x._replace(q_tm1=q))))(x.q_tm1)
        theirs = jax.grad(lambda q: jnp.mean(jax.vmap(fn)(
            q, x.a_tm1, x.r_t, x.discount_t, *extra) ** 2))(x.q_tm1)
        np.testing.assert_allclose(ours, theirs, **TOL)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def munchausen_target(q_tm1, a, r, discount, q_target_t, alpha=0.9, tau=0.03, l0=-1.0):
    """M-DQN's regression target (Vieillard et al. 2020, "Munchausen Reinforcement Learning",
    section 3): ``y = r + alpha [tau ln pi(a|s)]_{l0}^0 + discount sum_a' pi(a'|s') (q(s',a')
    - tau ln pi(a'|s'))`` with ``pi = softmax(q / tau)``; the loss is ``(Q(s,a) - y)^2``.
    The paper takes pi(.|s) from the target net; the family hands rules only the online net
    at s, so it comes from ``q_tm1`` here, as in metabench. (rlax 0.1.8 has no Munchausen
    loss, so this is the reference.)"""
    q_tm1, q_target_t = np.asarray(q_tm1, np.float64), np.asarray(q_target_t, np.float64)
    tau_log_pi_a = tau * _log_softmax(q_tm1 / tau)[np.arange(len(a)), a]
    log_pi_next = _log_softmax(q_target_t / tau)
    soft_v = (np.exp(log_pi_next) * (q_target_t - tau * log_pi_next)).sum(1)
    return r + alpha * np.clip(tau_log_pi_a, l0, 0.0) + discount * soft_v


@pytest.mark.parametrize("seed", [0, 1])
def test_munchausen_equals_the_paper(seed):
    x, _, _ = transitions(seed)
    a = np.asarray(x.a_tm1)
    idx = np.arange(len(a))
    q_sa = np.asarray(x.q_tm1, np.float64)[idx, a]
    y = munchausen_target(x.q_tm1, a, np.asarray(x.r_t, np.float64),
                          np.asarray(x.discount_t, np.float64), x.q_target_t)
    rule = td_loss.munchausen()
    np.testing.assert_allclose(rule.apply({}, x), (q_sa - y) ** 2, rtol=1e-4, atol=1e-5)
    # random Q of scale 1 at tau = 0.03 give tau log pi below -1 often: the clip is exercised
    tau_log_pi = 0.03 * _log_softmax(np.asarray(x.q_tm1, np.float64) / 0.03)[idx, a]
    assert (tau_log_pi < -1).any() and (tau_log_pi > -1).any()
    # the log-policy term is a constant: the gradient is the TD error's alone
    grad = jax.grad(lambda q: jnp.sum(rule.apply({}, x._replace(q_tm1=q))))(x.q_tm1)
    want = np.zeros(x.q_tm1.shape)
    want[idx, a] = 2.0 * (q_sa - y)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4)


def test_munchausen_hand_value():
    # Q(s,.) = [0, 3], a = 0, r = 0, no bootstrap, tau = 0.03, alpha = 0.9:
    # tau log pi(0|s) = 0.03 * (0 - 100 - log(1 + e^-100)) = -3, clipped to -1, times alpha
    # -> y = -0.9 and (0 - (-0.9))^2 = 0.81 (clipping log pi instead gives 0.000729)
    x = td_loss.Inputs(jnp.array([[0.0, 3.0]]), jnp.array([0]), jnp.array([0.0]),
                       jnp.array([0.0]), jnp.zeros((1, 2)), jnp.zeros((1, 2)))
    assert float(td_loss.munchausen(alpha=0.9, tau=0.03).apply({}, x)[0]) == pytest.approx(
        0.81, abs=1e-6)
    y = munchausen_target(x.q_tm1, np.array([0]), 0.0, 0.0, x.q_target_t)[0]
    assert (0.0 - y) ** 2 == pytest.approx(0.81, abs=1e-9)


# --- evolved and regularised DQN losses (no rlax counterpart) -----------------------------


def _parts(x):
    q, a = np.asarray(x.q_tm1, np.float64), np.asarray(x.a_tm1)
    q_sa = q[np.arange(len(a)), a]
    gamma_t = np.asarray(x.discount_t, np.float64)
    next_v = np.asarray(x.q_target_t, np.float64).max(1)
    y = np.asarray(x.r_t, np.float64) + gamma_t * next_v
    return q, q_sa, y, gamma_t, next_v


# one transition by hand: Q(s,.) = [1, 3], a = 1, r = 0.5, discount = 0.9, Q_targ(s',.) = [2, -1]
# -> Q(s,a) = 3, Y = 0.5 + 0.9 * 2 = 2.3, delta = 0.7
HAND = td_loss.Inputs(jnp.array([[1.0, 3.0]]), jnp.array([1]), jnp.array([0.5]),
                      jnp.array([0.9]), jnp.array([[0.0, 5.0]]), jnp.array([[2.0, -1.0]]))


@pytest.mark.parametrize("seed", [0, 1])
def test_dqn_reg_and_dqn_clipped_equal_the_paper(seed):
    x, terminated, _ = transitions(seed)
    _, q_sa, y, gamma_t, next_v = _parts(x)
    delta = q_sa - y
    # DQNReg (Co-Reyes et al. 2021, "Evolving Reinforcement Learning Algorithms", the DQNReg
    # equation): L = 0.1 Q(s_t, a_t) + delta^2
    np.testing.assert_allclose(td_loss.dqn_reg().apply({}, x), 0.1 * q_sa + delta ** 2, **TOL)
    # DQNClipped (ibid., the DQNClipped equation): L = max[Q(s_t,a_t), delta^2 + Y_t]
    #   + max[Q(s_t,a_t) - Y_t, gamma (max_a Q_targ(s_t+1, a))^2]. The paper's gamma is the
    # discount the loss is handed, here gamma (1 - terminated) as in Y_t (also
    # td_loss/library/dqn_clipped.yaml); on non-terminal transitions that is gamma verbatim.
    want = np.maximum(q_sa, delta ** 2 + y) + np.maximum(q_sa - y, gamma_t * next_v ** 2)
    got = np.asarray(td_loss.dqn_clipped().apply({}, x))
    np.testing.assert_allclose(got, want, **TOL)
    live = ~terminated
    paper = (np.maximum(q_sa, delta ** 2 + y)
             + np.maximum(q_sa - y, GAMMA * next_v ** 2))
    np.testing.assert_allclose(got[live], paper[live], **TOL)


def test_dqn_reg_and_dqn_clipped_hand_values():
    # DQNReg: 0.7^2 + 0.1 * 3; DQNClipped: max(3, 0.49 + 2.3) + max(0.7, 0.9 * 2^2) = 3 + 3.6
    assert float(td_loss.dqn_reg().apply({}, HAND)[0]) == pytest.approx(0.79, abs=1e-6)
    assert float(td_loss.dqn_clipped().apply({}, HAND)[0]) == pytest.approx(6.6, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_cql_regulariser_equals_the_paper(seed):
    """CQL(H) (Kumar et al. 2020, "Conservative Q-Learning for Offline RL", section 3.2):
    the regulariser ``logsumexp_a Q(s, a) - Q(s, a_data)`` weighted by beta, added to the
    squared TD error (Co-Reyes et al.'s variant: no 1/2 on the TD term)."""
    x, _, _ = transitions(seed)
    q, q_sa, y, _, _ = _parts(x)
    lse = q.max(1) + np.log(np.exp(q - q.max(1, keepdims=True)).sum(1))
    np.testing.assert_allclose(td_loss.cql(beta=0.1).apply({}, x),
                               0.1 * (lse - q_sa) + (q_sa - y) ** 2, **TOL)
    # the regulariser alone, as the difference from DQN's loss
    np.testing.assert_allclose(td_loss.cql(beta=0.5).apply({}, x) - td_loss.dqn().apply({}, x),
                               0.5 * (lse - q_sa), **TOL)


def test_cql_hand_value():
    # 0.1 (log(e^1 + e^3) - 3) + 0.7^2
    want = 0.1 * (np.log(np.e + np.e ** 3) - 3) + 0.49
    assert want == pytest.approx(0.502693, abs=1e-6)
    assert float(td_loss.cql().apply({}, HAND)[0]) == pytest.approx(want, abs=1e-6)


# --- the PPO clipped surrogate and DPO ---------------------------------------------------


def drift_inputs(seed: int, n: int = 256) -> drift.Inputs:
    """Ratios on both sides of the clip range and advantages normalised over the minibatch,
    as drift.py's loss_fn forms them (``ratio = exp(log_ratio)``, ``adv = normalise(adv)``)."""
    rng = np.random.default_rng(seed)
    log_ratio = jnp.asarray(0.4 * rng.normal(size=n), jnp.float32)
    adv = rl.normalise(jnp.asarray(3.0 * rng.normal(size=n) + 1.0, jnp.float32))
    return drift.Inputs(jnp.exp(log_ratio), log_ratio, adv)


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_clip_objective_equals_rlax(seed):
    """drift.py's PPO maximises ``mean(ratio * adv - drift)``; with PPO-clip's drift that is
    ``-rlax.clipped_surrogate_pg_loss``, in value and in gradient."""
    x = drift_inputs(seed)
    r = np.asarray(x.ratio)
    assert (r < 0.8).any() and (r > 1.2).any() and ((r > 0.8) & (r < 1.2)).any()
    rule = drift.ppo_clip(0.2)

    def ours(log_ratio):
        xi = drift.Inputs(jnp.exp(log_ratio), log_ratio, x.advantage)
        return jnp.mean(xi.ratio * xi.advantage - rule.apply({}, xi))

    def theirs(log_ratio):
        return -rlax.clipped_surrogate_pg_loss(jnp.exp(log_ratio), x.advantage, 0.2)

    np.testing.assert_allclose(ours(x.log_ratio), theirs(x.log_ratio), **TOL)
    np.testing.assert_allclose(jax.grad(ours)(x.log_ratio), jax.grad(theirs)(x.log_ratio),
                               **TOL)


def dpo_reference(r, a, alpha=2.0, beta=0.6):
    """DPO's drift (Lu et al. 2022, "Discovered Policy Optimisation", the DPO equation):
    ``relu((r-1)A - alpha tanh((r-1)A / alpha))`` for A >= 0 and
    ``relu(log(r)A - beta tanh(log(r)A / beta))`` for A < 0."""
    pos, neg = (r - 1.0) * a, np.log(r) * a
    return np.where(a >= 0, np.maximum(pos - alpha * np.tanh(pos / alpha), 0.0),
                    np.maximum(neg - beta * np.tanh(neg / beta), 0.0))


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_equals_the_paper(seed):
    x = drift_inputs(seed)
    want = dpo_reference(np.asarray(x.ratio, np.float64), np.asarray(x.advantage, np.float64))
    np.testing.assert_allclose(drift.dpo().apply({}, x), want, **TOL)


def test_dpo_hand_values():
    # A < 0: r = 0.5, A = -1 -> log(0.5)(-1) = 0.693147; 0.693147 - 0.6 tanh(0.693147/0.6)
    # A >= 0: r = 2, A = 1 -> 1 - 2 tanh(0.5)
    r, a = jnp.array([0.5, 2.0]), jnp.array([-1.0, 1.0])
    got = np.asarray(drift.dpo().apply({}, drift.Inputs(r, jnp.log(r), a)))
    np.testing.assert_allclose(got, [0.201457, 0.075766], atol=1e-6)
    np.testing.assert_allclose(dpo_reference(np.array([0.5, 2.0]), np.array([-1.0, 1.0])),
                               [0.201457, 0.075766], atol=1e-6)


# --- entropy, log-probabilities and the policy-gradient losses -----------------------------


def test_categorical_and_gaussian_log_prob_and_entropy_equal_rlax():
    """nets.log_prob / nets.entropy, used by every actor-critic family (drift, metagrad,
    epg, lpg) for its policy-gradient and entropy terms."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(2.0 * rng.normal(size=(50, 5)), jnp.float32)
    a = jnp.asarray(rng.integers(0, 5, 50))
    np.testing.assert_allclose(nets.log_prob(logits, a, False),
                               rlax.softmax().logprob(a, logits), **TOL)
    np.testing.assert_allclose(nets.entropy(logits, False), rlax.softmax().entropy(logits),
                               **TOL)
    # continuous: the network outputs [mean, log_std] for a diagonal Gaussian
    mu = jnp.asarray(rng.normal(size=(50, 3)), jnp.float32)
    log_std = jnp.asarray(0.5 * rng.normal(size=(50, 3)), jnp.float32)
    act = jnp.asarray(rng.normal(size=(50, 3)), jnp.float32)
    out = jnp.concatenate([mu, log_std], -1)
    gauss = rlax.gaussian_diagonal()
    np.testing.assert_allclose(nets.log_prob(out, act, True),
                               gauss.logprob(act, mu, jnp.exp(log_std)), **TOL)
    np.testing.assert_allclose(nets.entropy(out, True), gauss.entropy(mu, jnp.exp(log_std)),
                               **TOL)


def test_epg_reinforce_loss_equals_rlax():
    """REINFORCE's loss: rlax's policy-gradient loss on ``G - V`` (the return as rlax's
    lambda-return, see above), the value regression, and rlax's entropy loss; equal in value
    and in gradient with respect to the logits and the value head."""
    ro = ROLLOUTS[0]
    t, b = ro.reward.shape
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(b, t, 4)), jnp.float32)
    action = jnp.asarray(rng.integers(0, 4, (b, t)))
    value = jnp.asarray(ro.v_tm1.T)
    ent_coef, vf_coef = 0.01, 0.5
    rule = epg.reinforce(GAMMA, ent_coef=ent_coef, vf_coef=vf_coef)
    bootstrap = jnp.asarray(np.where(ro.term, 0.0, ro.v_t).T, jnp.float32)

    def ours(logits, value):
        x = epg.Inputs(jnp.asarray(ro.reward.T), jnp.asarray(ro.done.T, jnp.float32),
                       nets.log_prob(logits, action, False), nets.entropy(logits, False), value,
                       jnp.zeros((b, t, epg.MEMORY_DIM)), bootstrap)
        return jnp.mean(rule.apply({}, x))

    g = jnp.asarray(ro.rlax_lambda_returns(GAMMA, 1.0).T)

    def theirs(logits, value):
        flat = lambda z: z.reshape((b * t, *z.shape[2:]))  # noqa: E731
        w = jnp.ones(b * t)
        return (rlax.policy_gradient_loss(flat(logits), flat(action), flat(g - value), w)
                + vf_coef * 2.0 * jnp.mean(rlax.l2_loss(g - value))
                + ent_coef * rlax.entropy_loss(flat(logits), w))

    got = jax.jit(jax.value_and_grad(ours, (0, 1)))(logits, value)
    want = jax.jit(jax.value_and_grad(theirs, (0, 1)))(logits, value)
    for a, b_ in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b_, **TOL)


def test_metagrad_agent_losses_equal_rlax():
    """The meta-gradient actor-critic's inner loss (policy gradient on ``g - v``, critic
    regression on ``g``, entropy bonus) and its meta-objective, with ``g`` from rlax."""
    ro = ROLLOUTS[1]
    t, b = ro.reward.shape
    rng = np.random.default_rng(4)
    rule = mg.a2c_fixed(GAMMA, LAMBDA)
    config = mg.Config(hidden=(8,), ent_coef=0.02, vf_coef=0.5)
    agent = mg.make_agent(rule, config, action_dim=3, continuous=False)
    obs = jnp.asarray(rng.normal(size=(t, b, 4)), jnp.float32)
    batch = mg.Batch(obs, jnp.asarray(rng.integers(0, 3, (t, b))), jnp.asarray(ro.reward),
                     jnp.asarray(ro.term), jnp.asarray(ro.trunc), jnp.asarray(ro.v_tm1),
                     jnp.asarray(ro.v_t))
    params = jax.jit(agent.network.init)(jax.random.PRNGKey(0), obs[0])
    eta = rule.init(None)
    _, _, (loss, ent, out_eta) = jax.jit(agent.inner_update)(
        params, agent.optimiser.init(params), batch, eta)
    g = ro.rlax_lambda_returns(float(out_eta["gamma"]), float(out_eta["lambda"])).reshape(-1)
    adv = jnp.asarray(rng.normal(size=(t, b)), jnp.float32)

    @jax.jit
    def theirs(params, adv):
        logits, value = agent.network.apply(params, obs.reshape((t * b, 4)))
        a, w = batch.action.reshape(-1), jnp.ones(t * b)
        pg = rlax.policy_gradient_loss(logits, a, g - ro.v_tm1.reshape(-1), w)
        loss = (pg + config.vf_coef * jnp.mean(rlax.l2_loss(value - g))
                + config.ent_coef * rlax.entropy_loss(logits, w))
        return loss, -rlax.entropy_loss(logits, w), rlax.policy_gradient_loss(
            logits, a, adv.reshape(-1), w)

    want_loss, want_ent, want_meta = theirs(params, adv)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    np.testing.assert_allclose(ent, want_ent, **TOL)
    np.testing.assert_allclose(jax.jit(agent.meta_loss)(params, batch, adv), want_meta, **TOL)


def test_lpg_agent_policy_loss_equals_rlax():
    """The LPG agent's update without its prediction term: ``-E[pi_hat log pi(a|s)]`` minus
    the entropy bonus (Oh et al. 2020, eq. 2), rlax's policy-gradient and entropy losses."""
    from metabench.envs import make

    env, env_params = make("gymnax/CartPole-v1")
    t, n = 8, 4
    cfg = lpg.Config(num_envs=n, rollout_len=t, network="mlp", hidden=(16,), ent_coef=0.03)
    agent = lpg.make_agent(env, cfg, lpg.actor_critic(), sample_params=lambda _: env_params)
    rng = np.random.default_rng(5)
    obs = jnp.asarray(rng.normal(size=(t, n, 4)), jnp.float32)
    zeros = jnp.zeros((t, n), bool)
    traj = lpg.Rollout(obs, jnp.asarray(rng.integers(0, 2, (t, n))), jnp.zeros((t, n)), zeros,
                       zeros, obs)
    pi_hat = jnp.asarray(rng.normal(size=(t, n)), jnp.float32)
    target = lpg.Outputs(pi_hat, jnp.full((t, n, lpg.PRED_DIM), 1.0 / lpg.PRED_DIM))
    params = jax.jit(agent.network.init)(jax.random.PRNGKey(0), obs[0])
    got = jax.jit(agent.loss)(params, target, traj, 0.0)

    @jax.jit
    def theirs(params):
        logits, _ = agent.network.apply(params, obs.reshape((t * n, 4)))
        w = jnp.ones(t * n)
        return (rlax.policy_gradient_loss(logits, traj.action.reshape(-1), pi_hat.reshape(-1),
                                          w)
                + cfg.ent_coef * rlax.entropy_loss(logits, w))

    np.testing.assert_allclose(got, theirs(params), **TOL)
