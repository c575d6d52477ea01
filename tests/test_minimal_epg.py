"""Tests for the standalone reference EPG agent (REINFORCE) in ``metabench.bench.twins.epg``."""

import dataclasses
import inspect

import jax
import numpy as np
import pytest

from metabench import bench, harness
from metabench.families import epg
from metabench.bench.twins.epg import Config

ALGO = 'epg'  # the bench's name for this pair


def test_config_defaults_match_the_epg_family():
    """The yardstick trains what the harness trains: the family's agent defaults, and the
    reinforce rule's defaults for the loss's coefficients."""
    c = Config()
    family = epg.Config()
    shared = {f.name for f in dataclasses.fields(Config)} & {
        f.name for f in dataclasses.fields(epg.Config)}
    assert shared >= {"num_envs", "rollout_len", "epochs", "minibatches", "lr", "anneal_lr",
                      "max_grad_norm", "hidden", "activation"}
    for name in sorted(shared):
        assert tuple(getattr(c, name)) == family.hidden if name == "hidden" else (
            getattr(c, name) == getattr(family, name)), name
    rule = inspect.signature(epg.reinforce).parameters
    for name in ("gamma", "ent_coef", "vf_coef"):
        assert getattr(c, name) == rule[name].default, name
    assert c.memory_dim == epg.MEMORY_DIM
    assert family.network == "mlp"  # the only torso the minimal implementation has
    assert c.num_updates == 100_000 // (16 * 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_envs = 8  # type: ignore[misc]


def test_the_twin_keeps_no_buffer_because_reinforce_never_reads_it():
    """The family's buffer across updates is context for learned losses; REINFORCE's loss is
    the same whatever the history holds, so the twin (which has no buffer) trains what the
    harness trains with ``reinforce``."""
    assert "buffer_len" not in {f.name for f in dataclasses.fields(Config)}
    assert epg.Config().buffer_len > epg.Config().rollout_len
    rule = epg.reinforce()
    x = epg.random_inputs(jax.random.PRNGKey(0))
    moved = x._replace(history=jax.tree_util.tree_map(lambda a: a + 5.0, x.history))
    for other in (moved, x._replace(history=None)):
        np.testing.assert_array_equal(np.asarray(rule.apply({}, x)),
                                      np.asarray(rule.apply({}, other)))


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
