"""Evolution-strategy discovery: ``metabench discover lpo`` and ``metabench discover epg`` (and
any rule with parameters).

Lu et al. 2022 ("Discovered Policy Optimisation") meta-train LPO's drift network, and
Houthooft et al. 2018 ("Evolved Policy Gradients") EPG's loss network, with OpenAI-ES
(Salimans et al. 2017): antithetic Gaussian perturbations of the parameters,
centred-rank fitness shaping, Adam on the mean and a decaying perturbation scale. evosax's
``Open_ES`` does the ES arithmetic; this module supplies the fitness and the bookkeeping.

Fitness of a candidate: the mean, over the task's train envs and ``seeds`` fresh agents, of the
normalised final return (so envs weigh alike; failed or NaN runs score 0). The whole
population x seeds trains in one compiled call per env (``harness.train_population``), with
every candidate on the same seed keys (common random numbers). Only the train split is used.

Every ``checkpoint_every`` generations the ES state, key and curve are saved; re-running the
same command resumes from there to identical results, and ``curve.jsonl`` is cut back to the
checkpoint's rows first, so generations a stopped run did after it are not listed twice. The
mean of the final search distribution is written as a ready submission folder with its
disclosure filled in.

EPG is meta-trained with policy-gradient guidance, as in Houthooft et al. 2018's code
(github.com/openai/EPG, ``evolution.py``): every candidate's inner loop minimises
``(1 - alpha) L_phi + alpha L_PG``, ``alpha`` annealed linearly from 1 at the first generation
to 0 at generation ``guidance_generations`` (the code's ``PiecewiseSchedule([(0, 1.),
(int(outer_n_epoch / 8), 0.)], outside_value=0.)``: an eighth of the search by default) and 0
after; ES perturbs ``phi`` only, and ``alpha`` is the same for every candidate of a
generation. What is written and scored is ``phi`` alone (the ``epg`` rule, alpha = 0), as the
paper tests its learned loss without the guide.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metabench import harness
from metabench.discover.common import Checkpoint, reset_curve, write_submission
from metabench.families import base, epg
from metabench.results import write_json_atomic
from metabench.rules import UpdateRule
from metabench.tasks.spec import TaskSpec, require_calibrated


@dataclasses.dataclass(frozen=True)
class ESConfig:
    """Settings of an ES search (defaults: the DPO paper's LPO settings where they apply,
    CPU-sized otherwise)."""

    generations: int = 50
    """ES generations."""
    population: int = 16
    """Candidates per generation (even: antithetic pairs; the paper's LPO used 32)."""
    sigma_init: float = 0.04
    """Initial perturbation scale (Lu et al. 2022: 0.04)."""
    sigma_decay: float = 0.999
    """Per-generation multiplicative decay of the scale (Lu et al. 2022: 0.999)."""
    sigma_limit: float = 0.01
    """Floor of the scale (Lu et al. 2022: 0.01)."""
    lr: float = 0.01
    """Adam learning rate on the mean."""
    seeds: int = 2
    """Fresh agents per candidate and env."""
    timesteps: int | None = None
    """Env steps per agent; None uses the task's budget."""
    seed: int = 0
    """Seed of the search."""
    checkpoint_every: int = 1
    """Generations between checkpoints."""

    def __post_init__(self):
        for name in ("generations", "population", "seeds", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.population % 2:
            raise ValueError(f"population must be even (antithetic pairs), got "
                             f"{self.population}")
        for name in ("sigma_init", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.timesteps is not None and int(self.timesteps) < 1:
            raise ValueError(f"timesteps must be positive, got {self.timesteps!r}")


def make_es(cfg: ESConfig, like: Any):
    """evosax's OpenAI-ES over parameter trees shaped like ``like``."""
    from evosax.algorithms import Open_ES

    schedule = optax.exponential_decay(cfg.sigma_init, transition_steps=1,
                                       decay_rate=cfg.sigma_decay, end_value=cfg.sigma_limit)
    return Open_ES(population_size=cfg.population, solution=like,
                   optimizer=optax.adam(cfg.lr), std_schedule=schedule)


class TrainFitness:
    """Mean normalised final return over the task's train envs, population x seeds per call."""

    def __init__(self, task: TaskSpec, family: str, rule: UpdateRule, cfg: ESConfig):
        require_calibrated(task, "train")
        self.task, self.family, self.rule, self.cfg = task, family, rule, cfg
        self.timesteps = int(cfg.timesteps or task.total_timesteps)
        self.env_steps = 0

    def __call__(self, population: Any) -> tuple[np.ndarray, dict[str, list[float]]]:
        per_env = {}
        for spec in self.task.split("train"):
            runs = harness.train_population(self.family, self.rule, population, self.task,
                                            spec, range(self.cfg.seeds),
                                            total_timesteps=self.timesteps)
            if runs[0].failed_to_compile:
                raise RuntimeError(f"the ES training call failed to compile on {spec.name}: "
                                   f"{runs[0].failure}")
            self.env_steps += sum(len(r.seeds) * r.updates_done * r.steps_per_update
                                  for r in runs)
            window = self.task.scoring.window
            per_env[spec.name] = [
                float(np.mean([x["score"] if x["score"] is not None else 0.0
                               for x in harness.run_records(r, window)])) for r in runs]
        fitness = np.mean(np.array(list(per_env.values())), axis=0)
        return fitness, per_env


class ESResult(NamedTuple):
    mean: Any
    curve: list[dict]
    summary: dict
    out_dir: Path


def guidance_weight(generation: int, anneal: int) -> float:
    """The guidance weight ``alpha`` of 0-based ``generation``: linear from 1 at generation 0
    to 0 at generation ``anneal``, 0 from there on (and always 0 when ``anneal`` is 0)."""
    if anneal <= 0:
        return 0.0
    return max(0.0, 1.0 - generation / anneal)


def default_guidance_generations(generations: int) -> int:
    """An eighth of the search, as in the EPG code (``int(outer_n_epoch / 8)``), at least 1."""
    return max(1, int(generations) // 8)


def guided_batch(population: Any, alpha: float) -> dict:
    """A population of losses as the meta-parameters of ``epg.guided``: ``{"loss":
    population, "guidance": [K] alpha}`` (one alpha for every candidate)."""
    k = len(jax.tree_util.tree_leaves(population)[0])
    return {"loss": population, "guidance": jnp.full((k,), alpha, jnp.float32)}


def es_search(task: TaskSpec, family: str, rule: UpdateRule, init_params: Any, cfg: ESConfig,
              out_dir: str | Path, *,
              fitness: Callable[[Any], tuple[np.ndarray, dict]] | None = None,
              command: str | None = None, log: Callable[[str], None] = print,
              guidance_generations: int = 0) -> ESResult:
    """Runs OpenAI-ES from ``init_params`` (maximising ``fitness``, by default
    :class:`TrainFitness`); writes ``curve.jsonl``, ``checkpoint.{npz,json}`` and
    ``summary.json`` under ``out_dir`` and returns the final mean.

    With ``guidance_generations > 0``, ``rule`` is a guided rule (``epg.guided``) and each
    generation's candidates are evaluated as :func:`guided_batch` with the weight
    :func:`guidance_weight` (recorded per generation as ``guidance`` in the curve); ES moves
    only the loss's parameters, ``init_params``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit = fitness or TrainFitness(task, family, rule, cfg)
    es = make_es(cfg, init_params)
    params = es.default_params
    key = jax.random.PRNGKey(cfg.seed)
    key, k0 = jax.random.split(key)
    state = es.init(k0, init_params, params)
    config_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if guidance_generations:
        # Only when guided, so that an unguided search's checkpoints keep their config.
        config_json["guidance_generations"] = int(guidance_generations)
    start, curve, env_steps, wall_prev = 0, [], 0, 0.0
    ckpt = Checkpoint(out_dir, config_json, task.fingerprint(family), "generation",
                      "generations", "generation")
    found = ckpt.resume((state, key), cfg.generations, log)
    if found is not None:
        (state, key), meta = found
        start, curve = meta["generation"], meta["curve"]
        env_steps, wall_prev = meta["env_steps"], meta["wall_s"]
    # Rows past the checkpoint (a run stopped between checkpoints) are dropped and redone.
    reset_curve(out_dir / "curve.jsonl", curve)
    t0 = time.perf_counter()
    ask, tell = jax.jit(es.ask), jax.jit(es.tell)
    for gen in range(start, cfg.generations):
        key, k_ask, k_tell = jax.random.split(key, 3)
        population, state = ask(k_ask, state, params)
        alpha = guidance_weight(gen, guidance_generations) if guidance_generations else None
        f, per_env = fit(population if alpha is None else guided_batch(population, alpha))
        if not np.all(np.isfinite(f)):
            f = np.where(np.isfinite(f), f, 0.0)  # a NaN candidate scores the floor
        # evosax minimises.
        state, _ = tell(k_tell, population, jnp.asarray(-f, jnp.float32), state, params)
        env_steps = getattr(fit, "env_steps", env_steps)
        row = {"generation": gen + 1, "fitness_mean": float(np.mean(f)),
               "fitness_max": float(np.max(f)), "fitness_min": float(np.min(f)),
               "per_env_mean": {k: float(np.mean(v)) for k, v in per_env.items()},
               "sigma": float(state.std), "env_steps": int(env_steps),
               "wall_s": round(wall_prev + time.perf_counter() - t0, 2)}
        if alpha is not None:
            row["guidance"] = alpha
        curve.append(row)
        with open(out_dir / "curve.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log(f"  generation {gen + 1:4d}: fitness mean {row['fitness_mean']:.3f} max "
            f"{row['fitness_max']:.3f}  sigma {row['sigma']:.4f}"
            + ("" if alpha is None else f"  guidance {alpha:.3f}")
            + f"  {row['wall_s']:.0f}s")
        if (gen + 1) % cfg.checkpoint_every == 0 or gen + 1 == cfg.generations:
            ckpt.save((state, key), gen + 1, curve=curve, env_steps=int(env_steps),
                      wall_s=wall_prev + time.perf_counter() - t0)
    mean = es.get_mean(state)
    summary = {
        "task": {"id": task.id, "fingerprint": task.fingerprint(family), "split": "train",
                 "train_envs": [e.name for e in task.split("train")]},
        "family": family, "config": config_json,
        "timesteps": getattr(fit, "timesteps", None),
        "env_steps": int(env_steps), "wall_s": wall_prev + time.perf_counter() - t0,
        "generations": cfg.generations, "provenance": harness.provenance(command),
        "curve_first": curve[0] if curve else None, "curve_last": curve[-1] if curve else None,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    return ESResult(mean, curve, summary, out_dir)


def discover_rule(task: TaskSpec, family: str, factory: str, cfg: ESConfig,
                  out_dir: str | Path, *, what: str, start: str, paper: str,
                  command: str | None = None, log: Callable[[str], None] = print,
                  author: str | None = None,
                  guide: Callable[[UpdateRule], UpdateRule] | None = None,
                  guidance_generations: int = 0, extra_notes: str = "") -> ESResult:
    """A reference rule's meta-parameters by OpenAI-ES from its ``init`` (the rule built by
    its factory with default arguments); writes ``out_dir/submission``. ``what`` names the
    rule's network and ``start`` what its initialisation is, for the submission's text.
    With ``guide`` (e.g. ``epg.guided``) and ``guidance_generations``, candidates train with
    the guided rule (see :func:`es_search`); the submission is the unguided rule."""
    if family not in task.families():
        raise ValueError(f"task {task.id} has no {family} agent config")
    rule = base.get_family(family).reference_rules[factory].factory()
    init = rule.init(jax.random.PRNGKey(0))
    search_rule = rule if guide is None or not guidance_generations else guide(rule)
    log(f"discover {factory}: {task.id} train split "
        f"({', '.join(e.name for e in task.split('train'))}), population {cfg.population} x "
        f"{cfg.seeds} seeds, {cfg.generations} generations"
        + (f", guidance annealed over {guidance_generations}"
           if search_rule is not rule else ""))
    res = es_search(task, family, search_rule, init, cfg, out_dir, command=command, log=log,
                    guidance_generations=guidance_generations if search_rule is not rule
                    else 0)
    write_submission(
        Path(out_dir) / "submission", name=f"{factory}-{task.id}", family=family,
        rule={"factory": factory}, params=res.mean, task=task, summary=res.summary,
        author=author or f"metabench discover {factory}", paper=paper,
        description=(f"{what} meta-trained by `metabench discover {factory}` "
                     f"(OpenAI-ES) on {task.id} (train split), from its {start} "
                     "initialisation."),
        notes=(f"metabench discover {factory}: {cfg.generations} generations of "
               f"{cfg.population} candidates x {cfg.seeds} seeds." + extra_notes))
    return res


def discover_lpo(task: TaskSpec, cfg: ESConfig, out_dir: str | Path, *,
                 command: str | None = None, log: Callable[[str], None] = print,
                 author: str = "metabench discover lpo") -> ESResult:
    """LPO's drift network by OpenAI-ES from its PPO-clip initialisation (Lu et al. 2022)."""
    return discover_rule(task, "drift", "lpo", cfg, out_dir, what="LPO's drift network",
                         start="PPO-clip", paper="https://arxiv.org/abs/2210.05639",
                         command=command, log=log, author=author)


def discover_epg(task: TaskSpec, cfg: ESConfig, out_dir: str | Path, *,
                 command: str | None = None, log: Callable[[str], None] = print,
                 author: str = "metabench discover epg",
                 guidance_generations: int | None = None) -> ESResult:
    """EPG's loss network by OpenAI-ES from its random initialisation (Houthooft et al. 2018
    evolve their loss with ES too, over a population of inner-loop agents), guided by
    REINFORCE with a weight annealed from 1 to 0 over ``guidance_generations`` (default: an
    eighth of the generations, as the paper's code) and 0 after; the loss that is written
    and scored is the learned loss alone."""
    anneal = (default_guidance_generations(cfg.generations) if guidance_generations is None
              else int(guidance_generations))
    return discover_rule(task, "epg", "epg", cfg, out_dir, what="EPG's loss network",
                         start="random", paper="https://arxiv.org/abs/1802.04821",
                         command=command, log=log, author=author, guide=epg.guided,
                         guidance_generations=anneal,
                         extra_notes=(f" Policy-gradient guidance (REINFORCE) annealed "
                                      f"linearly from weight 1 to 0 over the first {anneal} "
                                      f"generations, 0 after; scored without it."
                                      if anneal else ""))
