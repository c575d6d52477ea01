"""The environment layer: registry, every gymnax env under jit+vmap, params and truncation."""

from __future__ import annotations

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import envs
from metabench.envs import conformance, make_param_sampler
from metabench.tasks.spec import ParamDistribution
from metabench.envs.registry import EnvEntry

OFFLINE = [i for i in envs.registered("gymnax") if envs.entry(i).offline]


def test_every_gymnax_env_is_registered():
    assert envs.registered("gymnax") == sorted(f"gymnax/{n}" for n in gymnax.registered_envs)
    # Only MNISTBandit downloads data when built; it is listed with the reason.
    offline_missing = set(envs.registered("gymnax")) - set(OFFLINE)
    assert offline_missing == {"gymnax/MNISTBandit-bsuite"}
    assert "downloads" in envs.entry("gymnax/MNISTBandit-bsuite").note


@pytest.mark.parametrize("env_id", OFFLINE)
def test_env_resets_and_steps_under_jit_and_vmap(env_id):
    env, params = envs.make(env_id)
    n, steps = 3, 4
    obs0, obs, r, term, trunc, final, *_ = conformance.rollout_fn(env, params, n, steps)(
        jax.random.PRNGKey(0))
    obs_shape = env.observation_space(params).shape
    assert obs0.shape == (n, *obs_shape)
    assert obs.shape == final.shape == (steps, n, *obs_shape)
    assert r.shape == term.shape == trunc.shape == (steps, n)
    assert term.dtype == trunc.dtype == jnp.bool_
    assert np.all(np.isfinite(np.asarray(r, dtype=np.float64)))


def test_registry_validates():
    with pytest.raises(ValueError, match="backend/Name"):
        envs.register(EnvEntry("CartPole", lambda: None))
    with pytest.raises(ValueError, match="already registered"):
        envs.register(EnvEntry("gymnax/CartPole-v1", lambda: None))
    with pytest.raises(KeyError, match="did you mean gymnax/CartPole-v1"):
        envs.make("gymnax/Cartpole-v1")


def test_param_overrides_are_checked_and_derived_fields_follow():
    _, p = envs.make("gymnax/CartPole-v1", length=1.0, masspole=0.2)
    assert float(p.length) == 1.0
    # gymnax caches these; a shifted pole must really change the dynamics
    assert float(p.polemass_length) == pytest.approx(0.2)
    assert float(p.total_mass) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="no parameter.*lenght.*length"):
        envs.make("gymnax/CartPole-v1", lenght=1.0)
    # a derived field cannot be set: it would be recomputed from the others at once
    with pytest.raises(ValueError, match="polemass_length is derived .*masspole and length"):
        envs.make("gymnax/CartPole-v1", polemass_length=1.0)


def test_param_distribution_samples_per_seed_within_range():
    env, base = envs.make("gymnax/CartPole-v1")
    dists = {"length": ParamDistribution.parse({"uniform": [0.4, 0.8]}),
             "max_steps_in_episode": ParamDistribution.parse({"choice": [100, 200]})}
    sampler = jax.jit(jax.vmap(make_param_sampler(env, base, dists)))
    p = sampler(jax.random.split(jax.random.PRNGKey(0), 256))
    length = np.asarray(p.length)
    assert length.min() >= 0.4 and length.max() <= 0.8 and length.std() > 0.05
    np.testing.assert_allclose(np.asarray(p.polemass_length), 0.1 * length, rtol=1e-6)
    assert set(np.asarray(p.max_steps_in_episode).tolist()) == {100, 200}
    assert np.issubdtype(np.asarray(p.max_steps_in_episode).dtype, np.integer)
    with pytest.raises(ValueError, match="exactly one of"):
        ParamDistribution.parse({"gaussian": [0, 1]})
    with pytest.raises(ValueError, match="lo > 0"):
        ParamDistribution.parse({"loguniform": [0.0, 1.0]})


def test_truncation_is_not_termination():
    # A 5-step time limit: the step that hits it is truncated (not terminated), and
    # final_observation is the true next state, not the reset one.
    env, params = envs.make("gymnax/CartPole-v1", max_steps_in_episode=5)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    key = jax.random.PRNGKey(1)
    for t in range(5):
        key, k = jax.random.split(key)
        # alternate actions so the pole stays up for 5 steps
        obs, state, r, term, trunc, info = env.step(k, state, t % 2, params)
    assert bool(trunc) and not bool(term)
    assert not np.allclose(np.asarray(info["final_observation"]), np.asarray(obs))


def test_every_backend_builds_envs_of_the_one_interface():
    """Callers read capabilities (``num_agents``, ``jittable``, ``release``, ...) instead of
    probing for them: every backend's envs are :class:`metabench.envs.api.Env`s."""
    from metabench.envs import make, registered
    from metabench.envs.api import Env

    first = {}
    for env_id in registered():
        first.setdefault(env_id.split("/")[0], env_id)
    assert set(first) == {"gymnax", "chain", "grid", "brax", "gymnasium", "pettingzoo"}
    for backend, env_id in sorted(first.items()):
        env, _ = make(env_id)
        assert isinstance(env, Env) and env.id == env_id, backend
        assert env.jittable == (backend not in ("gymnasium", "pettingzoo")), backend
        assert (env.num_agents > 1) == (backend == "pettingzoo"), backend
        assert (env.episode_log() is None) == (backend != "pettingzoo"), backend
        env.release()


def test_plotting_libraries_load_only_when_used():
    """gymnax's Pong imports seaborn and matplotlib.pyplot at import; metabench defers both
    (1.1 s of every process's start) until something reads them, and then they work."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        import metabench.tasks.spec, gymnax
        assert "scipy.stats" not in sys.modules and "seaborn.palettes" not in sys.modules
        import gymnax.environments.misc.pong as pong
        env, params = gymnax.make("Pong-misc")
        assert len(pong.sns.color_palette("cubehelix", 3)) == 3
        import seaborn, matplotlib.pyplot as plt
        assert type(sys.modules["seaborn"]).__name__ == "module" and seaborn.palettes
        fig, ax = plt.subplots()
        assert type(sys.modules["matplotlib.pyplot"]).__name__ == "module"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
