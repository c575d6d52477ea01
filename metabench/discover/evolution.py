"""Regularised evolution over loss graphs: ``metabench discover evolve``.

Co-Reyes et al. 2021, "Evolving Reinforcement Learning Algorithms" (ICLR), searched the
space of loss graphs (:mod:`metabench.families.td_loss.graph`) with regularised evolution
(Real et al. 2019): keep a population; repeatedly pick the fittest of a random tournament,
mutate it, train fresh DQN agents with the child's loss, add the child and remove the
*oldest* member (not the worst), which keeps the search from clinging to lucky evaluations.
Their two savings are here:

- **functional equivalence**: a child whose
  :func:`~metabench.families.td_loss.search.functional_hash` was seen before is not trained
  again; it joins the population with the cached fitness;
- **hurdle**: a child is first trained on a cheap hurdle (the task's first train env at a
  fraction of the budget); below ``hurdle_threshold`` it is not trained further and keeps its
  hurdle score as fitness.

A third, free saving: a loss with no gradient in ``q_tm1`` cannot train the agent at all, so
it gets fitness 0 without training.

Batching. Children are made ``children`` at a time (each from its own tournament) and trained
together in one compiled call, vmapped over candidates and seeds: the loss graphs go through
:func:`metabench.families.td_loss.evaluate.interpreter_rule` as encoded tables, so the whole
search compiles the training loop once per (env, budget) instead of once per candidate. All
candidates share the seed keys (common random numbers), which makes their scores more
comparable.

Fitness (``EvolveConfig.fitness``). By default it is the paper's objective (Co-Reyes et al.
2021, Sec. 3: the search maximises the sum over training environments of Eval(L, E), the
normalised average *training* episode return of an agent trained with L), which rewards
learning fast as well as learning well: per train env and seed, the mean return of every
episode completed during training (episodes weighted equally), normalised with the env's
``(R - random) / (reference - random)``; averaged over seeds, then over train envs (a mean,
not the paper's sum: same ranking, and the scale of ``hurdle_threshold`` does not depend on
the number of envs). ``final_window`` instead scores the mean return over the task's final
scoring window (``scoring.window`` of training, as ``metabench submit`` scores). The hurdle
uses the same objective. Failed or NaN runs score 0. Only the train split is ever used.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metabench import harness
from metabench.discover import common
from metabench.families import td_loss
from metabench.families.td_loss.search import _hash_inputs
from metabench.results import write_json_atomic
from metabench.tasks.spec import EnvSpec, TaskSpec, require_calibrated

FAMILY = "td_loss"

FITNESS = ("all_episodes", "final_window")
"""The search objectives ``EvolveConfig.fitness`` names (see the module docstring)."""


def fitness_window(fitness: str, task: TaskSpec) -> float:
    """The fraction of training whose completed episodes make a seed's score under
    ``fitness``: all of it (1.0) for ``all_episodes``, the task's scoring window for
    ``final_window``."""
    if fitness not in FITNESS:
        raise ValueError(f"fitness must be one of {FITNESS}, got {fitness!r}")
    return 1.0 if fitness == "all_episodes" else float(task.scoring.window)


def describe_fitness(fitness: str, task: TaskSpec) -> str:
    """One line saying what ``fitness`` measures, for summaries and disclosures."""
    fitness_window(fitness, task)  # validates the name
    if fitness == "all_episodes":
        return ("normalised return averaged over all training episodes, then seeds, then "
                "train envs (Co-Reyes et al. 2021)")
    return (f"normalised return over the episodes of the final {100 * task.scoring.window:g}% "
            "of training, averaged over seeds, then train envs")


@dataclasses.dataclass(frozen=True)
class EvolveConfig:
    """Settings of one search (defaults: a CPU-sized demonstration; see docs/discovery.md for a
    real search)."""

    population: int = 16
    """Individuals kept; the oldest leaves when a child joins (paper: 300)."""
    tournament: int = 4
    """Random members a parent is the fittest of (paper: 25)."""
    children: int = 4
    """Children per generation, trained together in one compiled call (also the batch in
    which the initial population is trained)."""
    generations: int = 8
    """Generations after the initial population; children evaluated = generations x
    children."""
    graph_nodes: int = 10
    """Non-input nodes per graph; the bootstrap graph is padded with random unused nodes up
    to this size so that mutations can wire them in."""
    bootstrap: str | None = "dqn"
    """A library graph (``dqn``, ``dqn_reg``, ``dqn_clipped``) that seeds the population
    (itself plus mutants of it), or None to start from random graphs."""
    seeds: int = 2
    """Fresh agents per candidate and env."""
    timesteps: int | None = None
    """Env steps per agent in the full evaluation; None uses the task's budget."""
    hurdle_timesteps: int | None = None
    """Env steps per agent on the hurdle; None is a third of ``timesteps``."""
    hurdle_threshold: float | None = 0.01
    """Normalised hurdle score (on the ``fitness`` objective) a child needs to be trained
    fully; None disables the hurdle. All-episode scores run far below final-window ones
    early in training (the first, short episodes are many): on classic-transfer-v1-quick's
    CartPole hurdle (5e4 steps, 2 seeds) DQN scores 0.040 (final window 0.48) and
    non-learning mutants -0.014 to -0.002, hence 0.01; 0.05 suits ``final_window``."""
    hurdle_env: str | None = None
    """Name of the train env used as hurdle; None is the first."""
    seed: int = 0
    """Seed of the search's own randomness (tournaments, mutations, initial graphs)."""
    fitness: str = "all_episodes"
    """What a candidate is scored on, full evaluation and hurdle alike: ``all_episodes``
    (the paper's objective: normalised return averaged over every episode completed during
    training, so sample efficiency counts) or ``final_window`` (normalised return over the
    task's final ``scoring.window`` of training, as ``metabench submit`` scores)."""

    def __post_init__(self):
        if self.fitness not in FITNESS:
            raise ValueError(f"fitness must be one of {FITNESS}, got {self.fitness!r}")
        for name in ("population", "tournament", "children", "graph_nodes", "seeds"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        if self.tournament > self.population:
            raise ValueError(f"tournament ({self.tournament}) exceeds population "
                             f"({self.population})")
        for name in ("timesteps", "hurdle_timesteps"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be positive, got {v!r}")
        if self.bootstrap is not None:
            if self.bootstrap not in td_loss.library():
                raise ValueError(f"bootstrap must be one of {sorted(td_loss.library())} or "
                                 f"None, got {self.bootstrap!r}")
            g = td_loss.library()[self.bootstrap]
            need = len(g.nodes) - len(td_loss.INPUTS)
            if self.graph_nodes < need:
                raise ValueError(f"graph_nodes ({self.graph_nodes}) is smaller than the "
                                 f"bootstrap graph {self.bootstrap!r} ({need} nodes)")


class Individual(NamedTuple):
    """One evaluated (or cache-scored) graph."""

    id: int
    graph: td_loss.Graph
    hash: str
    fitness: float
    status: str
    """``trained`` (full evaluation), ``hurdle_failed``, ``no_q_gradient`` or ``cached``."""
    generation: int
    """-1 for the initial population."""
    parent: int | None


class Evaluation(NamedTuple):
    """What an evaluator says about one graph."""

    fitness: float
    status: str
    """``trained``, ``hurdle_failed`` or ``no_q_gradient``."""
    hurdle: float | None
    """The hurdle score, when a hurdle was run."""
    scores: dict[str, float]
    """Per train env, the mean normalised score (full evaluations only)."""


def pad_graph(graph: td_loss.Graph, n_nodes: int, rng: np.random.Generator) -> td_loss.Graph:
    """``graph`` (inputs first, as loaded) with random unused nodes inserted after the inputs
    until it has ``n_nodes`` non-input nodes; computes the same function."""
    n_in = len(td_loss.INPUTS)
    body = graph.nodes[n_in:]
    extra = n_nodes - len(body)
    if extra <= 0:
        return graph
    filler = td_loss.random_graph(rng, extra).nodes[n_in:]
    shift = lambda j: j if j < n_in else j + extra  # noqa: E731
    moved = tuple(dataclasses.replace(n, inputs=tuple(shift(j) for j in n.inputs))
                  for n in body)
    return td_loss.Graph(graph.nodes[:n_in] + filler + moved, shift(graph.output),
                         name=graph.name)


def _hash_inputs_jax():
    return {k: jnp.asarray(v) for k, v in _hash_inputs().items()}


@jax.jit
def _q_gradient_norm(enc: td_loss.EncodedGraph, x: dict) -> jax.Array:
    rule = td_loss.interpreter_rule()
    g = jax.grad(lambda q: jnp.mean(rule.apply(enc, {**x, "q_tm1": q})))(x["q_tm1"])
    return jnp.max(jnp.abs(g))


def _stack(encs: Sequence[td_loss.EncodedGraph], size: int) -> td_loss.EncodedGraph:
    # Pad the batch with copies of its last member so that every call has one shape.
    encs = list(encs) + [encs[-1]] * (size - len(encs))
    return td_loss.EncodedGraph(*(np.stack(xs) for xs in zip(*encs)))


def _seed_scores(run: harness.EnvRun, window: float) -> float:
    """Mean over seeds of the normalised return of the episodes completed in the last
    ``window`` of ``run``'s updates (1.0: all of training); failed seeds score 0."""
    recs = harness.run_records(run, window)
    return float(np.mean([r["score"] if r["score"] is not None else 0.0 for r in recs]))


class TrainSplitFitness:
    """The search's fitness: trains batches of graphs on the task's train split (hurdle
    first), ``children`` candidates x ``seeds`` per compiled call.

    An evaluator is any callable from a list of graphs to a list of :class:`Evaluation`;
    ``info()`` (optional) describes it in the search's summary, ``env_steps`` (optional)
    counts the env steps it simulated (padding included: that compute was spent).
    """

    def __init__(self, task: TaskSpec, cfg: EvolveConfig):
        require_calibrated(task, "train")
        self.task, self.cfg = task, cfg
        self.train = task.split("train")
        names = [e.name for e in self.train]
        if cfg.hurdle_env is not None and cfg.hurdle_env not in names:
            raise ValueError(f"hurdle_env {cfg.hurdle_env!r} is not a train env of {task.id} "
                             f"({', '.join(names)})")
        self.hurdle_spec = self.train[names.index(cfg.hurdle_env) if cfg.hurdle_env else 0]
        self.timesteps = int(cfg.timesteps or task.total_timesteps)
        self.hurdle_timesteps = int(cfg.hurdle_timesteps or max(1, self.timesteps // 3))
        self.window = fitness_window(cfg.fitness, task)
        self.env_steps = 0
        self.x = _hash_inputs_jax()

    def info(self) -> dict:
        return {"fitness": self.cfg.fitness, "fitness_window": self.window,
                "train_envs": [e.name for e in self.train], "seeds": self.cfg.seeds,
                "timesteps": self.timesteps, "hurdle_env": self.hurdle_spec.name,
                "hurdle_timesteps": self.hurdle_timesteps,
                "hurdle_threshold": self.cfg.hurdle_threshold}

    def _run(self, spec: EnvSpec, batch: td_loss.EncodedGraph, n: int,
             timesteps: int) -> list[float]:
        runs = harness.train_population(FAMILY, td_loss.interpreter_rule(), batch, self.task,
                                        spec, range(self.cfg.seeds), total_timesteps=timesteps)
        self.env_steps += len(runs) * self.cfg.seeds * runs[0].updates_done \
            * runs[0].steps_per_update
        if runs[0].failed_to_compile:
            raise RuntimeError(f"the search's training call failed to compile on {spec.name}: "
                               f"{runs[0].failure}")
        return [_seed_scores(r, self.window) for r in runs[:n]]

    def __call__(self, graph_list: Sequence[td_loss.Graph]) -> list[Evaluation]:
        k = self.cfg.children
        encs = [td_loss.encode(g, self.cfg.graph_nodes) for g in graph_list]
        out: list[Evaluation | None] = [None] * len(encs)
        todo = []
        for i, e in enumerate(encs):
            if float(_q_gradient_norm(e, self.x)) == 0.0:
                out[i] = Evaluation(0.0, "no_q_gradient", None, {})
            else:
                todo.append(i)
        for lo in range(0, len(todo), k):
            part = todo[lo:lo + k]
            hurdle: dict[int, float] = {}
            passed = part
            if self.cfg.hurdle_threshold is not None:
                scores = self._run(self.hurdle_spec, _stack([encs[i] for i in part], k),
                                   len(part), self.hurdle_timesteps)
                hurdle = dict(zip(part, scores))
                passed = [i for i in part if hurdle[i] >= self.cfg.hurdle_threshold]
                for i in part:
                    if i not in passed:
                        out[i] = Evaluation(hurdle[i], "hurdle_failed", hurdle[i], {})
            if not passed:
                continue
            per_env = {}
            for spec in self.train:
                per_env[spec.name] = self._run(spec, _stack([encs[i] for i in passed], k),
                                               len(passed), self.timesteps)
            for j, i in enumerate(passed):
                scores = {name: s[j] for name, s in per_env.items()}
                out[i] = Evaluation(float(np.mean(list(scores.values()))), "trained",
                                    hurdle.get(i), scores)
        return out  # type: ignore[return-value]


def _record(ind: Individual, ev: Evaluation | None, cached_from: int | None,
            tournament: list[int] | None = None) -> dict:
    return {"id": ind.id, "generation": ind.generation, "parent": ind.parent,
            "tournament": tournament, "hash": ind.hash, "status": ind.status,
            "fitness": ind.fitness,
            "hurdle_score": None if ev is None else ev.hurdle,
            "scores": {} if ev is None else ev.scores, "cached_from": cached_from,
            "equation": td_loss.equation(ind.graph), "graph": td_loss.dump_graph(ind.graph)}


class EvolveResult(NamedTuple):
    best: Individual
    history: list[dict]
    summary: dict
    out_dir: Path


def evolve(task: TaskSpec, cfg: EvolveConfig, out_dir: str | Path, *,
           evaluator: Callable[[list[td_loss.Graph]], list[Evaluation]] | None = None,
           command: str | None = None, log: Callable[[str], None] = print,
           author: str = "metabench discover evolve") -> EvolveResult:
    """Runs the search; writes ``history.jsonl`` (every individual: graph, hash, status,
    scores, and for a child its parent and the ids of the tournament sample it won),
    ``summary.json`` (config, budget, best-so-far curve, provenance; rewritten each
    generation) and ``submission/`` (the best loss as a ready ``td_loss`` graph submission
    with its disclosure filled in) under ``out_dir``. ``evaluator`` defaults to
    :class:`TrainSplitFitness`."""
    if FAMILY not in task.families():
        raise ValueError(f"task {task.id} has no {FAMILY} agent config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hist_path = out_dir / "history.jsonl"
    hist_path.write_text("")
    rng = np.random.default_rng(cfg.seed)
    evaluate = TrainSplitFitness(task, cfg) if evaluator is None else evaluator
    info = evaluate.info() if hasattr(evaluate, "info") else {}
    # A custom evaluator defines its own fitness; the config's field only names the default's.
    objective = info.get("fitness", cfg.fitness if evaluator is None else "custom")
    objective_text = (describe_fitness(objective, task) if objective in FITNESS
                      else "defined by a custom evaluator")
    seen: dict[str, int] = {}  # functional hash -> id of the individual trained for it
    everyone: dict[int, Individual] = {}
    history: list[dict] = []
    curve: list[dict] = []
    t0 = time.perf_counter()
    n_trained = 0

    def add(graph_list, parents, generation, tournaments=None) -> list[Individual]:
        nonlocal n_trained
        hashes = [td_loss.functional_hash(g) for g in graph_list]
        new, first = [], {}
        for i, h in enumerate(hashes):
            if h not in seen and h not in first:
                first[h] = i
                new.append(i)
        results = dict(zip(new, evaluate([graph_list[i] for i in new]))) if new else {}
        made = []
        for i, (g, h) in enumerate(zip(graph_list, hashes)):
            ident = len(everyone)
            if i in results:
                ev, cached_from = results[i], None
                ind = Individual(ident, g, h, ev.fitness, ev.status, generation, parents[i])
                seen[h] = ident
                n_trained += ev.status != "no_q_gradient"
            else:
                # Seen before, or a later copy within this batch (whose first copy was
                # registered a few iterations ago).
                ev, cached_from = None, seen[h]
                ind = Individual(ident, g, h, everyone[cached_from].fitness, "cached",
                                 generation, parents[i])
            everyone[ident] = ind
            rec = _record(ind, ev, cached_from, None if tournaments is None else tournaments[i])
            history.append(rec)
            with open(hist_path, "a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
            made.append(ind)
        return made

    def summary(done: bool, generation: int) -> dict:
        best = max(everyone.values(), key=lambda d: d.fitness)
        return {
            "task": {"id": task.id, "fingerprint": task.fingerprint("td_loss"), "split": "train",
                     "train_envs": [e.name for e in task.split("train")]},
            "config": dataclasses.asdict(cfg),
            "fitness": {"objective": objective, "definition": objective_text},
            "evaluation": info,
            "generation": generation, "done": done,
            "individuals": len(everyone), "trained": n_trained,
            "cached": sum(d.status == "cached" for d in everyone.values()),
            "hurdle_failed": sum(d.status == "hurdle_failed" for d in everyone.values()),
            "no_q_gradient": sum(d.status == "no_q_gradient" for d in everyone.values()),
            "env_steps": getattr(evaluate, "env_steps", 0), "wall_s": time.perf_counter() - t0,
            "best": {"id": best.id, "fitness": best.fitness, "hash": best.hash,
                     "equation": td_loss.equation(best.graph)},
            "curve": curve,
            "provenance": harness.provenance(command),
        }

    if cfg.bootstrap is not None:
        base = pad_graph(td_loss.library()[cfg.bootstrap], cfg.graph_nodes, rng)
        initial = [base] + [td_loss.mutate(base, rng) for _ in range(cfg.population - 1)]
    else:
        initial = [td_loss.random_graph(rng, cfg.graph_nodes) for _ in range(cfg.population)]
    log(f"evolve: {task.id} train split, population {cfg.population}, {cfg.generations} "
        f"generations x {cfg.children} children; fitness {objective} ({objective_text}); "
        + ", ".join(f"{k} {v}" for k, v in info.items() if k != "fitness"))
    population = collections.deque(add(initial, [None] * len(initial), -1))

    def note(generation: int) -> None:
        best = max(everyone.values(), key=lambda d: d.fitness)
        curve.append({"generation": generation, "individuals": len(everyone),
                      "trained": n_trained, "best_fitness": best.fitness,
                      "population_mean": float(np.mean([p.fitness for p in population])),
                      "env_steps": getattr(evaluate, "env_steps", 0),
                      "wall_s": round(time.perf_counter() - t0, 2)})
        write_json_atomic(out_dir / "summary.json", summary(False, generation))
        log(f"  generation {generation:3d}: best {best.fitness:.3f}  population mean "
            f"{curve[-1]['population_mean']:.3f}  trained {n_trained}  "
            f"individuals {len(everyone)}  {curve[-1]['wall_s']:.0f}s  "
            f"best = {td_loss.equation(best.graph)[:80]}")

    note(-1)
    interrupted = False
    try:
        for gen in range(cfg.generations):
            children, parents, samples = [], [], []
            members = list(population)
            for _ in range(cfg.children):
                picks = rng.choice(len(members), cfg.tournament, replace=False)
                parent = max((members[j] for j in picks), key=lambda d: d.fitness)
                children.append(td_loss.mutate(parent.graph, rng))
                parents.append(parent.id)
                # Logged so that selection can be checked: the parent beats the rest.
                samples.append([members[j].id for j in picks])
            for child in add(children, parents, gen, samples):
                population.append(child)
                population.popleft()
            note(gen)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was found so far")
    best = max(everyone.values(), key=lambda d: d.fitness)
    final = summary(not interrupted, len(curve) - 2)
    final["interrupted"] = interrupted
    write_submission(out_dir / "submission", best, task, final, author)
    write_json_atomic(out_dir / "summary.json", final)
    return EvolveResult(best, history, final, out_dir)


def write_submission(folder: Path, best: Individual, task: TaskSpec, summary: dict,
                     author: str) -> Path:
    """The best loss as a ``td_loss`` graph submission (``loss.yaml``), with the search's
    disclosure and a ``discovery.json`` recording its config, budget and command."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"evolved_{best.hash[:8]}"
    graph = dataclasses.replace(best.graph, name=name)
    (folder / "loss.yaml").write_text(
        f"# Found by `{summary['provenance']['command']}`\n# loss = "
        f"{td_loss.equation(graph)}\n" + td_loss.dump_graph(graph))
    return common.write_submission(
        folder, name=name.replace("_", "-"), family=FAMILY, rule={"graph": "loss.yaml"},
        description=(f"Loss found by regularised evolution on {task.id} (train split): "
                     f"{td_loss.equation(graph)}"),
        task=task, summary={**summary, "best_individual": best.id}, author=author,
        notes=(f"metabench discover evolve: {summary['individuals']} individuals, "
               f"{summary['trained']} trained, best train fitness {best.fitness:.3f}; fitness "
               f"{summary['fitness']['objective']}: {summary['fitness']['definition']} "
               f"({json.dumps(summary['evaluation'])})."))
