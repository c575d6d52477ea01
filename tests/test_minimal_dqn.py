"""Tests for the standalone reference DQN in ``metabench.bench.twins.dqn``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metabench.bench.twins import dqn as minimal_dqn
from metabench.families import td_loss
from metabench.bench.twins.dqn import Config


def test_config_defaults_match_purejaxrl_cartpole_and_the_td_loss_family():
    """The yardstick trains what the leaderboard's td_loss agent trains: every field the two
    Configs share has the family's default, and those are PureJaxRL's DQN CartPole settings
    (plain Adam: no gradient clipping)."""
    c, family = Config(), td_loss.Config()
    shared = {f.name for f in dataclasses.fields(Config)} & {
        f.name for f in dataclasses.fields(td_loss.Config)}
    # Every hyperparameter of the twin is checked: the rest are the run's env and budget, and
    # tau (the family's target update is a hard copy).
    assert {f.name for f in dataclasses.fields(Config)} - shared == {
        "env_name", "total_timesteps", "tau"}
    for name in sorted(shared):
        assert (tuple(getattr(c, name)) if name == "hidden" else getattr(c, name)) == getattr(
            family, name), name
    assert c.tau == 1.0 and family.network == "mlp"
    assert (c.env_name, c.num_envs, c.buffer_size, c.batch_size, c.total_timesteps) == (
        "CartPole-v1", 10, 10_000, 128, 500_000)
    assert (c.eps_start, c.eps_end, c.eps_decay_steps) == (1.0, 0.05, 250_000)
    assert (c.target_update_period, c.learning_starts, c.train_every) == (500, 10_000, 10)
    assert c.lr == 2.5e-4 and c.gamma == 0.99
    assert tuple(c.hidden) == (120, 84) and c.max_grad_norm == 0.0
    assert c.num_updates == 50_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_envs = 8  # type: ignore[misc]


def test_the_default_optimiser_is_plain_adam():
    """max_grad_norm 0 means no clip (as in td_loss), not a clip to norm 0. Adam's steps are
    scale-free, so a clip shows only across steps of different sizes: a huge gradient, then a
    small one of the other sign."""
    grads = [{"w": jnp.array([1e4, -1e4])}, {"w": jnp.array([-1.0, 2.0])}]

    def steps(tx):
        params, state, out = {"w": jnp.zeros(2)}, None, []
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
            out.append(np.asarray(updates["w"]))
        return np.stack(out)

    plain = steps(optax.adam(2.5e-4))
    np.testing.assert_array_equal(steps(minimal_dqn._setup(Config())[3]), plain)
    # Control: the clip the twin used to apply moves the second step elsewhere.
    assert not np.allclose(steps(minimal_dqn._setup(Config(max_grad_norm=10.0))[3]), plain)


def test_replay_buffer_wraps_around():
    buf = minimal_dqn._buffer_init(5, 2)
    for k in range(3):  # 3 inserts of 2 -> 6 transitions into capacity 5
        vals = jnp.arange(2 * k, 2 * k + 2, dtype=jnp.float32)
        buf = minimal_dqn._buffer_add(
            buf, jnp.stack([vals, vals], -1), vals.astype(jnp.int32), vals,
            jnp.array([False, True]), jnp.stack([vals, vals], -1) + 100.0)
    assert int(buf.size) == 5 and int(buf.pos) == 1
    np.testing.assert_array_equal(buf.reward, [5.0, 1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(buf.action, [5, 1, 2, 3, 4])
    np.testing.assert_array_equal(buf.terminated, [1.0, 1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(buf.next_obs[:, 0], [105.0, 101.0, 102.0, 103.0, 104.0])
    # Sampling only ever touches filled entries.
    small = minimal_dqn._buffer_add(
        minimal_dqn._buffer_init(100, 2), jnp.ones((3, 2)), jnp.ones(3, jnp.int32),
        jnp.full((3,), 7.0), jnp.zeros(3, bool), jnp.ones((3, 2)))
    _, _, reward, _, _ = minimal_dqn._buffer_sample(small, jax.random.PRNGKey(0), 64)
    assert bool(jnp.all(reward == 7.0))


def test_short_run_metrics_shape_and_random_phase():
    """Before ``learning_starts`` the agent acts (almost) at random: ~22 return."""
    c = Config(total_timesteps=5_000)
    metrics = jax.jit(minimal_dqn.make_train(c))(jax.random.PRNGKey(0))
    assert metrics["returns_sum"].shape == (c.num_updates,)
    assert metrics["episodes"].shape == (c.num_updates,)
    mean_return = float(metrics["returns_sum"].sum() / metrics["episodes"].sum())
    assert 10.0 < mean_return < 40.0
