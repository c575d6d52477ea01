"""``metabench calibrate``: the uniform-random policy's mean return per environment.

The measurement runs ``num_envs`` environments (each with its own draw from the entry's
parameter distribution) for a fixed number of steps with uniformly random actions, under one
jitted scan, and averages the returns of every episode that completed. Results go to
``tasks/calibration.lock.yaml`` with how they were measured.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from metabench.spec import CALIBRATION_FILE, EnvSpec, TaskSpec, TASKS_DIR

MAX_STEPS = 4000


def random_return(spec: EnvSpec, num_envs: int = 64, seed: int = 0) -> dict[str, Any]:
    """Mean, std and count of completed-episode returns under a uniform random policy."""
    env, base, sampler = spec.make()
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
    agents = int(getattr(env, "num_agents", 1))
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


def calibrate(task: TaskSpec, force: bool = False, tasks_dir: Path | None = None,
              log=print) -> dict[str, Any]:
    """Measures every env entry of ``task`` not yet in the lock file (all with ``force``)."""
    path = (tasks_dir or TASKS_DIR) / CALIBRATION_FILE
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    data = data or {}
    envs = dict(data.get("envs", {}))
    for split in ("train", "test"):
        for e in task.split(split):
            key = e.calibration_key()
            if key in envs and not force:
                log(f"{key}: {envs[key]['random']} (already calibrated)")
                continue
            m = random_return(e)
            m["measured"] = datetime.date.today().isoformat()
            envs[key] = m
            log(f"{key}: {m['random']} +- {m['std']} over {m['episodes']} episodes")
    out = {"envs": dict(sorted(envs.items()))}
    header = ("# Uniform-random policy returns, written by `metabench calibrate TASK`.\n"
              "# Keys are '<env id> <params distribution>'; tasks refer to them with\n"
              "# `normalise: {random: calibrated}`. Do not edit by hand.\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(out, sort_keys=True, width=100))
    tmp.replace(path)
    return out
