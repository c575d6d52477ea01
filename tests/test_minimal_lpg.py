"""Tests for the standalone reference LPG agent (A2C) in ``metabench.bench.twins.lpg``."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import bench, harness
from metabench.bench.twins import lpg as minimal_lpg
from metabench.families import lpg
from metabench.bench.twins.lpg import Config

ALGO = 'lpg'  # the bench's name for this pair


def test_config_defaults_match_the_family():
    """Same defaults as ``lpg.Config`` and the ``actor_critic`` rule, so they cannot drift."""
    c, f = Config(), lpg.Config()
    shared = {x.name for x in dataclasses.fields(Config)} & {x.name for x in dataclasses.fields(f)}
    assert shared >= {"num_envs", "rollout_len", "lr", "optimiser", "alpha_y", "ent_coef",
                      "gamma", "max_grad_norm", "hidden"}
    for name in sorted(shared):
        assert getattr(c, name) == getattr(f, name), name
    rule = inspect.signature(lpg.actor_critic).parameters
    assert (c.gae_lambda, c.v_max, c.sigma_bins) == (
        rule["gae_lambda"].default, rule["v_max"].default, rule["sigma_bins"].default)
    assert c.num_bins == lpg.PRED_DIM
    assert c.env_name == "CartPole-v1"
    assert Config(total_timesteps=100_000).num_updates == 100_000 // (16 * 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_envs = 8  # type: ignore[misc]


def test_gaussian_targets_match_the_family():
    x = jnp.array([-150.0, -3.0, -0.5, 0.0, 0.2, 1.0, 42.0, 99.0])
    bins = lpg.value_bins(100.0)
    ours, theirs = jax.jit(lambda: (minimal_lpg.gaussian_bins(x, bins, 5.0),
                                    lpg.gaussian_bins(x, bins, 5.0)))()
    np.testing.assert_array_equal(ours, theirs)


def test_the_twin_reproduces_the_harness_bit_for_bit():
    """With the harness's key for seed 0, the twin's per-update episode returns and counts are
    the harness's exactly (the bench's configuration, 2e4 CartPole steps): the same weights,
    resets, actions and updates, so the twin times the very computation the harness runs."""
    pair = bench.PAIRS[ALGO]("CartPole-v1", 20_000)
    task = bench._task("gymnax/CartPole-v1", 20_000, pair.family, pair.harness_config, 1)
    run = harness.train_env(harness.reference_rule(pair.rule), task, task.test[0], [0])
    key = harness.seed_keys(task.seed, [0])[0]
    m = jax.device_get(jax.jit(pair.module.make_train(pair.config))(key))
    assert run.returns_sum.shape == (1, pair.config.num_updates)
    assert run.episodes.sum() > 100  # many episodes: the equality has something to say
    np.testing.assert_array_equal(m["returns_sum"], run.returns_sum[0])
    np.testing.assert_array_equal(m["episodes"], run.episodes[0])
