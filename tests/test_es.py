"""ES discovery: OpenAI-ES on a toy fitness, EPG's guidance schedule, and ``metabench discover
lpo`` end to end."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import harness, params_io, submissions
from metabench.tasks import spec
from metabench.harness import train as harness_train
from metabench.cli import main
from metabench.discover import es as es_mod
from metabench.families import drift

from helpers import CARTPOLE_SPLITS, write_task

TASK = """
id: lpo-tiny
description: a tiny CartPole task for ES on LPO's drift
total_timesteps: 8192
seed: 0
""" + CARTPOLE_SPLITS + """agents:
  drift: {num_envs: 4, rollout_len: 64, epochs: 2, minibatches: 2}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {drift: ppo_clip}}
"""


def test_open_es_converges_on_a_toy_fitness(tmp_path):
    task = spec.load(write_task(tmp_path, TASK, "lpo-tiny"))
    target = {"w": jnp.array([0.5, -0.3, 0.2]), "b": jnp.array(0.4)}

    def fitness(pop):
        d = sum(jnp.sum((p - t) ** 2, axis=tuple(range(1, p.ndim)))
                for p, t in zip(jax.tree_util.tree_leaves(pop),
                                jax.tree_util.tree_leaves(target)))
        return -np.asarray(d), {}

    cfg = es_mod.ESConfig(generations=150, population=16, sigma_init=0.1, sigma_limit=0.02,
                          lr=0.02)
    init = {"w": jnp.zeros(3), "b": jnp.array(0.0)}
    res = es_mod.es_search(task, "drift", None, init, cfg, tmp_path / "toy", fitness=fitness,
                           log=lambda _: None)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree_util.tree_leaves(res.mean), jax.tree_util.tree_leaves(target)))
    assert err < 0.05, res.mean
    assert res.curve[-1]["fitness_mean"] > res.curve[0]["fitness_mean"]
    assert res.curve[-1]["sigma"] < res.curve[0]["sigma"]  # the scale decays


def test_es_config_errors():
    with pytest.raises(ValueError, match="population must be even"):
        es_mod.ESConfig(population=7)
    with pytest.raises(ValueError, match="sigma_init must be positive"):
        es_mod.ESConfig(sigma_init=0.0)


def _toy_fitness(calls: list, kill_at: int | None = None):
    """A smooth fitness (nearer 0.5 is better) that counts its calls and, on call
    ``kill_at``, raises KeyboardInterrupt as a Ctrl-C during a generation would."""

    def fitness(pop):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return -np.asarray(jnp.sum((pop["w"] - 0.5) ** 2, axis=1)), {}

    return fitness


def test_a_search_killed_between_checkpoints_resumes_with_each_generation_once(tmp_path):
    """Killed in generation 4 with checkpoints every 2, the rerun must resume from
    generation 2 (not restart: two generations of work, not five) and leave generations
    1..5 in curve.jsonl once each, equal to an uninterrupted search's. Appending after the
    checkpoint once gave [1, 2, 3, 3, 4, 5]."""
    task = spec.load(write_task(tmp_path, TASK, "lpo-tiny"))
    cfg = es_mod.ESConfig(generations=5, population=4, sigma_init=0.1, lr=0.05,
                          checkpoint_every=2)
    init = {"w": jnp.zeros(3)}
    straight = es_mod.es_search(task, "drift", None, init, cfg, tmp_path / "straight",
                                fitness=_toy_fitness([]), log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        es_mod.es_search(task, "drift", None, init, cfg, tmp_path / "killed",
                         fitness=_toy_fitness([], kill_at=4), log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "curve.jsonl").open()]
    assert [r["generation"] for r in rows] == [1, 2, 3]  # generation 3 is past the checkpoint
    calls, logged = [], []
    res = es_mod.es_search(task, "drift", None, init, cfg, tmp_path / "killed",
                           fitness=_toy_fitness(calls), log=logged.append)
    assert "resuming from generation 2" in logged[0] and len(calls) == 3
    rows = [json.loads(line) for line in (tmp_path / "killed" / "curve.jsonl").open()]
    assert [r["generation"] for r in rows] == [1, 2, 3, 4, 5]
    key = lambda r: (r["generation"], r["fitness_mean"], r["fitness_max"], r["sigma"])  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in straight.curve]
    assert [key(r) for r in res.curve] == [key(r) for r in straight.curve]
    np.testing.assert_array_equal(res.mean["w"], straight.mean["w"])


def test_a_nan_candidate_scores_the_floor(tmp_path):
    """A candidate whose fitness is NaN (or -inf) scores the floor, 0, in the curve and in
    the ES update: the run equals one whose fitness returns 0 for it. Fitness here is
    negative elsewhere, so the floor ranks such a candidate first: an unfloored NaN would
    rank it last (and make the curve's mean NaN)."""
    task = spec.load(write_task(tmp_path, TASK, "lpo-tiny"))
    raw = []

    def fitness(bad):
        def f(pop):
            out = -np.asarray(jnp.sum((pop["w"] - 0.5) ** 2, axis=1), np.float64)
            raw.append(out.copy())
            out[1], out[2] = bad
            return out, {}
        return f

    cfg = es_mod.ESConfig(generations=4, population=6, sigma_init=0.1, lr=0.05)
    init = {"w": jnp.zeros(3)}
    res = es_mod.es_search(task, "drift", None, init, cfg, tmp_path / "nan",
                           fitness=fitness((np.nan, -np.inf)), log=lambda _: None)
    floored = [r.copy() for r in raw]
    ref = es_mod.es_search(task, "drift", None, init, cfg, tmp_path / "zero",
                           fitness=fitness((0.0, 0.0)), log=lambda _: None)
    assert np.all(np.isfinite(np.asarray(res.mean["w"])))
    np.testing.assert_array_equal(res.mean["w"], ref.mean["w"])
    for row, f in zip(res.curve, floored):
        f[1] = f[2] = 0.0
        assert row["fitness_max"] == 0.0 and row["fitness_min"] == pytest.approx(f.min())
        assert row["fitness_mean"] == pytest.approx(f.mean(), rel=1e-12)
    assert [r["fitness_mean"] for r in res.curve] == [r["fitness_mean"] for r in ref.curve]


@pytest.fixture(scope="module")
def lpo_runs(tmp_path_factory):
    """Two generations straight, and one generation then a rerun to two that must resume
    (its log, and one generation of training calls)."""
    tmp = tmp_path_factory.mktemp("lpo")
    path = write_task(tmp, TASK, "lpo-tiny")
    args = ["discover", "lpo", "--task", str(path), "--population", "4", "--seeds", "2",
            "--sigma", "0.1"]
    before = len(harness_train._CACHE)
    assert main(args + ["--generations", "2", "--out", str(tmp / "full")]) == 0
    compiled = len(harness_train._CACHE) - before
    assert main(args + ["--generations", "1", "--out", str(tmp / "resumed")]) == 0
    calls = []
    train = harness.train_population
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setattr(harness, "train_population",
                   lambda *a, **k: calls.append(1) or train(*a, **k))
        assert main(args + ["--generations", "2", "--out", str(tmp / "resumed")]) == 0
    return tmp, compiled, out.getvalue(), len(calls)


def test_discover_lpo_trains_the_population_in_one_compiled_call(lpo_runs):
    tmp, compiled, _, _ = lpo_runs
    # One cached compiled training function (population x seeds) served all generations.
    assert compiled == 1
    curve = [json.loads(line) for line in (tmp / "full" / "curve.jsonl").open()]
    assert [c["generation"] for c in curve] == [1, 2]
    assert all(np.isfinite(c["fitness_mean"]) for c in curve)
    # Learning is shown by test_es_improves_an_rl_fitness against a non-learning control:
    # here, with sigma 0.1 on LPO's drift network, generation 1 measured 0.0002 (max 0.0010),
    # no better than that control (-0.0011), so no learning is claimed.
    assert curve[-1]["env_steps"] == 2 * 4 * 2 * 8192
    # No policy-gradient guidance outside EPG: the curve and config are as they were.
    assert "guidance" not in curve[0]
    summary = json.loads((tmp / "full" / "summary.json").read_text())
    assert "guidance_generations" not in summary["config"]


def test_discover_lpo_resumes_to_identical_results(lpo_runs):
    tmp, _, log, calls = lpo_runs
    # The rerun resumed (a restart would give the same numbers): it said so, and trained one
    # generation (one train env: one population call), not two.
    assert "resuming from generation 1" in log and calls == 1
    a = np.load(tmp / "full" / "submission" / "params.npz")
    b = np.load(tmp / "resumed" / "submission" / "params.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    full = [json.loads(line) for line in (tmp / "full" / "curve.jsonl").open()]
    resumed = [json.loads(line) for line in (tmp / "resumed" / "curve.jsonl").open()]
    assert [c["fitness_mean"] for c in full] == [c["fitness_mean"] for c in resumed]


def test_discover_lpo_writes_a_submission_the_checks_accept(lpo_runs):
    tmp, *_ = lpo_runs
    folder = tmp / "full" / "submission"
    sub = submissions.load(folder)
    assert sub.family == "drift" and sub.factory == "lpo" and sub.params_file == "params.npz"
    assert sub.disclosure.task == "lpo-tiny" and sub.disclosure.env_steps == 2 * 4 * 2 * 8192
    result = submissions.check(folder)
    assert result.ok, result.message
    # The parameters moved away from the PPO-clip initialisation.
    init = drift.lpo().init(jax.random.PRNGKey(0))
    moved = params_io.load_params(folder / "params.npz")
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
               zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(moved)))
    assert diff > 0


def test_es_improves_an_rl_fitness(tmp_path):
    """The whole loop on a real RL fitness (fresh PPO agents on CartPole, population x seeds
    in one call): from a drift that cancels the policy objective (``w = 1``: nothing is
    learned), ES moves ``w`` towards PPO-clip (``w = 0``) and the fitness rises above that
    non-learning control's, measured on the same seeds by the same compiled call."""
    task = spec.load(write_task(tmp_path, TASK, "lpo-tiny"))
    ppo = drift.ppo_clip()
    rule = drift.UpdateRule(lambda _: {"w": jnp.array(1.0)},
                            lambda mp, x: ppo.apply({}, x) + mp["w"] * x.ratio * x.advantage)
    cfg = es_mod.ESConfig(generations=4, population=4, seeds=2, sigma_init=0.3,
                          sigma_limit=0.1, lr=0.25)
    fit = es_mod.TrainFitness(task, "drift", rule, cfg)
    control = float(np.mean(fit({"w": jnp.ones(4)})[0]))  # measured -0.0011
    res = es_mod.es_search(task, "drift", rule, rule.init(None), cfg, tmp_path / "w",
                           fitness=fit, log=lambda _: None)
    first, last = res.curve[0], res.curve[-1]
    # Measured: w 1 -> 0.004, fitness mean 0.0047 -> 0.0212.
    assert float(res.mean["w"]) < 0.6, res.mean
    assert last["fitness_mean"] > control + 0.01, (control, last)
    assert last["fitness_mean"] > first["fitness_mean"] + 0.008, (first, last)


def test_guidance_weight_anneals_linearly_to_zero_and_stays_there():
    """EPG's schedule (the paper's code: ``PiecewiseSchedule([(0, 1.), (int(outer_n_epoch /
    8), 0.)], outside_value=0.)``): 1 at the first generation, 0 from generation ``anneal``
    on; an eighth of the search by default."""
    assert [es_mod.guidance_weight(g, 4) for g in range(7)] == [1.0, 0.75, 0.5, 0.25, 0.0,
                                                              0.0, 0.0]
    assert es_mod.guidance_weight(0, 0) == 0.0
    assert es_mod.default_guidance_generations(80) == 10
    assert es_mod.default_guidance_generations(3) == 1


def test_a_guided_search_anneals_the_weight_and_perturbs_only_the_loss(tmp_path):
    """Each generation's candidates get one guidance weight from the schedule as a
    meta-parameter leaf; ES moves the loss's parameters only, and the curve and config
    record the schedule. (A toy fitness: no training.)"""
    task = spec.load(write_task(tmp_path, TASK, "lpo-tiny"))
    seen = []

    def fitness(batch):
        seen.append(batch)
        w = batch["loss"]["w"]
        return -np.asarray(jnp.sum((w - 0.5) ** 2, axis=1)), {}

    cfg = es_mod.ESConfig(generations=5, population=4, sigma_init=0.1, lr=0.05)
    res = es_mod.es_search(task, "epg", None, {"w": jnp.zeros(3)}, cfg, tmp_path / "g",
                           fitness=fitness, log=lambda _: None, guidance_generations=2)
    alphas = [np.asarray(b["guidance"]) for b in seen]
    assert [a.shape for a in alphas] == [(4,)] * 5
    assert [float(a[0]) for a in alphas] == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert all(np.all(a == a[0]) for a in alphas)
    assert [c["guidance"] for c in res.curve] == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert np.unique(np.asarray(seen[0]["loss"]["w"]), axis=0).shape[0] == 4
    assert set(res.mean) == {"w"}  # the search's result is the loss alone
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["config"]["guidance_generations"] == 2


def test_a_checkpoint_is_resumed_only_by_the_run_it_belongs_to(tmp_path):
    """discover's shared checkpoint: the same config (its length aside) and task version
    resume it; another config, another task version or a shorter run ignore it, and say so."""
    from metabench.discover.common import Checkpoint

    config = {"lr": 0.1, "generations": 5}
    state = {"w": jnp.arange(3.0), "k": jnp.ones((2, 2))}
    Checkpoint(tmp_path, config, "fp1", "generation", "generations", "generation").save(
        state, 3, curve=[{"generation": 1}], wall_s=1.5)
    like = jax.tree_util.tree_map(jnp.zeros_like, state)

    def resume(cfg, fp, length):
        logged = []
        found = Checkpoint(tmp_path, cfg, fp, "generation", "generations",
                           "generation").resume(like, length, logged.append)
        return found, logged

    (got, meta), logged = resume(dict(config, generations=9), "fp1", 9)  # extended: resumes
    assert logged == [f"resuming from generation 3 ({tmp_path / 'checkpoint.json'})"]
    assert meta["generation"] == 3 and meta["wall_s"] == 1.5 and meta["curve"] == [
        {"generation": 1}]
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    for cfg, fp, length in ((dict(config, lr=0.2), "fp1", 5),  # another config
                            (config, "fp2", 5),                 # another task version
                            (dict(config, generations=2), "fp1", 2)):  # shorter than done
        found, logged = resume(cfg, fp, length)
        assert found is None and logged[0].startswith("ignoring ")
