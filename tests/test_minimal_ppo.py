"""Tests for the standalone reference PPO in ``metabench.minimal_ppo``."""

import dataclasses
import math

import pytest

from metabench.minimal_ppo import Config, benchmark


def test_config_defaults_match_purejaxrl_cartpole():
    c = Config()
    assert (c.env_name, c.num_envs, c.num_steps, c.total_timesteps) == (
        "CartPole-v1", 4, 128, 500_000)
    assert (c.update_epochs, c.num_minibatches, c.hidden) == (4, 4, 64)
    assert c.lr == 2.5e-4 and c.anneal_lr
    assert (c.gamma, c.gae_lambda, c.clip_eps) == (0.99, 0.95, 0.2)
    assert (c.ent_coef, c.vf_coef, c.max_grad_norm) == (0.01, 0.5, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_envs = 8  # type: ignore[misc]


def test_cartpole_learns_two_seeds():
    """Default CartPole config, 5e5 steps, 2 seeds vmapped in one compiled call."""
    result = benchmark(Config(), seeds=2, repeats=1)
    assert set(result) >= {"compile_s", "run_s", "env_steps_per_s", "final_return"}
    assert result["run_s"] > 0 and math.isfinite(result["env_steps_per_s"])
    # A random policy scores ~22; PPO should be near the 500 cap by the end.
    assert result["final_return"] >= 400, result
