"""The EPG family: REINFORCE's returns and loss, the loss network over a buffer across
updates, policy-gradient guidance, the null control, checks, learning CartPole, and
``metabench discover epg`` end to end."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import harness, nets, params_io, submissions
from metabench.tasks import spec
from metabench.cli import main
from metabench.families import epg
from metabench.families.base import count_traces
from metabench.rules import UpdateRule, no_params

from helpers import CARTPOLE_SPLITS, write_task

TASK = """
id: epg-cartpole
description: the EPG agent on CartPole
total_timesteps: 100000
seed: 0
""" + CARTPOLE_SPLITS + """agents:
  epg: {}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {epg: reinforce}}
"""


def _inputs(b: int = 2, t: int = 4, **fields) -> epg.Inputs:
    base = dict(reward=jnp.ones((b, t)), done=jnp.zeros((b, t)),
                log_prob=jnp.full((b, t), -0.5), entropy=jnp.full((b, t), 0.7),
                value=jnp.ones((b, t)), memory=jnp.zeros((b, t, epg.MEMORY_DIM)),
                bootstrap=jnp.zeros((b, t)))
    base.update({k: jnp.asarray(v, jnp.float32) for k, v in fields.items()})
    return epg.Inputs(**base)


HAND = _inputs(reward=[[1, 2, 3, 4], [1, 1, 1, 1]],
               # env 0 is cut by a time limit after t=1; env 1 terminates after t=2
               done=[[0, 1, 0, 0], [0, 0, 1, 0]],
               bootstrap=[[7, 6, 9, 10], [9, 9, 0, 2]])
# gamma = 0.5; G_t = r_t + gamma * (bootstrap_t where cut at t (done, or t = 3) else G_t+1):
#   env 0: G_3 = 4 + 5 = 9, G_2 = 3 + 4.5 = 7.5, G_1 = 2 + 3 = 5 (cut), G_0 = 1 + 2.5 = 3.5
#   env 1: G_3 = 1 + 1 = 2, G_2 = 1 + 0 = 1 (terminal), G_1 = 1.5, G_0 = 1.75
HAND_RETURNS = np.array([[3.5, 5.0, 7.5, 9.0], [1.75, 1.5, 1.0, 2.0]])


def test_returns_to_go_cut_at_episode_ends_and_bootstrapped():
    got = epg.returns_to_go(HAND.reward, HAND.done, HAND.bootstrap, 0.5)
    np.testing.assert_allclose(np.asarray(got), HAND_RETURNS, rtol=1e-6)


def test_reinforce_loss_equals_its_hand_computed_value():
    rule = epg.reinforce(gamma=0.5, ent_coef=0.1, vf_coef=0.5)
    got = np.asarray(rule.apply({}, HAND))
    adv = HAND_RETURNS - 1.0  # V = 1, log pi = -0.5, H = 0.7
    np.testing.assert_allclose(got, 0.5 * adv + 0.5 * adv**2 - 0.07, rtol=1e-6)
    assert got[0, 0] == pytest.approx(1.25 + 3.125 - 0.07)
    # The policy gradient is -(G - V) on log pi; the value head regresses on G.
    g = jax.grad(lambda lp, v: jnp.sum(rule.apply({}, HAND._replace(log_prob=lp, value=v))),
                 argnums=(0, 1))(HAND.log_prob, HAND.value)
    np.testing.assert_allclose(np.asarray(g[0]), -adv, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g[1]), -adv, rtol=1e-6)  # -2 * vf_coef * (G - V)


def test_epg_is_the_learned_loss_alone_and_reads_the_buffer():
    """``epg`` is the loss network with no REINFORCE term; every layer gets a gradient, the
    loss moves log pi, and it reads the buffer's older steps (differentiably: the paper
    re-evaluates them with the current policy) but not their padding."""
    rule, ref = epg.epg(), epg.reinforce()
    params = rule.init(jax.random.PRNGKey(1))
    x = epg.random_inputs(jax.random.PRNGKey(2))
    out = np.asarray(rule.apply(params, x))
    assert out.shape == x.reward.shape and np.all(np.isfinite(out))
    assert not np.allclose(out, np.asarray(ref.apply({}, x)))

    def loss(mp, lp, old_lp):
        return jnp.mean(rule.apply(mp, x._replace(log_prob=lp,
                                                  history=x.history._replace(log_prob=old_lp))))

    g_meta, g_lp, g_old = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        params, x.log_prob, x.history.log_prob)
    for path, g in jax.tree_util.tree_leaves_with_path(g_meta):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
    assert np.any(np.asarray(g_lp) != 0)
    valid = np.asarray(x.history.valid) > 0
    g_old = np.asarray(g_old)
    assert np.all(g_old[valid] != 0) and np.all(g_old[~valid] == 0)
    # Other rewards in the history change the loss; values written on the padding do not.
    h = x.history
    other = x._replace(history=h._replace(reward=h.reward + h.valid))
    assert not np.allclose(np.asarray(rule.apply(params, other)), out)
    junk = x._replace(history=h._replace(reward=jnp.where(h.valid > 0, h.reward, 7.0),
                                         value=jnp.where(h.valid > 0, h.value, -3.0)))
    np.testing.assert_array_equal(np.asarray(rule.apply(params, junk)), out)
    # No history at all (hand-built inputs, or buffer_len == rollout_len) is fine too.
    assert np.all(np.isfinite(np.asarray(rule.apply(params, x._replace(history=None)))))


def test_reinforce_never_reads_the_history():
    """The baseline (and guide) is on-policy: the buffer's older steps do not change it, so
    it costs what it did before the buffer (their network passes are dead code)."""
    rule = epg.reinforce()
    x = epg.random_inputs(jax.random.PRNGKey(4))
    other = x._replace(history=jax.tree_util.tree_map(lambda a: a * 3.0 + 1.0, x.history))
    np.testing.assert_array_equal(np.asarray(rule.apply({}, x)),
                                  np.asarray(rule.apply({}, other)))
    np.testing.assert_array_equal(np.asarray(rule.apply({}, x)),
                                  np.asarray(rule.apply({}, x._replace(history=None))))


def test_guided_mixes_the_learned_loss_with_reinforce_by_an_explicit_weight():
    """EPG's meta-training loss ``(1 - alpha) L_phi + alpha L_PG``: alpha is a meta-parameter
    leaf (one compiled call for every alpha); 0 is the learned loss exactly, 1 REINFORCE."""
    rule = epg.epg()
    g = epg.guided(rule)
    phi = rule.init(jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(g.init(jax.random.PRNGKey(0))) == \
        jax.tree_util.tree_structure({"loss": phi, "guidance": 0.0})
    x = epg.random_inputs(jax.random.PRNGKey(5))
    learned = np.asarray(rule.apply(phi, x))
    pg = np.asarray(epg.reinforce().apply({}, x))
    fn, traces = count_traces(g.apply)
    fn = jax.jit(fn)
    for alpha in (0.0, 1.0, 0.25):
        got = np.asarray(fn({"loss": phi, "guidance": jnp.float32(alpha)}, x))
        np.testing.assert_allclose(got, (1 - alpha) * learned + alpha * pg, rtol=1e-5,
                                   atol=1e-5)
        if alpha in (0.0, 1.0):
            np.testing.assert_array_equal(got, learned if alpha == 0.0 else pg)
    assert traces[0] == 1


def test_null_epg_is_a_control_with_no_gradient():
    """``null_epg``: a loss identically zero that reads no reward, so the agent's parameters
    get an exactly zero gradient; the check passes it (a zero loss is a loss) and reports
    that no gradient flows to log pi."""
    from metabench import nets

    info = epg.REFERENCE_RULES["null_epg"]
    assert "control" in info.description and info.citation == "metabench control"
    rule = epg.null_epg()
    x = epg.random_inputs(jax.random.PRNGKey(6))
    # NaN rewards do not reach the output: it never reads them.
    poisoned = x._replace(reward=jnp.full_like(x.reward, jnp.nan))
    np.testing.assert_array_equal(np.asarray(rule.apply({}, poisoned)),
                                  np.zeros(x.reward.shape))

    # The agent loss as the trainer builds it: inputs computed from the agent's parameters.
    net = nets.ActorCritic(action_dim=3)
    obs = jax.random.normal(jax.random.PRNGKey(7), (4 * 16, 5))
    action = jax.random.randint(jax.random.PRNGKey(8), (4, 16), 0, 3)
    params = {"net": net.init(jax.random.PRNGKey(9), obs), "memory": jnp.ones(epg.MEMORY_DIM)}

    def agent_loss(p):
        out, value = net.apply(p["net"], obs)
        out = out.reshape((4, 16, 3))
        mem = jnp.broadcast_to(jnp.tanh(p["memory"]), (4, 16, epg.MEMORY_DIM))
        xi = x._replace(log_prob=nets.log_prob(out, action, False),
                        entropy=nets.entropy(out, False), value=value.reshape((4, 16)),
                        memory=mem)
        return jnp.mean(rule.apply({}, xi))

    grads = jax.grad(agent_loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.asarray(g) == 0.0), jax.tree_util.keystr(path)
    report = epg.check(rule, {}, "null_epg")
    assert report.passed, report.format()
    assert not report.get("gradients_flow").passed
    assert "(reported, not required)" in report.get("gradients_flow").detail


@pytest.mark.parametrize("name", ["reinforce", "epg", "null_epg"])
def test_reference_rules_pass_the_check(name):
    ref = harness.reference_rule(name)
    report = epg.check(ref.rule, ref.meta_params, name)
    assert report.passed, report.format()
    assert report.get("gradients_flow").passed == (name != "null_epg")


def test_the_scored_epg_rule_is_the_learned_loss_without_guidance():
    """What is scored is the learned loss alone: the reference rule's (shipped)
    meta-parameters are the loss network's, with no guidance weight in them."""
    ref = harness.reference_rule("epg")
    init = epg.epg().init(jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(ref.meta_params) == jax.tree_util.tree_structure(init)
    assert not any("guidance" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_leaves_with_path(ref.meta_params))


def test_push_keeps_the_most_recent_steps_oldest_first():
    """Hand-checked: a buffer of H = 4 older steps after rollouts of T = 3 (and T > H)."""
    def steps(rewards, valid=None):
        r = jnp.asarray(rewards, jnp.float32)
        v = jnp.ones_like(r) if valid is None else jnp.asarray(valid, jnp.float32)
        return epg.Steps(r[..., None], r.astype(jnp.int32), r, r, r > 0, r[..., None], v)

    buf = steps([[0, 0, 0, 0], [0, 0, 0, 0]], valid=[[0, 0, 0, 0], [0, 0, 0, 0]])
    buf = epg.push(buf, steps([[1, 2, 3], [11, 12, 13]]))
    np.testing.assert_array_equal(np.asarray(buf.reward), [[0, 1, 2, 3], [0, 11, 12, 13]])
    np.testing.assert_array_equal(np.asarray(buf.valid), [[0, 1, 1, 1], [0, 1, 1, 1]])
    buf = epg.push(buf, steps([[4, 5, 6], [14, 15, 16]]))
    np.testing.assert_array_equal(np.asarray(buf.reward), [[3, 4, 5, 6], [13, 14, 15, 16]])
    np.testing.assert_array_equal(np.asarray(buf.obs[..., 0]), np.asarray(buf.reward))
    assert np.all(np.asarray(buf.valid) == 1)
    buf = epg.push(buf, steps([[7, 8, 9, 10, 11], [17, 18, 19, 20, 21]]))
    np.testing.assert_array_equal(np.asarray(buf.reward), [[8, 9, 10, 11], [18, 19, 20, 21]])
    # H = 0 (buffer_len == rollout_len): nothing is kept.
    empty = jax.tree_util.tree_map(lambda a: a[:, :0], buf)
    assert epg.push(empty, steps([[1, 2, 3], [4, 5, 6]])).reward.shape == (2, 0)


class Counter:
    """A gymnax-like env whose reward is the step count (1, 2, 3, ...): a reward names the
    step it was earned at. Episodes are cut every 5 steps (a time limit; the count goes on).
    Observations are the count too, so that V(s) differs between steps."""

    default_params = None

    def reset(self, key, params):
        return jnp.zeros(1), jnp.int32(0)

    def step(self, key, state, action, params):
        t = state + 1
        obs = t.astype(jnp.float32)[None] / 10.0
        return (obs, t, t.astype(jnp.float32), jnp.bool_(False), t % 5 == 0,
                {"final_observation": obs})

    def action_space(self, params):
        return types.SimpleNamespace(n=2)

    def observation_space(self, params):
        return types.SimpleNamespace(shape=(1,))


def test_the_loss_sees_exactly_the_n_most_recent_steps_across_updates():
    """Rollouts of T = 3 steps, a buffer of N = 7: at update k the loss sees the rewards of
    steps 3k - 3 .. 3k + 3, the padding flagged invalid until 4 older steps exist, episode
    ends where they happened, and the older steps' V(s) and log pi re-evaluated with the
    parameters of this update (not the stale ones of the update that collected them)."""
    from metabench import nets

    seen = []

    def spy(meta_params, x):
        jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]), x.reward,
                           x.history.reward, x.history.valid, x.history.done,
                           x.history.value, x.history.log_prob)
        return epg.reinforce().apply({}, x) + 0.0 * jnp.sum(x.history.value)

    cfg = epg.Config(num_envs=2, rollout_len=3, buffer_len=7, hidden=(8,), lr=0.05)
    trainer = epg.make_train(Counter(), cfg, UpdateRule(no_params, spy), total_timesteps=24)
    step = jax.jit(trainer.step)
    state = trainer.init(jax.random.PRNGKey(0))
    assert state.buffer.reward.shape == (2, 4) and not np.any(np.asarray(state.buffer.valid))
    net = nets.ActorCritic(action_dim=2, hidden=(8,))
    expected_history = [[0, 0, 0, 0], [0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    for k in range(4):
        before = state
        state, _ = step(state, {}, k)
        jax.block_until_ready(state)
        new_r, old_r, old_valid, old_done, old_v, old_lp = seen[-1]
        np.testing.assert_array_equal(new_r, [[3 * k + 1, 3 * k + 2, 3 * k + 3]] * 2)
        np.testing.assert_array_equal(old_r, [expected_history[k]] * 2)
        np.testing.assert_array_equal(old_valid, (np.asarray([expected_history[k]] * 2) > 0))
        np.testing.assert_array_equal(old_done, (old_r % 5 == 0) & (old_r > 0))
        # The state now holds the last 4 of the 7 steps just seen, for the next update.
        np.testing.assert_array_equal(np.asarray(state.buffer.reward),
                                      [expected_history[(k + 1)]] * 2 if k < 3 else
                                      [[9, 10, 11, 12]] * 2)
        # Re-evaluated with this update's parameters (valid steps; padding reads 0). The
        # loss gets the envs in the epoch's random order: match its rows to the buffer's.
        out, v = net.apply(before.params["net"], before.buffer.obs.reshape((8, 1)))
        lp = nets.log_prob(out.reshape((2, 4, 2)), before.buffer.action, False)
        ok = np.asarray(before.buffer.valid) > 0
        want_v = np.where(ok, np.asarray(v).reshape((2, 4)), 0.0)
        want_lp = np.where(ok, np.asarray(lp), 0.0)
        order = [0, 1] if np.allclose(old_lp[0], want_lp[0], atol=1e-6) else [1, 0]
        np.testing.assert_allclose(old_v, want_v[order], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(old_lp, want_lp[order], rtol=1e-5, atol=1e-6)
    assert len(seen) == 4
    # The agent learned in between (its network; REINFORCE leaves the memory unit alone),
    # so stale values would have differed.
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(state.params["net"]),
        jax.tree_util.tree_leaves(before.params["net"])))


def test_the_loss_cannot_see_observations_or_actions():
    """The contract has no observation or action: on envs with other observation shapes and
    action spaces (discrete 2 or 3 actions, continuous), the loss is handed the same fields
    of the same shapes. (Traced only, not compiled.)"""
    from metabench import envs

    assert set(epg.Inputs._fields) == {"reward", "done", "log_prob", "entropy", "value",
                                       "memory", "bootstrap", "history"}
    assert set(epg.History._fields) == {"reward", "done", "log_prob", "entropy", "value",
                                        "bootstrap", "valid"}
    shapes = {}

    def spy(meta_params, x):
        shapes[name] = jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), x)
        return epg.reinforce().apply({}, x)

    cfg = epg.Config(num_envs=2, rollout_len=4, buffer_len=12, hidden=(8,))
    for name in ("gymnax/CartPole-v1", "gymnax/Acrobot-v1", "gymnax/Pendulum-v1", "counter"):
        env = Counter() if name == "counter" else envs.make(name)[0]
        trainer = epg.make_train(env, cfg, UpdateRule(no_params, spy), total_timesteps=8)
        state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
        jax.eval_shape(trainer.step, state, {}, 0)
    first = shapes["gymnax/CartPole-v1"]
    assert first.reward == ((2, 4), "float32") and first.history.reward == ((2, 8), "float32")
    assert first.memory == ((2, 4, epg.MEMORY_DIM), "float32")
    for name, s in shapes.items():
        assert s == first, name


def test_check_fails_clearly_for_bad_rules():
    def mean_only(p, x):
        return jnp.mean(x.log_prob, axis=1)

    def nan(p, x):
        return x.log_prob * jnp.nan

    def boom(p, x):
        raise RuntimeError("boom")

    def entropy_only(p, x):
        return -x.entropy

    shape = epg.check(UpdateRule(no_params, mean_only), {}, "mean_only")
    assert not shape.passed and not shape.get("output_shape").passed
    assert "expected a per-step loss of shape (4, 16), got (4,)" in shape.format()
    bad = epg.check(UpdateRule(no_params, nan), {}, "nan")
    assert not bad.passed and not bad.get("finite").passed
    assert not bad.get("finite_gradients").passed
    crash = epg.check(UpdateRule(no_params, boom), {}, "boom")
    assert not crash.passed and "boom" in crash.get("runs").detail
    # A loss with no gradient on log pi is still a loss: reported, not refused.
    ent = epg.check(UpdateRule(no_params, entropy_only), {}, "entropy_only")
    assert ent.passed and not ent.get("gradients_flow").passed


def test_config_validation():
    with pytest.raises(ValueError, match="must divide num_envs"):
        epg.Config(num_envs=6, minibatches=4)
    with pytest.raises(ValueError, match="network"):
        epg.Config(network="transformer")
    with pytest.raises(ValueError, match="lr must be positive"):
        epg.Config(lr=0.0)
    with pytest.raises(ValueError, match="buffer_len .* must be at least rollout_len"):
        epg.Config(rollout_len=32, buffer_len=16)


def test_continuous_actions_and_minibatches_over_envs_train_end_to_end():
    """The buffer with Gaussian actions, two epochs and minibatches over envs, under the
    guided loss (the learned loss reads the history, REINFORCE the newest rollout)."""
    from metabench import envs

    env, _ = envs.make("gymnax/Pendulum-v1")
    cfg = epg.Config(num_envs=4, rollout_len=32, buffer_len=80, epochs=2, minibatches=2)
    rule = epg.guided(epg.epg())
    mp = {"loss": epg.epg().init(jax.random.PRNGKey(0)), "guidance": jnp.float32(0.5)}
    trainer = epg.make_train(env, cfg, rule, total_timesteps=4 * 32 * 7)
    metrics = jax.jit(trainer.train)(jax.random.PRNGKey(0), mp)
    assert metrics.loss.shape == (7,) and np.all(np.isfinite(np.asarray(metrics.loss)))
    # Pendulum truncates at 200 steps: 224 steps in each of 4 envs completes 4 episodes.
    assert int(np.asarray(metrics.episodes).sum()) == 4
    assert np.all(np.asarray(metrics.returns_sum) <= 0)  # Pendulum's rewards are costs


def test_reinforce_learns_cartpole(tmp_path):
    task = spec.load(write_task(tmp_path, TASK, "epg-cartpole"))
    run = harness.train_env(harness.reference_rule("reinforce"), task, task.test[0], [0, 1])
    finals = [r["final_return"] for r in harness.run_records(run, 0.05)]
    assert run.failure is None and min(finals) > 100, finals  # random: about 22


TINY = """
id: epg-tiny
description: a tiny CartPole task for ES on EPG's loss
total_timesteps: 8192
seed: 0
""" + CARTPOLE_SPLITS + """agents:
  epg: {num_envs: 8, rollout_len: 32, buffer_len: 64}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {epg: reinforce}}
"""


def test_discover_epg_writes_a_submission_the_checks_accept(tmp_path, capsys):
    import json

    path = write_task(tmp_path, TINY, "epg-tiny")
    out = tmp_path / "run"
    assert main(["discover", "epg", "--task", str(path), "--population", "4", "--seeds", "2",
                 "--generations", "2", "--sigma", "0.1", "--out", str(out)]) == 0
    curve = [json.loads(line) for line in (out / "curve.jsonl").open()]
    assert [c["generation"] for c in curve] == [1, 2]
    assert all(np.isfinite(c["fitness_mean"]) for c in curve)
    # Guidance annealed over an eighth of the generations (at least one): the first
    # generation trains with REINFORCE alone, which learns a little, every candidate alike
    # (common random numbers); the second with the learned losses alone.
    assert [c["guidance"] for c in curve] == [1.0, 0.0]
    # REINFORCE alone measured 0.18 here (return ~110); a rule that learns nothing scores
    # about 0.001 +- 0.004 (random CartPole is 22.3 against the 22.0 it is normalised by).
    assert curve[0]["fitness_max"] > 0.09
    assert curve[0]["fitness_max"] == curve[0]["fitness_min"]
    assert curve[-1]["env_steps"] == 2 * 4 * 2 * 8192
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["guidance_generations"] == 1

    folder = out / "submission"
    sub = submissions.load(folder)
    assert sub.family == "epg" and sub.factory == "epg" and sub.params_file == "params.npz"
    assert sub.disclosure.task == "epg-tiny" and sub.disclosure.env_steps == 2 * 4 * 2 * 8192
    capsys.readouterr()
    assert main(["check", str(folder)]) == 0
    assert "conformance: passed" in capsys.readouterr().out
    assert "annealed linearly from weight 1 to 0 over the first 1" in \
        sub.disclosure.notes
    # The search moved the loss away from its initialisation; what is written is the learned
    # loss alone (no guidance weight), as scored.
    init = epg.epg().init(jax.random.PRNGKey(0))
    found = params_io.load_params(folder / "params.npz")
    assert jax.tree_util.tree_structure(found) == jax.tree_util.tree_structure(init)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(found)))
    assert diff > 0


def test_the_loss_bootstraps_truncations_from_the_final_observation_across_the_buffer():
    """Inside the trainer, with gymnax's flags (a terminal limit step is also `truncated`):
    the loss sees `done` at every episode end, a bootstrap of V(final observation) at the
    time-limit cut (not V of the reset observation), 0 at the termination, and V(next
    observation) at the rollout's last step; a rollout that moved into the buffer keeps the
    same flags, its bootstraps re-evaluated with the agent's newer parameters."""
    from tests.test_rl import EpisodesEnv

    seen = []
    base = epg.reinforce(gamma=0.9)

    def apply(meta_params, x):
        jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]), x.done,
                           x.bootstrap, x.history.done, x.history.bootstrap, x.history.valid)
        return base.apply(meta_params, x)

    rule = UpdateRule(base.init, apply)
    cfg = epg.Config(num_envs=2, rollout_len=8, buffer_len=16, hidden=(8,))
    trainer = epg.make_train(EpisodesEnv(both_flags=True), cfg, rule, total_timesteps=32)
    state = trainer.init(jax.random.PRNGKey(0))
    step = jax.jit(trainer.step)
    params = [state.params]
    for i in range(2):
        state, _ = step(state, rule.init(None), i)
        params.append(state.params)
    assert len(seen) == 2
    obs, final, _, want_term, want_trunc = EpisodesEnv.expected(16)
    want_done = (want_term | want_trunc).astype(np.float32)
    net = nets.ActorCritic(action_dim=2, hidden=(8,))

    def value(p, o):
        return np.asarray(net.apply(p["net"], jnp.asarray(o), method=net.value))

    for u, (done, boot, h_done, h_boot, h_valid) in enumerate(seen):
        now = slice(8 * u, 8 * u + 8)
        v_final = value(params[u], final[now])
        want_boot = np.where(want_term[now], 0.0, v_final)
        for b in range(2):
            np.testing.assert_array_equal(done[b], want_done[now])
            np.testing.assert_allclose(boot[b], want_boot, rtol=1e-5, atol=1e-6)
        if u == 0:
            assert not h_valid.any()  # the buffer is empty before the first update
            # the cut at step 2 bootstraps from V(final), which differs from V(reset obs)
            assert abs(v_final[2] - value(params[0], obs[3:4])[0]) > 1e-3
            assert boot[0, 5] == 0.0 and boot[0, 2] != 0.0 and boot[0, 7] != 0.0
        else:
            older = np.where(want_term[:8], 0.0, value(params[1], final[:8]))
            assert h_valid.all()
            for b in range(2):
                np.testing.assert_array_equal(h_done[b], want_done[:8])
                np.testing.assert_allclose(h_boot[b], older, rtol=1e-5, atol=1e-6)
