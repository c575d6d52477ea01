"""``metabench discover lpg``: the meta-objective, meta-training, resuming, the submission."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import spec, submission
from metabench.cli import main
from metabench.discover import lpg as dlpg

from conftest import write_task

TASK = """
id: lpg-tiny
description: a tiny task for meta-training LPG (tabular agents on the dense grid)
total_timesteps: 20000
seed: 0
train:
  - env: grid/tabular-dense
    normalise: {random: 0.0, reference: 10.0}
test:
  - env: grid/tabular-dense
    normalise: {random: 0.0, reference: 10.0}
agents:
  lpg: {num_envs: 8, rollout_len: 16, lr: 1.0, optimiser: sgd, network: tabular}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200}
"""
ARGS = ["--lifetimes", "8", "--inner-updates", "2", "--lifetime-updates", "40", "--hidden",
        "8", "--meta-lr", "0.01", "--lr-arm", "0.5", "--lr-arm", "1.0"]


def test_meta_objective_regularisers_on_hand_inputs():
    cfg = dlpg.LPGDiscoverConfig(beta_pi_entropy=0.5, beta_y_entropy=0.25, beta_pi_hat=2.0,
                                 beta_y_hat=4.0)
    logits = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
    y_logits = jnp.zeros((2, 4))  # uniform y: entropy log 4
    actions = jnp.array([0, 1])
    adv = jnp.array([1.0, -2.0])
    j, (pg, h_pi, h_y) = dlpg.meta_objective(logits, y_logits, actions, adv, 0.1, 0.3, cfg)
    want_pg = (np.log(0.5) * 1.0 + np.log(0.1) * -2.0) / 2
    want_hpi = (np.log(2) + -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))) / 2
    assert float(pg) == pytest.approx(want_pg, rel=1e-5)
    assert float(h_pi) == pytest.approx(want_hpi, rel=1e-5)
    assert float(h_y) == pytest.approx(np.log(4), rel=1e-5)
    want = want_pg + 0.5 * want_hpi + 0.25 * np.log(4) - 2.0 * 0.1 - 4.0 * 0.3
    assert float(j) == pytest.approx(want, rel=1e-5)
    # The advantages are constants: no gradient flows into them.
    g = jax.grad(lambda a: dlpg.meta_objective(logits, y_logits, actions, a, 0.0, 0.0, cfg)[0])(
        adv)
    assert np.all(np.asarray(g) == 0)


def test_reward_to_go_cuts_at_episode_ends():
    r = jnp.array([[1.0], [1.0], [1.0], [1.0]])
    done = jnp.array([[0.0], [1.0], [0.0], [0.0]])
    g = dlpg._reward_to_go(r, done, 0.5)
    np.testing.assert_allclose(g[:, 0], [1.5, 1.0, 1.5, 1.0])


def test_bandit_prefers_the_better_arm_and_tries_untried_ones():
    b = dlpg.Bandit(3, temperature=0.5)
    np.testing.assert_allclose(b.probs(), [1 / 3] * 3)
    b.update(np.array([10.0, 30.0, 0.0]), np.array([1.0, 1.0, 0.0]))
    p = b.probs()
    assert p[1] > p[0] and p[2] >= p[1] and p.sum() == pytest.approx(1.0)


def test_config_errors():
    with pytest.raises(ValueError, match="lifetime_updates .2. must be at least inner_updates"):
        dlpg.LPGDiscoverConfig(lifetime_updates=2, inner_updates=5)
    with pytest.raises(ValueError, match="lr_arms must be positive"):
        dlpg.LPGDiscoverConfig(lr_arms=(0.001, -1.0))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 100-step run, and the same run stopped at 40 and resumed (module-shared)."""
    tmp = tmp_path_factory.mktemp("lpg")
    path = write_task(tmp, TASK, "lpg-tiny")
    args = ["discover", "lpg", "--task", str(path), *ARGS, "--checkpoint-every", "5"]
    assert main(args + ["--meta-steps", "100", "--out", str(tmp / "full")]) == 0
    assert main(args + ["--meta-steps", "40", "--out", str(tmp / "resumed")]) == 0
    assert main(args + ["--meta-steps", "100", "--out", str(tmp / "resumed")]) == 0
    return tmp, path


def test_meta_training_raises_the_objective_with_finite_gradients(runs):
    runs, path = runs
    curve = [json.loads(line) for line in (runs / "full" / "curve.jsonl").open()]
    assert [c["step"] for c in curve] == list(range(1, 101))
    obj = [c["objective"] for c in curve]
    assert all(np.isfinite(obj))  # a non-finite meta-gradient would have raised
    summary = json.loads((runs / "full" / "summary.json").read_text())
    assert summary["env_steps"] == 100 * 8 * (2 + 1) * 8 * 16
    # On the same lifetimes (common random numbers), the meta-trained rule's updates
    # leave the agents with a higher meta-objective than the initial rule's.
    task = spec.load(path)
    cfg = dlpg.LPGDiscoverConfig(lifetimes=8, inner_updates=2, lifetime_updates=40, hidden=8,
                                 lr_arms=(0.5, 1.0))
    eta0 = dlpg.lpg_family.lpg(hidden=8).init(jax.random.split(jax.random.PRNGKey(0))[1])
    eta = submission.load_params(runs / "full" / "submission" / "params.npz")
    before = dlpg.evaluate_objective(task, cfg, eta0, seed=123, repeats=5)
    after = dlpg.evaluate_objective(task, cfg, eta, seed=123, repeats=5)
    assert after > before, (before, after)


def test_a_stopped_run_resumes_to_identical_results(runs):
    runs, _ = runs
    a = np.load(runs / "full" / "submission" / "params.npz")
    b = np.load(runs / "resumed" / "submission" / "params.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    full = [json.loads(line) for line in (runs / "full" / "curve.jsonl").open()]
    resumed = json.loads((runs / "resumed" / "checkpoint.json").read_text())["curve"]
    assert [c["objective"] for c in full] == [c["objective"] for c in resumed]


def test_discovered_lpg_is_a_ready_submission(runs):
    runs, _ = runs
    folder = runs / "full" / "submission"
    sub = submission.load(folder)
    assert sub.family == "lpg" and sub.factory == "lpg" and sub.kwargs == {"hidden": 8}
    assert sub.disclosure.task == "lpg-tiny" and sub.disclosure.env_steps > 0
    discovery = json.loads((folder / "discovery.json").read_text())
    assert discovery["provenance"]["command"].startswith("metabench discover lpg")
    result = submission.check(folder)
    assert result.ok, result.message
