"""``metabench bench``: the harness's training speed next to a minimal single-file PPO.

Both train PPO with the same hyperparameters (PureJaxRL's CartPole settings: 4 envs x 128
steps, 4 epochs x 4 minibatches, 64x64 tanh MLPs) on the same gymnax env in one process, after
compiling; the table reports env steps per second of each (the median of ``repeats``
interleaved runs) and their ratio. :mod:`metabench.minimal_ppo` is the yardstick: it imports nothing from metabench.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from metabench import harness, minimal_ppo
from metabench.families import drift
from metabench.spec import Budget, EnvSpec, Normalise, Scoring, TaskSpec

DEFAULT_ENVS = ("gymnax/CartPole-v1", "gymnax/Breakout-MinAtar")
DEFAULT_STEPS = {"gymnax/CartPole-v1": 500_000, "gymnax/Breakout-MinAtar": 200_000}
QUICK_STEPS = 50_000


def _task(env_id: str, total_timesteps: int, cfg: drift.Config, seeds: int) -> TaskSpec:
    env = EnvSpec(env_id.split("/", 1)[1], env_id, {}, Normalise(0.0, 1.0, False), {})
    return TaskSpec(id="bench", description="", train=(env,), test=(env,),
                    total_timesteps=total_timesteps, agents={"drift": dataclasses.asdict(cfg)},
                    budget=Budget(seeds=seeds, max_seconds_per_env=1e9),
                    scoring=Scoring("final_return", 0.05, "iqm", 100, 0, {"drift": "ppo_clip"}),
                    seed=0, path="<bench>")


def bench_env(env_id: str, total_timesteps: int, seeds: int = 1, repeats: int = 5) -> dict:
    """One row: minimal PPO and the harness (ppo_clip) on ``env_id``.

    Runs alternate (minimal, harness, minimal, ...) so that both see the same machine load,
    and each reports its median over ``repeats`` (single runs vary by about 10% here).
    """
    mcfg = minimal_ppo.Config(env_name=env_id.split("/", 1)[1], total_timesteps=total_timesteps)
    init, run_fn = minimal_ppo.make_init(mcfg), minimal_ppo.make_run(mcfg)
    rngs = jax.random.split(jax.random.PRNGKey(0), seeds)
    t0 = time.perf_counter()
    minimal = jax.jit(lambda k: jax.vmap(run_fn)(jax.lax.map(init, k))).lower(rngs).compile()
    minimal_compile_s = time.perf_counter() - t0
    minimal_steps = seeds * mcfg.num_updates * mcfg.num_envs * mcfg.num_steps

    cfg = drift.Config(num_envs=mcfg.num_envs, rollout_len=mcfg.num_steps,
                       epochs=mcfg.update_epochs, minibatches=mcfg.num_minibatches, lr=mcfg.lr,
                       gamma=mcfg.gamma, gae_lambda=mcfg.gae_lambda, ent_coef=mcfg.ent_coef,
                       vf_coef=mcfg.vf_coef, value_clip=mcfg.clip_eps,
                       max_grad_norm=mcfg.max_grad_norm, hidden=(mcfg.hidden, mcfg.hidden))
    task = _task(env_id, total_timesteps, cfg, seeds)
    ref = harness.reference_rule("ppo_clip")
    first = harness.train_env(ref, task, task.test[0], range(seeds))  # compiles
    minimal_sps, harness_sps = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(minimal(rngs))
        minimal_sps.append(minimal_steps / (time.perf_counter() - t0))
        harness_sps.append(harness.train_env(ref, task, task.test[0], range(seeds)).env_steps_per_s)
    minimal_sps, harness_sps = float(np.median(minimal_sps)), float(np.median(harness_sps))
    return {
        "env": env_id, "seeds": seeds,
        "env_steps_per_seed": first.updates_done * first.steps_per_update,
        "minimal_steps_per_s": minimal_sps, "harness_steps_per_s": harness_sps,
        "ratio": harness_sps / minimal_sps, "repeats": repeats,
        "minimal_compile_s": minimal_compile_s, "harness_compile_s": first.compile_s,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    }


def run(env_id: Sequence[str] | None = None, total_timesteps: float | None = None,
        seeds: int = 1, quick: bool = False) -> list[dict]:
    rows = []
    for e in env_id or DEFAULT_ENVS:
        steps = int(total_timesteps or (QUICK_STEPS if quick else DEFAULT_STEPS.get(e, 200_000)))
        rows.append(bench_env(e, steps, seeds=seeds, repeats=1 if quick else 5))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'env':26s} {'seeds':>5s} {'steps/seed':>10s} {'minimal PPO':>12s} "
            f"{'harness':>12s} {'ratio':>6s} {'compile min/harness':>20s}")
    lines = [f"env steps per second, PPO, 4 envs x 128 steps, median of {rows[0]['repeats']} "
             f"interleaved runs ({rows[0]['device']})" if rows else "", head]
    for r in rows:
        lines.append(f"{r['env']:26s} {r['seeds']:>5d} {r['env_steps_per_seed']:>10,d} "
                     f"{r['minimal_steps_per_s']:>12,.0f} {r['harness_steps_per_s']:>12,.0f} "
                     f"{r['ratio']:>6.2f} {r['minimal_compile_s']:>9.1f}s/{r['harness_compile_s']:.1f}s")
    return "\n".join(lines)
