"""``metabench calibrate``: the uniform-random policy's mean return per environment.

The measurement runs ``num_envs`` environments (each with its own draw from the entry's
parameter distribution) for a fixed number of steps with uniformly random actions, under one
jitted scan, and averages the returns of every episode that completed. Results go to
``metabench/tasks/calibration.lock.yaml`` with how they were measured.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from metabench.envs.oracle import level_references
from metabench.tasks.spec import CALIBRATION_FILE, TASKS_DIR, EnvSpec, TaskSpec, make_env

MAX_STEPS = 4000


def random_return(spec: EnvSpec, num_envs: int = 64, seed: int = 0) -> dict[str, Any]:
    """Mean, std and count of completed-episode returns under a uniform random policy."""
    env, base, sampler = make_env(spec)
    max_ep = int(getattr(base, "max_steps_in_episode", 1000))
    steps = int(min(4 * max_ep, MAX_STEPS))
    space = env.action_space(base)

    def one_env(key):
        k_params, k_reset, k_run = jax.random.split(key, 3)
        params = sampler(k_params)
        obs, state = env.reset(k_reset, params)

        def step(carry, key):
            state, ret = carry
            k_act, k_step = jax.random.split(key)
            action = space.sample(k_act)
            _, state, reward, term, trunc, _ = env.step(k_step, state, action, params)
            ret = ret + reward
            done = jnp.logical_or(term, trunc)
            return (state, jnp.where(done, 0.0, ret)), (jnp.where(done, ret, 0.0), done)

        _, (finished, done) = jax.lax.scan(step, (state, jnp.float32(0.0)),
                                           jax.random.split(k_run, steps))
        return finished, done

    # A multi-agent env's copies are its agents: whole games only.
    agents = env.num_agents
    num_envs = -(-num_envs // agents) * agents
    keys = jax.random.split(jax.random.PRNGKey(seed), num_envs)
    finished, done = jax.jit(jax.vmap(one_env))(keys)
    returns = np.asarray(finished)[np.asarray(done)]
    if returns.size == 0:
        raise RuntimeError(f"{spec.env}: no episode completed in {steps} random steps")
    return {
        "random": round(float(returns.mean()), 4),
        "std": round(float(returns.std()), 4),
        "episodes": int(returns.size),
        "method": (f"uniform random actions, {num_envs} envs x {steps} steps (each env with "
                   f"its own parameter draw), mean over completed episodes, PRNG seed {seed}"),
    }


REFERENCE_LEVELS = 8
"""Levels sampled to summarise a per-level (optimal / oracle) reference in the lock file."""

_HOW = {
    "optimal": ("exact optimal expected undiscounted return per level, by backward induction "
                "over (agent cell, objects present) x steps to go on the env's own dynamics "
                "(metabench.envs.optimal; chains: a recursion over the chain)"),
    "oracle": ("mean return per level of a scripted full-information agent (shortest path to "
               "the nearest positive object, metabench.envs.oracle) simulated in the jitted "
               "env: a strong reference, not an upper bound, and not a rule under test"),
}


def level_reference(spec: EnvSpec, levels: int = REFERENCE_LEVELS, seed: int = 0
                    ) -> dict[str, Any]:
    """A per-level reference (``spec.normalise.method`` optimal / oracle) summarised over
    ``levels`` levels drawn by the entry's param sampler: mean, min, max and how."""
    method = spec.normalise.method
    env, _, sampler = make_env(spec)
    params = jax.jit(jax.vmap(sampler))(jax.random.split(jax.random.PRNGKey(seed), levels))
    refs = np.asarray(level_references(method, env, params), np.float64)
    return {"method": method, "mean": round(float(refs.mean()), 4),
            "min": round(float(refs.min()), 4), "max": round(float(refs.max()), 4),
            "levels": int(levels),
            "how": (f"{_HOW[method]}; the harness measures it for every seed on that seed's "
                    f"level; summarised here over {levels} levels drawn by the entry's param "
                    f"sampler from PRNG seed {seed}"),
            "measured": datetime.date.today().isoformat()}


def calibrate(task: TaskSpec, force: bool = False, tasks_dir: Path | None = None,
              log=print) -> dict[str, Any]:
    """Measures every env entry of ``task`` not yet in the lock file (all with ``force``):
    the random policy's return, and how each entry's reference is obtained (a fixed number,
    or an ``optimal`` / ``oracle`` per-level reference summarised over a few levels)."""
    path = (tasks_dir or TASKS_DIR) / CALIBRATION_FILE
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    data = data or {}
    envs = dict(data.get("envs", {}))
    tasks = dict(data.get("references", {}))
    task_refs = {}
    for split in ("train", "test"):
        for i, e in enumerate(task.split(split)):
            key = e.calibration_key()
            if key in envs and not force:
                log(f"{key}: {envs[key]['random']} (already calibrated)")
            else:
                m = random_return(e)
                m["measured"] = datetime.date.today().isoformat()
                envs[key] = {**envs.get(key, {}), **m}
                log(f"{key}: {m['random']} +- {m['std']} over {m['episodes']} episodes")
            if e.normalise.per_level:
                method = e.normalise.method
                per = dict(envs[key].get("reference", {}))
                if method not in per or force:
                    per[method] = level_reference(e)
                    envs[key] = {**envs[key], "reference": dict(sorted(per.items()))}
                    r = per[method]
                    log(f"{key}: {method} reference {r['mean']} (range {r['min']} to "
                        f"{r['max']} over {r['levels']} levels)")
                task_refs[f"{split}[{i}] {e.name}"] = {
                    "method": method, "measured in": f"envs[{key!r}].reference.{method}"}
            else:
                task_refs[f"{split}[{i}] {e.name}"] = {
                    "method": "fixed", "value": e.normalise.reference,
                    "source": f"a number in {Path(task.path).name} (its source is the YAML "
                              f"comment beside it)"}
    tasks[task.id] = task_refs
    out = {"envs": dict(sorted(envs.items())), "references": dict(sorted(tasks.items()))}
    header = ("# Uniform-random policy returns, written by `metabench calibrate TASK`.\n"
              "# Keys are '<env id> <params distribution>'; tasks refer to them with\n"
              "# `normalise: {random: calibrated}`. An entry's `reference` summarises a\n"
              "# per-level reference (`normalise: {reference: optimal | oracle}`) over a few\n"
              "# levels; `references` says, per task env entry, how its reference is obtained.\n"
              "# Do not edit by hand.\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(out, sort_keys=True, width=100))
    tmp.replace(path)
    return out
