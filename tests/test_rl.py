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


def test_value_targets_by_hand():
    # target = advantage + v(s_t), written out from the hand advantages above
    _, target = truncated_gae(R, V_TM1, V_T, NO, AT_1, gamma=0.9, lambda_=1.0)
    np.testing.assert_allclose(np.asarray(target)[:, 0],
                               [0.95 + 0.9 * 2.3 + 0.5, 2.3 + 0.5, 0.95 + 0.5], rtol=1e-6)
    _, target = truncated_gae(R, V_TM1, V_T, AT_1, NO, gamma=0.9, lambda_=1.0)
    np.testing.assert_allclose(np.asarray(target)[:, 0], [1.9, 1.0, 1.45], rtol=1e-6)


# --- a tiny env with known episode ends, for the families' truncation tests -------------


class EpisodesEnv:
    """A deterministic gymnax-style env whose episodes last ``LENGTH`` steps: even-numbered
    episodes are cut by the time limit (truncated), odd ones end in a terminal state. The
    observation ``[t, episode % 2, 1]`` tells the final observation (``t = LENGTH``) apart
    from the reset one (``t = 0``), and the reward is ``1 + t`` (``t`` before the step).

    ``both_flags=True`` copies gymnax and gymnasium: a terminal step on the limit step also
    reports ``truncated``. Here every terminal step is a limit step, so there both flags are
    set at every termination."""

    LENGTH = 3

    def __init__(self, both_flags: bool = False, actions: int = 2):
        from gymnax.environments import spaces

        self.both_flags = both_flags
        self.default_params = None
        self._actions = spaces.Discrete(actions)
        self._obs = spaces.Box(0.0, float(self.LENGTH), (3,), jnp.float32)

    def action_space(self, params=None):
        return self._actions

    def observation_space(self, params=None):
        return self._obs

    @staticmethod
    def obs_of(t, episode):
        t = jnp.asarray(t, jnp.float32)
        return jnp.stack([t, jnp.asarray(episode % 2, jnp.float32), jnp.ones_like(t)], -1)

    def reset(self, key, params=None):
        state = (jnp.int32(0), jnp.int32(0))
        return self.obs_of(0, 0), state

    def step(self, key, state, action, params=None):
        t, ep = state
        t1 = t + 1
        ended = t1 >= self.LENGTH
        terminated = ended & (ep % 2 == 1)
        truncated = ended if self.both_flags else ended & ~terminated
        final = self.obs_of(t1, ep)
        state = (jnp.where(ended, 0, t1), jnp.where(ended, ep + 1, ep))
        obs = self.obs_of(*state)
        reward = (1.0 + t).astype(jnp.float32)
        return obs, state, reward, terminated, truncated, {"final_observation": final}

    @classmethod
    def expected(cls, steps: int):
        """Per step of one env from reset: ``(obs, final_obs, reward, terminated, truncated
        without the terminal ones)``, as numpy arrays over the first ``steps`` steps."""
        k = np.arange(steps)
        t, ep = k % cls.LENGTH, k // cls.LENGTH
        ended = t + 1 == cls.LENGTH
        obs = np.stack([t, ep % 2, np.ones(steps)], -1).astype(np.float32)
        final = np.stack([t + 1, ep % 2, np.ones(steps)], -1).astype(np.float32)
        return obs, final, 1.0 + t, ended & (ep % 2 == 1), ended & (ep % 2 == 0)


def test_episodes_env_ends_as_documented():
    import jax

    env = EpisodesEnv(both_flags=True)
    obs, state = env.reset(jax.random.PRNGKey(0))
    want_obs, want_final, want_r, want_term, want_trunc = EpisodesEnv.expected(8)
    for k in range(8):
        np.testing.assert_array_equal(np.asarray(obs), want_obs[k])
        obs, state, r, term, trunc, info = env.step(None, state, 0)
        np.testing.assert_array_equal(np.asarray(info["final_observation"]), want_final[k])
        assert float(r) == want_r[k] and bool(term) == want_term[k]
        assert bool(trunc) == (want_trunc[k] or want_term[k])  # gymnax: both at the limit
    assert want_trunc[2] and want_term[5] and want_trunc.sum() == want_term.sum() == 1
