"""The brax backend: the env contract for every env the brax tasks use, truncation kept apart
from termination, option errors, running observation statistics, and PPO learning on brax.

XLA compiles brax's physics slowly on CPU (10-20 s per env at the default optimisation level,
on one thread), so everything that compiles runs in two worker processes at once, one per core,
at XLA optimisation level 0 (half the compile time; nothing checked here depends on it). A
worker is this file run as a script; the tests read what the workers wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from metabench import envs  # noqa: E402
from metabench.rl import normalise_obs, running_stats_init, running_stats_update  # noqa: E402

# Every env of tasks/brax-transfer-v1*.yaml (checked below), with per-env options for the
# episode tests: reacher never terminates, so a 5-step limit must truncate it every 5 steps;
# a random inverted double pendulum falls (terminates) within 20 steps.
# The comparison with brax stepped by hand checks the adapter, which is one code path for
# every env: it runs on the quick task's envs, and the full task's three (the costliest to
# compile, twice with it) keep the rest of the contract.
CONFORMANCE = {
    "ant": {}, "halfcheetah": {"reference": False}, "hopper": {},
    "humanoid": {"reference": False}, "walker2d": {"reference": False},
    "reacher": {"max_steps_in_episode": 5}, "inverted_double_pendulum": {},
}
# Two workers with about equal compile work (measured), the learning run with the lighter.
WORKERS = (("humanoid", "walker2d", "hopper", "ant"),
           ("halfcheetah", "inverted_double_pendulum", "reacher", "learning"))
LEARNING_STEPS = 120_000


def _conformance(name: str) -> dict:
    """The contract (raises on a breach) and the episode flags of the first trajectory."""
    from metabench.envs import conformance

    traj = conformance.check(f"brax/{name}", num_envs=3, steps=20, **CONFORMANCE[name])
    moved = np.any(traj.final_observation != traj.obs, axis=-1)
    return {"terminated": traj.terminated.tolist(), "truncated": traj.truncated.tolist(),
            "final_differs": moved.tolist()}


def _learning() -> dict:
    """PPO (normalize_obs) on the quick task's reacher, as the harness runs it."""
    import jax

    from metabench.tasks import spec
    from metabench.families import drift

    task = spec.load("brax-transfer-v1-quick")
    reacher = next(e for e in task.test if e.env == "brax/reacher")
    env, base, sample = spec.make_env(reacher)
    cfg = spec.agent_config(task, "drift", reacher)
    assert cfg.normalize_obs
    trainer = drift.make_train(env, cfg, drift.ppo_clip(), total_timesteps=LEARNING_STEPS,
                               sample_params=sample)
    # The workers compile at XLA -O0 (see the top); training runs long enough to want -O2.
    train = jax.jit(trainer.train, compiler_options={"xla_backend_optimization_level": 2})
    metrics = train(jax.random.PRNGKey(0), {})
    returns, episodes = np.asarray(metrics.returns_sum), np.asarray(metrics.episodes)
    tenth = max(1, len(returns) // 10)
    return {"first": float(returns[:tenth].sum() / episodes[:tenth].sum()),
            "last": float(returns[-tenth:].sum() / episodes[-tenth:].sum()),
            "random": reacher.normalise.random, "reference": reacher.normalise.reference,
            "finite_loss": bool(np.all(np.isfinite(np.asarray(metrics.loss)))),
            "updates": int(len(returns))}


def _worker(jobs: list[str], out: str) -> None:
    results = {}
    for job in jobs:
        t0 = time.perf_counter()
        try:
            value = _learning() if job == "learning" else _conformance(job)
            results[job] = {"ok": True, **value}
        except Exception:  # reported by the test that owns the job
            results[job] = {"ok": False, "error": traceback.format_exc()}
        results[job]["seconds"] = round(time.perf_counter() - t0, 1)
    Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def worked():
    """Runs both workers at once; ``{job: result}``."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                                            + " --xla_backend_optimization_level=0").strip(),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                              os.environ.get("PYTHONPATH", "")])}
        procs, outs = [], []
        for i, jobs in enumerate(WORKERS):
            outs.append(Path(d) / f"worker{i}.json")
            procs.append(subprocess.Popen(
                [sys.executable, __file__, str(outs[-1]), *jobs], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=600)[0] for p in procs]
        results = {}
        for out, log in zip(outs, logs):
            assert out.exists(), f"a worker died:\n{log[-3000:]}"
            results.update(json.loads(out.read_text()))
    print("\nbrax worker seconds: " + ", ".join(f"{k} {v['seconds']}" for k, v in results.items()))
    if results.get("learning", {}).get("ok"):
        print("reacher PPO returns, first and last tenth: {first:.1f} -> {last:.1f}".format(
            **results["learning"]))
    return results


def _ok(worked, job):
    r = worked[job]
    assert r["ok"], r["error"]
    return r


def test_the_tasks_use_only_checked_envs():
    from metabench.tasks import spec

    used = {e.env.split("/", 1)[1] for t in ("brax-transfer-v1", "brax-transfer-v1-quick")
            for split in spec.SPLITS for e in spec.load(t).split(split)}
    assert used == set(CONFORMANCE)
    assert sorted(j for w in WORKERS for j in w if j != "learning") == sorted(CONFORMANCE)


def test_every_brax_name_is_registered_and_exists_in_brax():
    import brax.envs

    from metabench.envs import brax as brax_backend

    assert envs.registered("brax") == sorted(f"brax/{n}" for n in brax_backend.NAMES)
    assert set(brax_backend.NAMES) <= set(brax.envs._envs)


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_conformance(worked, name):
    _ok(worked, name)


def test_truncation_is_not_termination(worked):
    # reacher never terminates: the 5-step limit truncates steps 5, 10, 15, 20 of every copy
    # (the counter restarts at each auto-reset), and the final observation is the true one.
    r = _ok(worked, "reacher")
    term, trunc = np.array(r["terminated"]), np.array(r["truncated"])
    assert not term.any()
    expected = np.zeros_like(trunc)
    expected[4::5] = True
    np.testing.assert_array_equal(trunc, expected)
    assert np.array(r["final_differs"])[trunc].all()
    # a random double pendulum falls: terminated, never truncated under the 1000-step limit
    r = _ok(worked, "inverted_double_pendulum")
    term, trunc = np.array(r["terminated"]), np.array(r["truncated"])
    assert term.any() and not trunc.any() and not (term & trunc).any()


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown physics backend 'bullet'.*spring"):
        envs.make("brax/ant", backend="bullet")
    with pytest.raises(ValueError, match="no parameter.*gravity.*max_steps_in_episode"):
        envs.make("brax/ant", gravity=9.0)
    with pytest.raises(ValueError, match="positive integer"):
        envs.make("brax/ant", max_steps_in_episode=10.5)
    env, params = envs.make("brax/ant", backend="spring", max_steps_in_episode=50)
    assert int(params.max_steps_in_episode) == 50 and env.backend == "spring"
    assert env.action_space(params).shape == (8,)
    assert float(np.min(env.action_space(params).low)) == -1.0


def test_task_params_take_a_constant_backend_only(tmp_path):
    from helpers import TINY_TASK, write_task

    from metabench.tasks import spec
    from metabench.tasks.spec import SpecError

    base = TINY_TASK.format(steps=4096).replace(
        "  - env: gymnax/CartPole-v1\n    normalise: {random: 22.0, reference: 500.0}\ntest:",
        "  - env: brax/reacher\n    params: PARAMS\n    normalise: {random: -170.0, "
        "reference: -15.0}\ntest:")
    t = spec.load(write_task(tmp_path, base.replace(
        "PARAMS", "{backend: generalized, max_steps_in_episode: {choice: [100, 200]}}")),
        calibration={})
    assert t.train[0].params["backend"].values == ("generalized",)
    env, _, _ = spec.make_env(t.train[0])
    assert env.backend == "generalized"
    for params, key, words in (
            ("{backend: {choice: [1, 2]}}", "train[0].params.backend", "a constant"),
            ("{backend: bullet}", "train[0].params.backend", "unknown physics backend"),
            ("{gravity: 9.0}", "train[0].params.gravity", "max_steps_in_episode")):
        with pytest.raises(SpecError) as e:
            spec.load(write_task(tmp_path, base.replace("PARAMS", params)), calibration={})
        assert e.value.key == key and words in str(e.value), str(e.value)


def test_running_stats_match_numpy_over_the_concatenated_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (n, 4, 2)).astype(np.float32) * [1.0, 100.0]
               for n in (1, 7, 64, 300)]
    stats = running_stats_init((4, 2))
    for b in batches:
        stats = running_stats_update(stats, b)
    everything = np.concatenate(batches)
    assert float(stats.count) == len(everything)
    np.testing.assert_allclose(np.asarray(stats.mean), everything.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.var), everything.var(0), rtol=1e-4)
    z = np.asarray(normalise_obs(stats, everything))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, rtol=1e-4)


def test_normalize_obs_defaults_off_and_is_validated():
    from metabench.families import drift

    assert drift.Config().normalize_obs is False
    with pytest.raises(ValueError, match="normalize_obs"):
        drift.Config(normalize_obs="yes")


def test_ppo_with_normalized_observations_learns_reacher(worked):
    r = _ok(worked, "learning")
    assert r["finite_loss"]
    # The untrained Gaussian policy does no better than uniform random actions (-169 per
    # 200 steps; it does worse, pushing harder at the action bounds); after 1.2e5 env steps
    # (about 20 s here) PPO must close at least half the gap to the reference (-15).
    assert r["first"] < r["random"] + 0.25 * (r["reference"] - r["random"]), r
    assert r["last"] > r["random"] + 0.5 * (r["reference"] - r["random"]), r


if __name__ == "__main__":  # a worker: python test_brax.py OUT JOB...
    _worker(sys.argv[2:], sys.argv[1])


def test_the_reacher_controller_pushes_the_tip_towards_the_target():
    # Straight arm along +x (q = 0, 0): the tip is at (0.21, 0); a target at (0, 0.21) lies
    # counter-clockwise, so both joint torques must be positive, and the farther joint
    # (the shoulder, lever 0.21) gets the larger one; a target on the tip gives no torque.
    from metabench.envs.brax_oracle import reacher_action

    def obs(tip_minus_target, tip_vel=(0.0, 0.0)):
        return np.array([1, 1, 0, 0, 0.0, 0.21, *tip_vel, *tip_minus_target, 0.0], np.float32)

    a = np.asarray(reacher_action(obs((0.21, -0.21)), 1.0, 0.0))
    np.testing.assert_allclose(a, [0.21 * 0.21, 0.11 * 0.21], rtol=1e-5)
    assert np.all(np.asarray(reacher_action(obs((0.0, 0.0)), 10.0, 8.0)) == 0.0)
    # the damping opposes the tip's motion, and torques stay in the action box
    assert np.asarray(reacher_action(obs((0.0, 0.0), (0.0, 1.0)), 0.0, 8.0))[0] < 0
    assert np.all(np.abs(np.asarray(reacher_action(obs((5.0, -5.0)), 100.0, 0.0))) <= 1.0)
