"""``metabench discover lpg``: the meta-objective, meta-training, resuming, the submission."""

from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import jax.flatten_util  # noqa: F401

from metabench import submissions
from metabench.cli import main
from metabench.discover import lpg as dlpg

from helpers import write_task

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
scoring: {bootstrap_reps: 200, baselines: {lpg: actor_critic}}
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


def test_the_meta_gradient_reaches_the_y_head_and_matches_finite_differences():
    """eta's y-hat head changes the agent's y, which later updates feed to the rule: the
    meta-gradient through 3 agent updates must follow that path (it was exactly 0 when the
    rule's inputs were cut from the graph) and agree with central finite differences.

    The trajectories are fixed (collected once), so the objective is a smooth function of
    eta; eta's y and phi blocks are scaled up so the y path is large enough for float32
    differences (at initialisation it is about 1e-9)."""
    from metabench.envs import make
    from metabench.families import lpg

    env, params = make("grid/tabular-sparse")
    cfg = lpg.Config(num_envs=8, rollout_len=12, lr=20.0, optimiser="sgd", network="tabular",
                     alpha_y=1.0)
    rule = lpg.lpg(hidden=8)
    agent = lpg.make_agent(env, cfg, rule, sample_params=lambda _: params)
    state = agent.init(jax.random.PRNGKey(0))
    trajs = []
    for _ in range(4):
        state, traj, _ = agent.rollout(state)
        trajs.append(traj)
    start = agent.init(jax.random.PRNGKey(0))
    eta = dict(rule.init(jax.random.PRNGKey(1)))
    eta["y"] = jax.tree_util.tree_map(lambda x: 3.0 * x, eta["y"])
    eta["phi"] = jax.tree_util.tree_map(lambda x: 10.0 * x, eta["phi"])
    signs = jnp.where(trajs[3].action.reshape(-1) % 2 == 0, 1.0, -1.0)

    def objective(eta):
        st = start
        for traj in trajs[:3]:
            st, _, _ = agent.update(st, eta, traj)
        obs = trajs[3].obs.reshape((-1, *trajs[3].obs.shape[2:]))
        logits, y_logits = agent.network.apply(st.params, obs)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                   trajs[3].action.reshape(-1, 1), 1)[:, 0]
        return jnp.mean(logp * signs) + 0.1 * jnp.mean(jax.nn.log_softmax(y_logits)[:, 0])

    f = jax.jit(objective)
    g = jax.jit(jax.grad(objective))(eta)
    block_max = {k: max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(v))
                 for k, v in g.items()}
    assert all(v > 0 for v in block_max.values()), block_max
    flat, unravel = jax.flatten_util.ravel_pytree(eta)
    g_flat, _ = jax.flatten_util.ravel_pytree(g)
    # The y head's largest entries, and the largest of each other block.
    offsets, i = {}, 0
    for k in sorted(eta):
        n = jax.flatten_util.ravel_pytree(eta[k])[0].size
        offsets[k] = (i, i + n)
        i += n
    lo, hi = offsets["y"]
    picks = list(lo + np.argsort(-np.abs(np.asarray(g_flat[lo:hi])))[:3])
    picks += [a + int(np.argmax(np.abs(np.asarray(g_flat[a:b]))))
              for k, (a, b) in offsets.items() if k != "y"]
    eps = 0.03
    for j in picks:
        e = jnp.zeros_like(flat).at[j].set(eps)
        fd = (float(f(unravel(flat + e))) - float(f(unravel(flat - e)))) / (2 * eps)
        assert fd == pytest.approx(float(g_flat[j]), rel=0.05, abs=1e-6), (j, fd, g_flat[j])
    assert abs(float(g_flat[picks[0]])) > 1e-5


def test_the_critic_carries_a_reward_beyond_the_window_to_the_first_action():
    """A delayed chain of length 30 seen through a 20-step window: the +-1 for the first
    action falls outside every window that holds it, so a reward-to-go inside the window
    gives the first action no credit. The meta-critic, trained by ``critic_step`` on the
    agent's rollouts, bootstraps at the window's end, so the meta-objective's gradient at
    the start state pushes the updated policy towards the rewarding first action."""
    from metabench.envs import make
    from metabench.families import lpg

    env, params = make("chain/long", chain_length=30, good_action=1)
    cfg = lpg.Config(num_envs=16, rollout_len=20, network="tabular")
    agent = lpg.make_agent(env, cfg, lpg.actor_critic(), sample_params=lambda _: params)
    critic = dlpg.Critic("tabular")
    opt = optax.adam(0.05)
    state = agent.init(jax.random.PRNGKey(0))
    c_params = critic.init(jax.random.PRNGKey(1), state.obs[:1])
    c_opt = opt.init(c_params)

    @jax.jit
    def train(state, c_params, c_opt):
        def body(carry, _):
            state, c_params, c_opt = carry
            state, traj, _ = agent.rollout(state)  # the uniform policy: zero tables
            c_params, c_opt, _ = dlpg.critic_step(critic, opt, c_params, c_opt, traj, 0.99,
                                                  0.9)
            return (state, c_params, c_opt), None

        return jax.lax.scan(body, (state, c_params, c_opt), None, length=400)[0]

    state, c_params, _ = train(state, c_params, c_opt)
    state, traj, _ = agent.rollout(state)
    adv, _ = dlpg.critic_advantage(critic, c_params, traj, 0.99, 0.9)
    first = np.asarray(traj.obs[..., 0] > 0.5)  # the start state
    # No first action's episode ends inside its window: 30 steps > 20.
    assert first.any() and np.all(np.asarray(traj.reward)[first] == 0)
    actions = np.asarray(traj.action)[first]
    a = np.asarray(adv)[first]
    assert (actions == 1).any() and (actions == 0).any()
    assert np.all(a[actions == 1] > 0.2) and np.all(a[actions == 0] < -0.2), (actions, a)
    # The meta-objective's gradient in the updated agent's start-state logits.
    obs = traj.obs.reshape((-1, traj.obs.shape[-1]))
    logits, y_logits = agent.network.apply(state.params, obs)
    cfg_d = dlpg.LPGDiscoverConfig()

    def j(logits):
        return dlpg.meta_objective(logits, y_logits, traj.action.reshape(-1), adv.reshape(-1),
                                   0.0, 0.0, cfg_d)[0]

    g = np.asarray(jax.grad(j)(logits))[first.reshape(-1)].sum(0)
    assert g[1] > 0 > g[0], g


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


def _watch_meta_grad(mp: pytest.MonkeyPatch, kill_at: int | None = None) -> list:
    """Wraps the jitted meta-gradient of every train env built from here on: records each
    call as ``(the unwrapped function, its arguments)`` and, on call ``kill_at``, raises
    KeyboardInterrupt as a Ctrl-C during a meta-step would."""
    calls: list = []
    init = dlpg._EnvMeta.__init__

    def watched(self, *a, **k):
        init(self, *a, **k)
        inner = self.meta_grad

        def meta_grad(*args):
            calls.append((inner, args))
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            return inner(*args)

        self.meta_grad = meta_grad

    mp.setattr(dlpg._EnvMeta, "__init__", watched)
    return calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-meta-step run (its meta-gradient calls recorded), and the same run killed in
    meta-step 4 (checkpoints every 2: step 3's row is past the last one) and rerun to 6
    (module-shared)."""
    tmp = tmp_path_factory.mktemp("lpg")
    path = write_task(tmp, TASK, "lpg-tiny")
    args = ["discover", "lpg", "--task", str(path), *ARGS, "--checkpoint-every", "2",
            "--meta-steps", "6", "--out"]
    with pytest.MonkeyPatch.context() as mp:
        full = _watch_meta_grad(mp)
        assert main(args + [str(tmp / "full")]) == 0
    with pytest.MonkeyPatch.context() as mp:
        _watch_meta_grad(mp, kill_at=4)
        with pytest.raises(KeyboardInterrupt):
            main(args + [str(tmp / "resumed")])
    killed = [json.loads(line)["step"] for line in (tmp / "resumed" / "curve.jsonl").open()]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        resumed = _watch_meta_grad(mp)
        assert main(args + [str(tmp / "resumed")]) == 0
    return SimpleNamespace(dir=tmp, path=path, full=full, killed=killed, resumed=resumed,
                           log=out.getvalue())


def test_meta_training_runs_with_finite_objectives(runs):
    curve = [json.loads(line) for line in (runs.dir / "full" / "curve.jsonl").open()]
    assert [c["step"] for c in curve] == list(range(1, 7))
    obj = [c["objective"] for c in curve]
    assert all(np.isfinite(obj))  # a non-finite meta-gradient would have raised
    summary = json.loads((runs.dir / "full" / "summary.json").read_text())
    assert summary["env_steps"] == 6 * 8 * (2 + 1) * 8 * 16
    assert len(runs.full) == 6


def test_the_first_meta_step_ascends_the_meta_gradient(runs):
    """The first meta-step's update of eta (the one the run took: clipped Adam) points up the
    meta-gradient of that step's own batch: its inner product with the gradient is positive,
    and larger than that of any of 5 steps with the same per-coordinate sizes and random
    signs. (A 100-step run's objective gain was 0.1% of J, within what random changes of eta
    give, and one Adam step moves J by float noise; the first-order check is exact.)"""
    meta_grad, (eta0, *batch) = runs.full[0]
    eta1 = runs.full[1][1][0]  # eta after the first meta-step
    g = jax.flatten_util.ravel_pytree(meta_grad(eta0, *batch)[0])[0]
    step = jax.flatten_util.ravel_pytree(
        jax.tree_util.tree_map(lambda a, b: a - b, eta1, eta0))[0]
    assert float(jnp.abs(g).max()) > 0
    along = float(g @ step)
    rng = np.random.default_rng(0)
    random = [float(g @ (jnp.abs(step) * rng.choice([-1.0, 1.0], size=step.shape)))
              for _ in range(5)]
    assert along > 0 and along > max(random), (along, random)


def test_a_run_killed_between_checkpoints_resumes_with_each_step_once(runs):
    """The rerun resumed from the checkpoint at meta-step 2 (it says so and makes 4
    meta-gradient calls, not 6), lists steps 1..6 once each (appending after the checkpoint
    once gave [1, 2, 3, 3, 4, 5, 6]) and ends where the uninterrupted run ends."""
    assert runs.killed == [1, 2, 3]
    assert "resuming from meta-step 2" in runs.log and len(runs.resumed) == 4
    a = np.load(runs.dir / "full" / "submission" / "params.npz")
    b = np.load(runs.dir / "resumed" / "submission" / "params.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    full = [json.loads(line) for line in (runs.dir / "full" / "curve.jsonl").open()]
    resumed = [json.loads(line) for line in (runs.dir / "resumed" / "curve.jsonl").open()]
    assert [c["step"] for c in resumed] == list(range(1, 7))
    assert [c["objective"] for c in full] == [c["objective"] for c in resumed]
    ckpt = json.loads((runs.dir / "resumed" / "checkpoint.json").read_text())["curve"]
    assert [c["objective"] for c in full] == [c["objective"] for c in ckpt]


def test_discovered_lpg_is_a_ready_submission(runs):
    folder = runs.dir / "full" / "submission"
    sub = submissions.load(folder)
    assert sub.family == "lpg" and sub.factory == "lpg" and sub.kwargs == {"hidden": 8}
    assert sub.disclosure.task == "lpg-tiny" and sub.disclosure.env_steps > 0
    discovery = json.loads((folder / "discovery.json").read_text())
    assert discovery["provenance"]["command"].startswith("metabench discover lpg")
    result = submissions.check(folder)
    assert result.ok, result.message


def test_linear_readout_r2_is_held_out():
    rng = np.random.default_rng(0)
    y = rng.dirichlet(np.ones(30), size=200)
    w = rng.normal(size=30)
    assert dlpg.linear_readout_r2(y, y @ w + 3.0) == pytest.approx(1.0, abs=1e-6)
    # Features unrelated to the target: a fit on half the states does not carry over.
    assert dlpg.linear_readout_r2(y, rng.normal(size=200)) < 0.1
    assert np.isnan(dlpg.linear_readout_r2(y[:3], np.arange(3.0)))


def test_a_non_finite_meta_gradient_skips_the_step_and_restarts_the_lifetimes(tmp_path,
                                                                             monkeypatch):
    """A diverged lifetime (simulated: meta-step 2's gradient is NaN) costs one meta-step:
    eta is not updated, the env's lifetimes start afresh, the curve row says so, and the run
    goes on; with --max-nonfinite-steps 0 it stops at once, naming the step and the env."""
    calls = []
    init = dlpg._EnvMeta.__init__

    def watched(self, *a, **k):
        init(self, *a, **k)
        inner = self.meta_grad

        def meta_grad(*args):
            calls.append(args)
            g, new, stats = inner(*args)
            if len(calls) == 2:
                g = jax.tree_util.tree_map(lambda x: x * jnp.nan, g)
            return g, new, stats

        self.meta_grad = meta_grad

    monkeypatch.setattr(dlpg._EnvMeta, "__init__", watched)
    path = write_task(tmp_path, TASK, "lpg-tiny")
    args = ["discover", "lpg", "--task", str(path), *ARGS, "--meta-steps", "3", "--out"]
    assert main(args + [str(tmp_path / "run")]) == 0
    curve = [json.loads(line) for line in (tmp_path / "run" / "curve.jsonl").open()]
    assert [c["step"] for c in curve] == [1, 2, 3]
    assert [c.get("skipped") for c in curve] == [None, ["tabular-dense"], None]
    eta2, lts2 = calls[1][0], calls[1][1]
    eta3, lts3 = calls[2][0], calls[2][1]
    for a, b in zip(jax.tree_util.tree_leaves(eta2), jax.tree_util.tree_leaves(eta3)):
        np.testing.assert_array_equal(a, b)  # the skipped step left eta as it was
    # restarted: the lifetimes are at their starting (staggered) ages again, where step 2's
    # were K = 2 updates older, and their return tallies are empty
    np.testing.assert_array_equal(np.asarray(lts2.age), np.asarray(lts3.age) + 2)
    assert int(lts3.age[0]) == 0 and float(jnp.sum(lts3.ret_sum)) == 0

    calls.clear()
    with pytest.raises(FloatingPointError, match=r"meta-step 2 \(tabular-dense\), 1 "
                                                 r"meta-steps in a row"):
        main(args[:-1] + ["--max-nonfinite-steps", "0", "--out", str(tmp_path / "strict")])
