"""The harness: learning on CartPole, failure records, budgets, determinism, no deadlock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import harness, scoring
from metabench.tasks import spec
from metabench.harness import train as harness_train
from metabench.families import base as families_base
from metabench.rules import UpdateRule, no_params

from helpers import CARTPOLE_SPLITS, TINY_TASK, write_task

CARTPOLE_PUREJAXRL = """
id: cartpole
total_timesteps: 1e5
""" + CARTPOLE_SPLITS + """agents:
  drift: {num_envs: 4, rollout_len: 128, epochs: 4, minibatches: 4, lr: 2.5e-4}
budget: {seeds: 4, max_seconds_per_env: 1800}
scoring: {baselines: {drift: ppo_clip}}
"""


# Two families, so a task's whole-spec fingerprint differs from the drift family's one (with
# a single family they are equal and a record carrying the wrong one would pass unseen).
TWO_FAMILY_TINY = TINY_TASK.replace("agents:\n", "agents:\n  td_loss: {{}}\n").replace(
    "{{drift: ppo_clip}}", "{{drift: ppo_clip, td_loss: dqn}}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return spec.load(write_task(tmp_path_factory.mktemp("t"), TWO_FAMILY_TINY.format(steps=4096)))


def test_ppo_clip_learns_cartpole_with_purejaxrl_settings(tmp_path):
    task = spec.load(write_task(tmp_path, CARTPOLE_PUREJAXRL, "cartpole"))
    run = harness.train_env(harness.reference_rule("ppo_clip"), task, task.test[0], range(2))
    assert run.failure is None and run.updates_done == 195  # 1e5 // (4 envs x 128 steps)
    finals = [r["final_return"] for r in harness.run_records(run, 0.05)]
    # A uniform random policy scores ~22; PureJaxRL's PPO reaches ~500 at 5e5 steps and
    # 270-290 at 1e5 (README, 4 seeds): 150 is 7x random with room for seed noise.
    assert np.mean(finals) >= 150, finals


def test_record_has_scores_curves_and_provenance(tiny):
    rec = harness.evaluate(harness.reference_rule("dpo"), tiny, "test", command="test")
    assert rec["status"] == "ok"
    assert rec["task"]["fingerprint"] == tiny.fingerprint("drift") != tiny.fingerprint()
    assert [e["name"] for e in rec["envs"]] == ["CartPole-v1", "CartPole-long-pole"]
    assert len(rec["runs"]) == 4 and {r["seed"] for r in rec["runs"]} == {0, 1}
    for r in rec["runs"]:
        assert r["score"] == pytest.approx((r["final_return"] - 22.0) / (500.0 - 22.0))
        assert len(r["curve"]["steps"]) == len(r["curve"]["returns"]) == 32
        assert r["curve"]["steps"][-1] == 4096
    scores = np.array([[r["score"] for r in rec["runs"] if r["env"] == e] for e in
                       ("CartPole-v1", "CartPole-long-pole")]).T
    assert rec["aggregates"]["mean"]["point"] == pytest.approx(scores.mean())
    a = rec["aggregates"]["iqm"]
    assert a["lo"] <= a["point"] <= a["hi"]
    e = rec["envs"][0]
    assert e["compile_s"] > 0 and e["run_s"] > 0 and e["env_steps_per_s"] > 0
    assert rec["provenance"]["device"]["platform"] == jax.devices()[0].platform
    assert rec["provenance"]["libraries"]["jax"] == jax.__version__
    assert rec["rule"]["family"] == "drift" and len(rec["rule"]["params_hash"]) == 64


def test_same_evaluation_twice_is_identical_and_poi_vs_itself_is_half(tiny):
    a = harness.evaluate(harness.reference_rule("ppo_clip"), tiny, "test")
    b = harness.evaluate(harness.reference_rule("ppo_clip"), tiny, "test", baseline=a)
    assert a["runs"] == b["runs"] and a["aggregates"] == b["aggregates"]
    assert b["probability_of_improvement"]["point"] == pytest.approx(0.5)
    assert b["probability_of_improvement"]["baseline"] == "ppo_clip"


def test_seed_results_do_not_depend_on_other_seeds(tiny):
    ref = harness.reference_rule("ppo_clip")
    both = harness.train_env(ref, tiny, tiny.test[0], [0, 1])
    one = harness.train_env(ref, tiny, tiny.test[0], [1])
    np.testing.assert_allclose(both.returns_sum[1], one.returns_sum[0], rtol=1e-5)


def _ref(name, apply):
    return harness.RuleRef(name, "drift", UpdateRule(no_params, apply), {})


def test_nan_rule_becomes_failed_runs_scored_at_the_floor(tiny):
    rec = harness.evaluate(_ref("nan", lambda p, x: x.ratio * jnp.nan), tiny, "test")
    assert rec["status"] == "failed"
    assert all(r["status"] == "failed" and "non-finite loss" in r["reason"] for r in rec["runs"])
    assert rec["aggregates"]["mean"]["point"] == scoring.SCORE_FLOOR == -1.0


def test_a_failed_seed_scores_the_floor_in_the_aggregates_and_env_means(tiny):
    """One of four seeds fails on env 0 and one completed run trained far below random: the
    failure counts as -1 (never dropped) and the completed run is clipped to -1."""
    def run(seed, score):
        ok = score is not None
        return {"env": None, "seed": seed, "status": "ok" if ok else "failed",
                "reason": None if ok else "non-finite loss at update 3",
                "final_return": 22.0 + 478.0 * score if ok else None, "score": score,
                "curve": {"steps": [], "returns": []}}

    parts = []
    for name, scores in (("CartPole-v1", [0.8, 0.6, 0.4, None]),
                         ("CartPole-long-pole", [0.5, -2.5, 0.7, 0.9])):
        runs = [dict(run(s, x), env=name) for s, x in enumerate(scores)]
        parts.append({"env": {"name": name}, "runs": runs})
    rec = harness.assemble(harness.rule_block(harness.reference_rule("ppo_clip")), tiny, "test",
                           parts, provenance_={"hand": "made"})
    assert rec["status"] == "partial" and rec["task"]["seeds"] == [0, 1, 2, 3]
    # Floored cells: [0.8, 0.6, 0.4, -1] and [0.5, -1, 0.7, 0.9]. Dropping the failure would
    # give a mean of 2.9/7 = 0.414; imputing 0 gives 0.3625 (0.2375 + 1/8).
    assert rec["aggregates"]["mean"]["point"] == pytest.approx(1.9 / 8)
    # IQM: sorted -1, -1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, the middle four average 0.55.
    assert rec["aggregates"]["iqm"]["point"] == pytest.approx(0.55)
    assert [e["mean_score"] for e in rec["envs"]] == pytest.approx([0.2, 0.275])
    assert [e["mean_return"] for e in rec["envs"]] == pytest.approx(
        [22.0 + 478.0 * 0.6, 22.0 + 478.0 * -0.1])  # returns are not floored


def test_raising_rule_becomes_failed_record_not_a_crash(tiny):
    def boom(p, x):
        raise ValueError("this drift is broken")

    rec = harness.evaluate(_ref("boom", boom), tiny, "test")
    assert rec["status"] == "failed"
    assert all("this drift is broken" in r["reason"] for r in rec["runs"])
    # Discovery tells a call that never compiled (stop the search) from one that failed in
    # training (that candidate scores the floor) by a field, not by the message.
    run = harness.train_env(_ref("boom", boom), tiny, tiny.test[0], [0])
    assert run.failed_to_compile and "this drift is broken" in run.failure
    nan = harness.train_env(_ref("nan", lambda p, x: x.ratio * jnp.nan), tiny, tiny.test[0], [0])
    assert harness.run_records(nan, 0.05)[0]["status"] == "failed"
    assert not nan.failed_to_compile


def test_wall_clock_budget_is_enforced_between_chunks(tiny, monkeypatch):
    monkeypatch.setattr(harness_train, "MIN_CHUNK_ENV_STEPS", 1)  # several chunks even this tiny
    run = harness.train_env(harness.reference_rule("ppo_clip"), tiny, tiny.test[0], [0],
                            max_seconds=0.0)
    assert run.updates_done < run.num_updates
    assert "wall-clock budget" in run.failure
    recs = harness.run_records(run, 0.05)
    assert recs[0]["status"] == "failed" and recs[0]["score"] is None


def test_progress_is_reported_every_few_seconds(tiny, monkeypatch):
    ref = harness.reference_rule("ppo_clip")
    monkeypatch.setattr(harness_train, "MIN_CHUNK_ENV_STEPS", 1)
    for seconds, calls in ((0.0, 32), (1e9, 2)):
        # 32 updates run as 32 one-update chunks; the harness looks at the run after the first
        # (to time it) and then every CHUNK_SECONDS: after each chunk when that is 0, once
        # more at the end when it is huge.
        monkeypatch.setattr(harness_train, "CHUNK_SECONDS", seconds)
        seen = []
        run = harness.train_env(ref, tiny, tiny.test[0], [0], progress=lambda *a: seen.append(a))
        assert len(seen) == calls and seen[-1][1] == seen[-1][2] == 32
        assert [s[1] for s in seen] == sorted(s[1] for s in seen)
        assert run.returns_sum.shape == (1, 32) and run.failure is None
        if seconds == 0.0:
            first = run.returns_sum
    # How often the harness looks does not change what is trained.
    np.testing.assert_array_equal(first, run.returns_sum)


def test_reference_rules_with_learned_parameters_run_the_shipped_ones():
    """``shipped_params`` falls back to ``rule.init`` (PPO-clip, REINFORCE, an untrained LPG)
    when the npz does not fit the rule; every test that scores these rules would pass
    either way, so the fallback must not be what ships."""
    from metabench.params_io import PARAMS_DIR, load_params

    for name in ("lpo", "epg", "lpg"):
        ref = harness.reference_rule(name)
        assert ref.note.startswith(f"meta-trained by `metabench discover {name}`"), ref.note
        shipped = load_params(PARAMS_DIR / f"{name}.npz")
        got, want = (jax.tree_util.tree_leaves(t) for t in (ref.meta_params, shipped))
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        init = jax.tree_util.tree_leaves(ref.rule.init(jax.random.PRNGKey(0)))
        assert any(not np.array_equal(a, b) for a, b in zip(got, init)), name


def test_chunk_lengths():
    assert harness_train._chunk_len(976) == 10  # about 1% of training per chunk
    assert harness_train._chunk_len(976, 10) == 98
    assert harness_train._chunk_len(10) == 1
    assert harness_train._chunk_len(1) == 1
    assert harness_train._chunk_len(976, min_len=100) == 100  # at least that many updates
    assert harness_train._chunk_len(32, min_len=512) == 32  # never longer than the run


EVERY_FAMILY = TINY_TASK.format(steps=2560).replace(
    "  drift: {num_envs: 4, rollout_len: 32, epochs: 2, minibatches: 2}\n",
    "  drift: {num_envs: 4, rollout_len: 32, epochs: 2, minibatches: 2}\n"
    "  td_loss: {num_envs: 8, buffer_size: 512, batch_size: 32, learning_starts: 64,\n"
    "            train_every: 2, target_update_period: 40, eps_decay_steps: 1000,\n"
    "            hidden: [16]}\n"
    "  metagrad: {num_envs: 8, rollout_len: 16, hidden: [16]}\n"
    "  epg: {num_envs: 8, rollout_len: 16, hidden: [16]}\n"
    "  lpg: {num_envs: 8, rollout_len: 16, hidden: [16]}\n").replace(
    "baselines: {drift: ppo_clip}",
    "baselines: {drift: ppo_clip, td_loss: dqn, metagrad: a2c_fixed, epg: reinforce, "
    "lpg: actor_critic}")


@pytest.mark.parametrize("family", ["drift", "td_loss", "metagrad", "epg", "lpg"])
def test_chunked_training_equals_one_scan_bit_for_bit(family, tmp_path, monkeypatch):
    """The harness cuts training into chunks of at most L updates, the last one shorter, all
    run by one compiled program (a loop whose trip count is an argument): per family, its
    metrics are bit-identical to one ``lax.scan`` over every update."""
    task = spec.load(write_task(tmp_path, EVERY_FAMILY))
    fam = families_base.get_family(family)
    ref = harness.reference_rule(fam.baseline)
    cfg = spec.agent_config(task, family, task.test[0])
    monkeypatch.setattr(harness_train, "_chunk_len", lambda n, *a, **k: 3)
    keys = harness.seed_keys(task.seed, [0, 1])
    trained = harness_train._train(fam, task.test[0], cfg, ref.rule, ref.meta_params, keys,
                                   task.total_timesteps, False, None, None)
    assert trained.failure is None and trained.num_updates % 3, trained  # a shorter last chunk
    trainer, init_fn, chunk_fn, _ = harness.compiled(fam, task.test[0], cfg, ref.rule,
                                                     ref.meta_params, task.total_timesteps)
    one_scan = jax.jit(jax.vmap(lambda s: jax.lax.scan(
        lambda c, i: trainer.step(c, ref.meta_params, i), s,
        jnp.arange(trainer.num_updates))[1]))
    want = jax.device_get(one_scan(init_fn(keys)))
    got = trained.metrics
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.shape == b.shape and a.shape[-1] == trainer.num_updates
        np.testing.assert_array_equal(a, b)


def _qr_operand_ranks(jaxpr) -> list[int]:
    ranks = []
    for eqn in jaxpr.eqns:
        if "qr" in eqn.primitive.name or "geqrf" in eqn.primitive.name:
            ranks.append(eqn.invars[0].aval.ndim)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    ranks.extend(_qr_operand_ranks(getattr(inner, "jaxpr", inner)))
    return ranks


def test_seed_batched_initialisation_never_batches_qr(tiny):
    # jax 0.10.2 on CPU deadlocked on a vmapped orthogonal initialiser (batched QR) over 8
    # seeds; the harness maps init over seeds, so every QR it emits is a single 2-D matrix.
    ref = harness.reference_rule("ppo_clip")
    fam = families_base.get_family("drift")
    cfg = spec.agent_config(tiny, "drift")
    _, init_fn, _, _ = harness.compiled(fam, tiny.test[0], cfg, ref.rule, {}, tiny.total_timesteps)
    jaxpr = jax.make_jaxpr(init_fn)(harness.seed_keys(0, range(8))).jaxpr
    ranks = _qr_operand_ranks(jaxpr)
    assert ranks and all(r == 2 for r in ranks), ranks


def test_eight_seed_initialisation_finishes(tiny_task_path):
    # The deadlock hung forever at 0% CPU; run it in a child with a time limit.
    code = textwrap.dedent(f"""
        import jax
        from metabench import harness
        from metabench.tasks import spec
        from metabench.families import base
        task = spec.load({str(tiny_task_path)!r})
        ref = harness.reference_rule("ppo_clip")
        _, init_fn, _, _ = harness.compiled(base.get_family("drift"), task.test[0],
                                         spec.agent_config(task, "drift"), ref.rule, {{}},
                                         task.total_timesteps)
        jax.block_until_ready(init_fn(harness.seed_keys(0, range(8))))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_nan_candidate_fails_alone_in_a_population(tiny):
    """Candidates train in separate vmapped lanes: one whose loss is NaN fails its own runs
    with the reason and leaves the other's untouched (what `submit --batch` relies on)."""
    ref = harness.reference_rule("lpo")
    bad = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), ref.meta_params)
    batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), ref.meta_params, bad)
    good_run, bad_run = harness.train_population("drift", ref.rule, batch, tiny, tiny.test[0],
                                                 [0, 1])
    good, nan = (harness.run_records(r, 0.05) for r in (good_run, bad_run))
    assert all(r["status"] == "ok" for r in good)
    assert all(r["status"] == "failed" and "non-finite loss at update 0" in r["reason"]
               for r in nan)
