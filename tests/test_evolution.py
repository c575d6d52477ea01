"""The graph interpreter, population training and ``metabench discover evolve``."""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench import harness, submissions
from metabench.tasks import spec
from metabench.cli import main
from metabench.discover import evolution
from metabench.discover.evolution import EvolveConfig, evolve
from metabench.discover.evolution import (Evaluation, TrainSplitFitness, _seed_scores,
                                         fitness_window, pad_graph)
from metabench.families import td_loss

from helpers import CARTPOLE_SPLITS, write_task

RULE = td_loss.interpreter_rule()
MAX = 14
APPLY = jax.jit(RULE.apply)
GRAD = jax.jit(jax.grad(lambda q, e, x: jnp.mean(RULE.apply(e, x._replace(q_tm1=q)))))

# A cheap td_loss task: DQN passes CartPole's hurdle within 4000 steps and learns in 8000.
CHEAP = """
id: cheap-td
description: a cheap CartPole task for searching losses
total_timesteps: 8000
seed: 0
""" + CARTPOLE_SPLITS + """agents:
  td_loss: {num_envs: 4, buffer_size: 5000, batch_size: 64, eps_decay_steps: 2000,
            learning_starts: 500, target_update_period: 200, train_every: 4, lr: 0.001,
            hidden: [64, 64]}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {td_loss: dqn}}
"""


def _graphs(n: int, seed: int = 0) -> list[td_loss.Graph]:
    rng = np.random.default_rng(seed)
    return list(td_loss.library().values()) + [td_loss.random_graph(rng, 10) for _ in range(n)]


def test_interpreter_equals_compiled_graphs_in_value_and_gradient():
    x = td_loss.random_inputs(jax.random.PRNGKey(3), 48, 4)
    for g in _graphs(40):
        enc = td_loss.encode(g, MAX)
        rule = td_loss.compile_graph(g)
        want = jax.jit(rule.apply)({}, x)
        np.testing.assert_allclose(APPLY(enc, x), want, rtol=2e-6, atol=1e-6,
                                   err_msg=td_loss.equation(g))
        want_g = jax.grad(lambda q: jnp.mean(rule.apply({}, x._replace(q_tm1=q))))(x.q_tm1)
        np.testing.assert_allclose(GRAD(x.q_tm1, enc, x), want_g, rtol=1e-5, atol=1e-7,
                                   err_msg=td_loss.equation(g))


def test_interpreter_vmaps_over_a_population_of_graphs():
    x = td_loss.random_inputs(jax.random.PRNGKey(4), 16, 3)
    gs = _graphs(5, seed=1)
    encs = [td_loss.encode(g, MAX) for g in gs]
    batch = td_loss.EncodedGraph(*(np.stack(a) for a in zip(*encs)))
    out = jax.vmap(RULE.apply, in_axes=(0, None))(batch, x)
    for g, o in zip(gs, out):
        np.testing.assert_allclose(o, td_loss.compile_graph(g).apply({}, x), rtol=2e-6,
                                   atol=1e-6)


def test_encode_rejects_graphs_larger_than_the_interpreter():
    g = td_loss.library()["dqn_clipped"]
    live = sum(not g.nodes[i].op.startswith("input:") for i in td_loss.live_nodes(g))
    with pytest.raises(td_loss.GraphError, match=f"{live} live nodes.*holds 3"):
        td_loss.encode(g, 3)


def test_pad_graph_keeps_the_function_and_reaches_the_size():
    rng = np.random.default_rng(0)
    for name, g in td_loss.library().items():
        padded = pad_graph(g, 16, rng)
        assert len(padded.nodes) == len(td_loss.INPUTS) + 16
        assert td_loss.functional_hash(padded) == td_loss.functional_hash(g)
        assert td_loss.equation(padded) == td_loss.equation(g)


def test_population_training_equals_single_rule_training(tmp_path):
    task = spec.load(write_task(tmp_path, CHEAP.replace("8000", "2000"), "cheap"))
    gs = [td_loss.library()["dqn"], td_loss.library()["dqn_reg"]]
    encs = [td_loss.encode(g, MAX) for g in gs]
    batch = td_loss.EncodedGraph(*(np.stack(a) for a in zip(*encs)))
    env = task.train[0]
    pop = harness.train_population("td_loss", RULE, batch, task, env, [0, 1])
    assert len(pop) == 2 and pop[0].updates_done == 500
    for g, run in zip(gs, pop):
        ref = harness.RuleRef(g.name, "td_loss", td_loss.compile_graph(g), {})
        single = harness.train_env(ref, task, env, [0, 1])
        # Same seeds, same rule: the same losses (to float tolerance: vmapping over
        # candidates may reorder reductions) and the same episodes.
        np.testing.assert_allclose(run.loss[:, :200], single.loss[:, :200], rtol=1e-3,
                                   atol=1e-5)
        # Learning starts at update 125 (500 env steps over 4 envs), so only the episodes
        # after it tell two rules apart: they are equal over the whole run.
        np.testing.assert_array_equal(run.episodes, single.episodes)
        assert [r["final_return"] for r in harness.run_records(run, 0.1)] == \
            [r["final_return"] for r in harness.run_records(single, 0.1)]


def _distance_fitness(target: td_loss.Graph):
    """A cheap, exact fitness: the correlation of a graph's outputs with ``target``'s on fixed
    inputs (1 when equal up to scale and shift). It exercises the search itself, not RL."""
    x = td_loss.random_inputs(jax.random.PRNGKey(0), 64, 4)
    want = np.asarray(td_loss.compile_graph(target).apply({}, x))
    calls: list[str] = []

    def fitness(gs):
        out = []
        for g in gs:
            calls.append(td_loss.functional_hash(g))
            got = np.asarray(td_loss.compile_graph(g).apply({}, x), np.float64)
            ok = np.all(np.isfinite(got)) and np.std(got) > 1e-9
            corr = float(np.corrcoef(got, want)[0, 1]) if ok else 0.0
            out.append(Evaluation(max(corr, 0.0), "trained", None, {}))
        return out

    return fitness, calls


def test_evolution_improves_the_best_score_and_never_retrains_a_hash(tmp_path):
    task = spec.load(write_task(tmp_path, CHEAP, "cheap"))
    fitness, calls = _distance_fitness(td_loss.library()["dqn_reg"])
    cfg = EvolveConfig(population=12, tournament=4, children=6, generations=25,
                       graph_nodes=10, bootstrap=None, seed=3)
    res = evolve(task, cfg, tmp_path / "run", evaluator=fitness, log=lambda _: None)
    curve = res.summary["curve"]
    assert len(curve) == 26 and curve[0]["generation"] == -1
    best = [c["best_fitness"] for c in curve]
    assert best[-1] > best[0] + 0.05, best  # the best climbs (0.40 -> 0.66 here)
    # The best alone climbs without selection too (it is a max over everyone ever made):
    # the population's mean is what selection raises. Measured: +0.22 here, +0.02 with a
    # random parent, -0.06 with the worst of the tournament.
    gain = curve[-1]["population_mean"] - curve[0]["population_mean"]
    assert gain > 0.15, [c["population_mean"] for c in curve]
    # The paper's first saving: a functional hash is evaluated at most once, and duplicates
    # (which mutation does produce) join with the cached fitness instead.
    assert len(calls) == len(set(calls))
    hist = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert len(hist) == 12 + 25 * 6 == res.summary["individuals"]
    cached = [h for h in hist if h["status"] == "cached"]
    assert cached and res.summary["cached"] == len(cached)
    by_id = {h["id"]: h for h in hist}
    for h in cached:
        assert by_id[h["cached_from"]]["hash"] == h["hash"]
        assert h["fitness"] == by_id[h["cached_from"]]["fitness"]
    assert len(calls) == len(hist) - len(cached)
    # Regularised evolution, child by child: the tournament is `tournament` distinct members
    # of the population the child was made from (the newest 12 individuals, the oldest
    # having left), and the parent is its fittest member.
    children = [h for h in hist if h["generation"] >= 0]
    assert len(children) == 25 * 6
    for h in children:
        made = 12 + 6 * h["generation"]  # individuals before this generation's children
        sample = h["tournament"]
        assert len(set(sample)) == 4 and all(made - 12 <= j < made for j in sample), h
        assert h["parent"] in sample
        assert all(by_id[h["parent"]]["fitness"] >= by_id[j]["fitness"] for j in sample), h
    assert all(h["tournament"] is None for h in hist[:12])
    assert td_loss.load_graph(hist[0]["graph"]).nodes  # the history holds loadable graphs


def test_evolve_config_errors():
    with pytest.raises(ValueError, match="tournament .5. exceeds population .4."):
        EvolveConfig(population=4, tournament=5)
    with pytest.raises(ValueError, match="bootstrap must be one of"):
        EvolveConfig(bootstrap="nope")
    with pytest.raises(ValueError, match="graph_nodes .3. is smaller than the bootstrap"):
        EvolveConfig(graph_nodes=3, bootstrap="dqn_clipped")


def test_discover_evolve_on_a_cheap_task_end_to_end(tmp_path, capsys):
    path = write_task(tmp_path, CHEAP, "cheap")
    out = tmp_path / "search"
    code = main(["discover", "evolve", "--task", str(path), "--population", "6",
                 "--tournament", "3", "--children", "3", "--generations", "2",
                 "--graph-nodes", "8", "--timesteps", "8000", "--hurdle-timesteps", "4000",
                 "--hurdle-threshold", "0.02", "--seed", "1", "--fitness", "final",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best fitness" in printed and "submission:" in printed
    hist = [json.loads(line) for line in (out / "history.jsonl").open()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] and summary["individuals"] == len(hist) == 12
    status = collections.Counter(h["status"] for h in hist)
    trained = [h for h in hist if h["status"] in ("trained", "hurdle_failed")]
    assert len({h["hash"] for h in trained}) == len(trained)
    # The bootstrap DQN (individual 0) passes the hurdle and learns CartPole.
    assert hist[0]["status"] == "trained" and hist[0]["equation"].startswith("(select(q_tm1")
    assert hist[0]["hurdle_score"] >= 0.02 and hist[0]["fitness"] > 0.15
    assert summary["best"]["fitness"] >= hist[0]["fitness"]
    # Only trained candidates (and the batch padding) cost env steps: hurdle at 4000 steps,
    # full runs at 8000, two seeds, batches of 3.
    assert summary["env_steps"] % (2 * 4000) == 0 and summary["env_steps"] > 0
    assert sum(status.values()) == 12
    # The best loss is a ready submission that the checks accept, with its disclosure.
    sub = submissions.load(out / "submission")
    assert sub.family == "td_loss" and sub.entry == "graph:loss.yaml"
    assert sub.disclosure.task == "cheap-td" and sub.disclosure.env_steps == summary["env_steps"]
    assert sub.disclosure.train_envs == ("gymnax/CartPole-v1",)
    loss = td_loss.load_graph(out / "submission" / "loss.yaml")
    assert td_loss.functional_hash(loss) == summary["best"]["hash"]
    discovery = json.loads((out / "submission" / "discovery.json").read_text())
    assert discovery["provenance"]["command"].startswith("metabench discover evolve --task")
    assert discovery["config"]["population"] == 6
    # These figures were measured on the final-window fitness (the flag reaches the config).
    assert discovery["config"]["fitness"] == "final_window"
    assert discovery["fitness"]["objective"] == summary["evaluation"]["fitness"] == "final_window"
    assert submissions.check(out / "submission").ok


# --- the fitness objective: all training episodes (the paper's) or the final window ---------

# Returns normalised by random 0 and reference 10, so a return of R scores R / 10.
TEN = CHEAP.replace("random: 22.0, reference: 500.0", "random: 0.0, reference: 10.0")


def _hand_run(env: spec.EnvSpec) -> harness.EnvRun:
    """Two seeds, 20 updates (the 5% final window is the last update alone).
    Seed 0: four episodes, returning 0, 0, 10, 10 in updates 4, 9, 14, 19.
    Seed 1: three episodes returning 0 in update 0, one returning 10 in update 19."""
    rs, ep = np.zeros((2, 20)), np.zeros((2, 20))
    for u, r in ((4, 0.0), (9, 0.0), (14, 10.0), (19, 10.0)):
        rs[0, u], ep[0, u] = r, 1
    ep[1, 0], rs[1, 19], ep[1, 19] = 3, 10.0, 1
    return harness.EnvRun(env, [0, 1], rs, ep, np.zeros((2, 20)), steps_per_update=4,
                          num_updates=20, compile_s=0.0, run_s=1.0)


def test_all_episode_and_final_window_fitness_of_a_hand_built_run(tmp_path):
    task = spec.load(write_task(tmp_path, TEN, "ten"))
    run = _hand_run(task.train[0])
    assert fitness_window("all_episodes", task) == 1.0
    assert fitness_window("final_window", task) == task.scoring.window == 0.05
    # All episodes, each weighing the same: seed 0 (0+0+10+10)/4 = 5 -> 0.5; seed 1
    # (0+0+0+10)/4 = 2.5 -> 0.25 (not 0.5, as weighting updates would give); mean 0.375.
    per_seed = [r["score"] for r in harness.run_records(run, 1.0)]
    np.testing.assert_allclose(per_seed, [0.5, 0.25])
    assert _seed_scores(run, fitness_window("all_episodes", task)) == pytest.approx(0.375)
    # The final window holds update 19 only: both seeds returned 10 -> 1.0.
    assert _seed_scores(run, fitness_window("final_window", task)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fitness must be one of"):
        EvolveConfig(fitness="final")


@pytest.fixture
def hand_training(monkeypatch):
    """Replaces training with :func:`_hand_run` for every candidate; records the budgets.
    The no-gradient check is stubbed too (compiling it costs seconds; the end-to-end test
    runs it)."""
    budgets: list[int] = []

    def train_population(family, rule, batch, task, env, seeds, total_timesteps=None):
        budgets.append(total_timesteps)
        return [_hand_run(env) for _ in range(len(batch.op))]

    monkeypatch.setattr(harness, "train_population", train_population)
    monkeypatch.setattr(evolution, "_q_gradient_norm", lambda enc, x: 1.0)
    return budgets


def test_the_fitness_option_switches_full_evaluation_and_hurdle(tmp_path, hand_training):
    task = spec.load(write_task(tmp_path, TEN, "ten"))
    dqn = [td_loss.library()["dqn"]]
    name = task.train[0].name
    for fitness, want in (("final_window", 1.0), ("all_episodes", 0.375)):
        # Hurdle at 0.3: both pass; the hurdle and the full evaluation score the objective.
        ev = TrainSplitFitness(task, EvolveConfig(children=1, hurdle_threshold=0.3,
                                                  fitness=fitness))(dqn)[0]
        assert ev.status == "trained" and ev.fitness == pytest.approx(want)
        assert ev.hurdle == pytest.approx(want) and ev.scores == {name: pytest.approx(want)}
    # Hurdle at 0.6: passed on the final window (1.0), failed on all episodes (0.375).
    cfg = EvolveConfig(children=1, hurdle_threshold=0.6, fitness="all_episodes")
    fit = TrainSplitFitness(task, cfg)
    ev = fit(dqn)[0]
    assert (ev.status, ev.fitness, ev.scores) == ("hurdle_failed", pytest.approx(0.375), {})
    assert fit.info()["fitness"] == "all_episodes" and fit.info()["fitness_window"] == 1.0
    assert hand_training == [8000 // 3, 8000] * 2 + [8000 // 3]  # hurdle, full, ...


def test_evolve_records_its_fitness_objective(tmp_path, hand_training):
    path = write_task(tmp_path, TEN, "ten")
    args = ["discover", "evolve", "--task", str(path), "--population", "2", "--tournament",
            "1", "--children", "1", "--generations", "1", "--seeds", "2", "--seed", "0"]
    for flag, objective, best in ((None, "all_episodes", 0.375), ("final", "final_window", 1.0)):
        out = tmp_path / objective
        assert main(args + (["--fitness", flag] if flag else []) + ["--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        discovery = json.loads((out / "submission" / "discovery.json").read_text())
        for s in (summary, discovery):
            assert s["config"]["fitness"] == s["fitness"]["objective"] == objective
            assert s["evaluation"]["fitness"] == objective
        assert summary["best"]["fitness"] == pytest.approx(best)
        notes = submissions.load(out / "submission").disclosure.notes
        assert f"fitness {objective}: {summary['fitness']['definition']}" in notes
