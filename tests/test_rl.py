"""GAE bootstraps on truncation and not on termination (hand-computed values)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from metabench.rl import normalise, truncated_gae

R = jnp.array([[1.0], [1.0], [1.0]])
V_TM1 = jnp.array([[0.5], [0.5], [0.5]])
V_T = jnp.array([[0.5], [2.0], [0.5]])  # value of the true next observation
NO = jnp.zeros((3, 1), bool)
AT_1 = jnp.array([[False], [True], [False]])


def test_no_episode_end():
    adv, target = truncated_gae(R, V_TM1, V_T, NO, NO, gamma=0.9, lambda_=1.0)
    d = np.array([1 + 0.9 * 0.5 - 0.5, 1 + 0.9 * 2.0 - 0.5, 1 + 0.9 * 0.5 - 0.5])
    a2 = d[2]
    a1 = d[1] + 0.9 * a2
    a0 = d[0] + 0.9 * a1
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(target), np.asarray(adv + V_TM1), rtol=1e-6)


def test_truncation_bootstraps_from_the_final_observation():
    adv, _ = truncated_gae(R, V_TM1, V_T, NO, AT_1, gamma=0.9, lambda_=1.0)
    # step 1: delta = 1 + 0.9 * V(final_obs)=2.0 - 0.5 = 2.3, and the trace stops there
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [0.95 + 0.9 * 2.3, 2.3, 0.95], rtol=1e-6)


def test_termination_does_not_bootstrap():
    adv, _ = truncated_gae(R, V_TM1, V_T, AT_1, NO, gamma=0.9, lambda_=1.0)
    # step 1: delta = 1 - 0.5 = 0.5 (no bootstrap), the trace stops there
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [0.95 + 0.9 * 0.5, 0.5, 0.95], rtol=1e-6)


def test_lambda_weights_the_trace():
    adv, _ = truncated_gae(R, V_TM1, V_T, NO, NO, gamma=0.9, lambda_=0.5)
    d = np.array([0.95, 2.3, 0.95])
    a1 = d[1] + 0.45 * d[2]
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [d[0] + 0.45 * a1, a1, d[2]], rtol=1e-6)


def test_normalise():
    x = normalise(jnp.array([1.0, 2.0, 3.0, 4.0]))
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std()) - 1.0) < 1e-5
