"""``metabench bench``: the harness's training speed next to a minimal single-file
implementation of each family's baseline and next to the bare environment.

Each pair trains with the same hyperparameters on the same gymnax env in one process, after
compiling; the table reports env steps per second of each (the median of ``repeats``
interleaved runs) and their ratio, beside the env alone stepped with random actions on as many
copies (the ceiling). Several seed counts measure scaling with seeds, several device counts
(``METABENCH_DEVICES``) the harness's scaling with devices. The yardsticks import nothing from
metabench: :mod:`~metabench.bench.twins.ppo` (drift, ``ppo_clip``),
:mod:`~metabench.bench.twins.dqn` (td_loss, ``dqn``), :mod:`~metabench.bench.twins.epg` (epg,
``reinforce``),
:mod:`~metabench.bench.twins.metagrad` (metagrad, ``metagrad_gamma``) and
:mod:`~metabench.bench.twins.lpg` (lpg, ``actor_critic``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metabench import harness
from metabench.scoring import final_window_return
from metabench.bench.twins import dqn as minimal_dqn
from metabench.bench.twins import epg as minimal_epg
from metabench.bench.twins import lpg as minimal_lpg
from metabench.bench.twins import metagrad as minimal_metagrad
from metabench.bench.twins import ppo as minimal_ppo
from metabench.families import drift, epg, lpg, metagrad, td_loss
from metabench.tasks.spec import Budget, EnvSpec, Normalise, Scoring, TaskSpec

DEFAULT_ENVS = ("gymnax/CartPole-v1", "gymnax/Breakout-MinAtar")
DEFAULT_STEPS = {"ppo": {"gymnax/CartPole-v1": 500_000, "gymnax/Breakout-MinAtar": 200_000},
                 "dqn": {"gymnax/CartPole-v1": 500_000, "gymnax/Breakout-MinAtar": 100_000},
                 "epg": {"gymnax/CartPole-v1": 500_000, "gymnax/Breakout-MinAtar": 200_000},
                 "metagrad": {"gymnax/CartPole-v1": 500_000,
                              "gymnax/Breakout-MinAtar": 200_000},
                 "lpg": {"gymnax/CartPole-v1": 500_000, "gymnax/Breakout-MinAtar": 200_000}}
QUICK_STEPS = 50_000


def _task(env_id: str, total_timesteps: int, family: str, cfg: Any, seeds: int) -> TaskSpec:
    env = EnvSpec(env_id.split("/", 1)[1], env_id, {}, Normalise(0.0, 1.0, False), {})
    return TaskSpec(id="bench", description="", train=(env,), test=(env,),
                    total_timesteps=total_timesteps, agents={family: dataclasses.asdict(cfg)},
                    budget=Budget(seeds=seeds, max_seconds_per_env=1e9),
                    scoring=Scoring("final_return", 0.05, "iqm", 100, 0,
                                    {"drift": "ppo_clip", "td_loss": "dqn"}),
                    seed=0, path="<bench>")


class Pair(NamedTuple):
    """A minimal single-file implementation and the harness configured identically."""

    module: Any  # minimal_ppo or minimal_dqn
    config: Any  # its Config
    env_steps: int  # env steps one minimal run takes
    family: str
    harness_config: Any
    rule: str


def ppo_pair(env_name: str, total_timesteps: int) -> Pair:
    m = minimal_ppo.Config(env_name=env_name, total_timesteps=total_timesteps)
    cfg = drift.Config(num_envs=m.num_envs, rollout_len=m.num_steps, epochs=m.update_epochs,
                       minibatches=m.num_minibatches, lr=m.lr, gamma=m.gamma,
                       gae_lambda=m.gae_lambda, ent_coef=m.ent_coef, vf_coef=m.vf_coef,
                       value_clip=m.clip_eps, max_grad_norm=m.max_grad_norm,
                       hidden=(m.hidden, m.hidden))
    return Pair(minimal_ppo, m, m.num_updates * m.num_envs * m.num_steps, "drift", cfg,
                "ppo_clip")


def dqn_pair(env_name: str, total_timesteps: int) -> Pair:
    m = minimal_dqn.Config(env_name=env_name, total_timesteps=total_timesteps)
    cfg = td_loss.Config(num_envs=m.num_envs, buffer_size=m.buffer_size,
                         batch_size=m.batch_size, eps_start=m.eps_start, eps_end=m.eps_end,
                         eps_decay_steps=m.eps_decay_steps,
                         target_update_period=m.target_update_period, lr=m.lr,
                         learning_starts=m.learning_starts, train_every=m.train_every,
                         gamma=m.gamma, hidden=tuple(m.hidden), max_grad_norm=m.max_grad_norm)
    return Pair(minimal_dqn, m, (total_timesteps // m.num_envs) * m.num_envs, "td_loss", cfg,
                "dqn")


def epg_pair(env_name: str, total_timesteps: int) -> Pair:
    m = minimal_epg.Config(env_name=env_name, total_timesteps=total_timesteps)
    cfg = epg.Config(num_envs=m.num_envs, rollout_len=m.rollout_len, epochs=m.epochs,
                     minibatches=m.minibatches, lr=m.lr, anneal_lr=m.anneal_lr,
                     max_grad_norm=m.max_grad_norm, network="mlp", hidden=tuple(m.hidden),
                     activation=m.activation)
    # reinforce's gamma, ent_coef and vf_coef are the rule's defaults, which minimal_epg's
    # tests pin to its Config's.
    return Pair(minimal_epg, m, m.num_updates * m.num_envs * m.rollout_len, "epg", cfg,
                "reinforce")


def metagrad_pair(env_name: str, total_timesteps: int) -> Pair:
    m = minimal_metagrad.Config(env_name=env_name, total_timesteps=total_timesteps)
    cfg = metagrad.Config(num_envs=m.num_envs, rollout_len=m.rollout_len, lr=m.lr,
                          max_grad_norm=m.max_grad_norm, ent_coef=m.ent_coef,
                          vf_coef=m.vf_coef, meta_lr=m.meta_lr, gamma_bar=m.gamma_bar,
                          lambda_bar=m.lambda_bar, network="mlp", hidden=tuple(m.hidden),
                          activation=m.activation)
    # metagrad_gamma's defaults (gamma 0.99, lambda 0.95) are m.gamma and m.lambda_.
    return Pair(minimal_metagrad, m, m.num_updates * m.num_envs * m.rollout_len,
                "metagrad", cfg, "metagrad_gamma")


def lpg_pair(env_name: str, total_timesteps: int) -> Pair:
    m = minimal_lpg.Config(env_name=env_name, total_timesteps=total_timesteps)
    cfg = lpg.Config(num_envs=m.num_envs, rollout_len=m.rollout_len, lr=m.lr,
                     optimiser=m.optimiser, alpha_y=m.alpha_y, ent_coef=m.ent_coef,
                     gamma=m.gamma, max_grad_norm=m.max_grad_norm, network="mlp",
                     hidden=tuple(m.hidden))
    # actor_critic's gae_lambda and v_max are the rule's defaults, which minimal_lpg's tests
    # pin to its Config's (as they pin num_bins to lpg.PRED_DIM).
    return Pair(minimal_lpg, m, m.num_updates * m.num_envs * m.rollout_len, "lpg", cfg,
                "actor_critic")


PAIRS = {"ppo": ppo_pair, "dqn": dqn_pair, "epg": epg_pair, "metagrad": metagrad_pair,
         "lpg": lpg_pair}
"""``--algo`` name -> the pair: ppo (drift: ppo_clip), dqn (td_loss: dqn), epg (epg:
reinforce), metagrad (metagrad: metagrad_gamma), lpg (lpg: actor_critic)."""


@contextlib.contextmanager
def _devices(n: int | None):
    """``METABENCH_DEVICES=n`` for the harness inside (None: leave it as it is)."""
    old = os.environ.get("METABENCH_DEVICES")
    if n is not None:
        os.environ["METABENCH_DEVICES"] = str(n)
    try:
        yield
    finally:
        if n is not None:
            if old is None:
                os.environ.pop("METABENCH_DEVICES", None)
            else:
                os.environ["METABENCH_DEVICES"] = old


def _random_actions(env: Any, params: Any, n: int, length: int):
    """``key -> reward sum``: ``length`` random-action steps of ``n`` copies in one scan."""
    space = env.action_space(params)
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def run(key):
        k_reset, k_run = jax.random.split(key)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, n), params)

        def body(carry, key):
            state, total = carry
            k_act, k_step = jax.random.split(key)
            action = jax.vmap(space.sample)(jax.random.split(k_act, n))
            _, state, reward, *_ = step(jax.random.split(k_step, n), state, action, params)
            return (state, total + jnp.sum(reward)), None

        (_, total), _ = jax.lax.scan(body, (state, 0.0), jax.random.split(k_run, length))
        return total

    return run


def _env_only(env: Any, params: Any, n: int, length: int, repeats: int) -> tuple[float, float]:
    """``(compile_s, steps_per_s)`` of :func:`_random_actions`, the median of ``repeats``."""
    t0 = time.perf_counter()
    fn = jax.jit(_random_actions(env, params, n, length)).lower(jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.PRNGKey(i)))
        times.append(time.perf_counter() - t0)
        env.release()  # host-stepped: the next repeat reuses these copies
    return compile_s, n * length / float(np.median(times))


def bare_env(env_id: str, num_envs: int, seeds: int, env_steps: int,
             repeats: int = 5) -> float:
    """Env steps per second of the environment alone: uniformly random actions on ``num_envs``
    x ``seeds`` copies under one jit + vmap + scan, the ceiling any trainer can approach."""
    from metabench.envs import make

    env, params = make(env_id)
    length = max(1, env_steps // num_envs)
    return _env_only(env, params, num_envs * seeds, length, repeats)[1]


def backend_rows(entries: Sequence[tuple], num_envs: int = 128,
                 steps: int = 200, repeats: int = 3) -> list[dict]:
    """Env-only speed of each ``(label, env_id, params[, num_envs])``: compile seconds and
    random-action env steps per second of ``num_envs`` copies for ``steps`` steps under jit +
    vmap + scan. ``params`` go to ``make`` (e.g. ``{"backend": "generalized"}`` for a brax
    physics, ``{"vectorization": "async"}`` for gymnasium). Copies are rounded up to whole
    games for multi-agent envs; host-stepped envs are released after each measurement."""
    from metabench.envs import make

    rows = []
    for label, env_id, params, *n in entries:
        env, env_params = make(env_id, **params)
        agents = env.num_agents
        copies = -(-(n[0] if n else num_envs) // agents) * agents
        compile_s, sps = _env_only(env, env_params, copies, steps, repeats)
        env.close()
        rows.append({"label": label, "env": env_id, "params": dict(params),
                     "num_envs": copies, "steps": steps, "repeats": repeats,
                     "compile_s": compile_s, "steps_per_s": sps,
                     "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"})
    return rows


def backend_entries(env_ids: Sequence[str], num_envs: int = 128,
                    async_envs: int = 8) -> list[tuple]:
    """``backend_rows`` entries: every brax physics backend for brax ids, gymnasium's sync and
    async vectorisation for gymnasium ids (async with ``async_envs`` subprocesses, and sync
    again at that size to compare), one entry for anything else."""
    from metabench.envs import brax as brax_envs

    entries: list[tuple] = []
    for env_id in env_ids:
        if env_id.startswith("brax/"):
            entries += [(f"{env_id} {b}", env_id, {"backend": b}) for b in brax_envs.BACKENDS]
        elif env_id.startswith("gymnasium/"):
            entries += [(f"{env_id} sync", env_id, {}, num_envs),
                        (f"{env_id} sync", env_id, {}, async_envs),
                        (f"{env_id} async", env_id, {"vectorization": "async"}, async_envs)]
        else:
            entries.append((env_id, env_id, {}))
    return entries


def format_backend_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"env only: random actions, {r0['steps']} steps per copy under jit + vmap + scan, "
             f"median of {r0['repeats']} ({r0['device']})",
             f"{'env':44s} {'copies':>6s} {'compile':>8s} {'env steps/s':>12s}"]
    lines += [f"{r['label']:44s} {r['num_envs']:>6d} {r['compile_s']:>7.1f}s "
              f"{r['steps_per_s']:>12,.0f}" for r in rows]
    return "\n".join(lines)


def final_return(returns_sum: Any, episodes: Any) -> float:
    """Mean over seeds of the final return the leaderboard scores
    (:func:`metabench.scoring.final_window_return` over the last 5% of updates) from
    ``[seeds, updates]`` or ``[updates]`` sums and counts: the same measure for both sides."""
    returns_sum = np.atleast_2d(np.asarray(returns_sum, np.float64))
    episodes = np.atleast_2d(np.asarray(episodes, np.float64))
    return float(np.mean([final_window_return(r, e, 0.05) for r, e in zip(returns_sum, episodes)]))


_MINIMAL: dict[tuple, tuple[Any, float]] = {}


def _minimal_compiled(module: Any, config: Any, seeds: int) -> tuple[Any, float]:
    """The minimal implementation's training, init mapped and run vmapped over ``seeds``,
    compiled once per (module, config, seeds) like the harness's cells; and its compile
    seconds."""
    key = (module.__name__, config, seeds)
    if key not in _MINIMAL:
        init, run_fn = module.make_init(config), module.make_run(config)
        rngs = jax.random.split(jax.random.PRNGKey(0), seeds)
        t0 = time.perf_counter()
        fn = jax.jit(lambda k: jax.vmap(run_fn)(jax.lax.map(init, k))).lower(rngs).compile()
        _MINIMAL[key] = (fn, time.perf_counter() - t0)
    return _MINIMAL[key]


def bench_env(env_id: str, total_timesteps: int, seeds: int = 1, repeats: int = 5,
              algo: str = "ppo", devices: int | None = None) -> dict:
    """One row: the minimal implementation and the harness (``PAIRS[algo]``) on ``env_id``.

    Runs alternate (minimal, harness, minimal, ...) so that both see the same machine load,
    and each reports its median over ``repeats`` (single runs vary by about 10% here). The
    harness shards seeds over the first ``devices`` local devices (all when None); the
    minimal implementation always runs on one.
    """
    with _devices(devices):
        return _bench_env(env_id, total_timesteps, seeds, repeats, algo)


def _bench_env(env_id: str, total_timesteps: int, seeds: int, repeats: int,
               algo: str) -> dict:
    pair = PAIRS[algo](env_id.split("/", 1)[1], total_timesteps)
    minimal, minimal_compile_s = _minimal_compiled(pair.module, pair.config, seeds)

    task = _task(env_id, total_timesteps, pair.family, pair.harness_config, seeds)
    # The harness's keys for these seeds: the epg, metagrad and lpg twins draw from a key
    # what their family draws, so both sides then train the same agents (equal returns).
    rngs = harness.seed_keys(task.seed, range(seeds))
    ref = harness.reference_rule(pair.rule)
    first = harness.train_env(ref, task, task.test[0], range(seeds))  # compiles
    minimal_sps, harness_sps = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        metrics = jax.block_until_ready(minimal(rngs))
        minimal_sps.append(seeds * pair.env_steps / (time.perf_counter() - t0))
        harness_sps.append(harness.train_env(ref, task, task.test[0], range(seeds)).env_steps_per_s)
    # Each repeat's pair ran back to back, so its ratio is the measure least moved by the
    # machine's drift; their spread says how far to trust the median's ratio.
    paired = np.asarray(harness_sps) / np.asarray(minimal_sps)
    minimal_sps, harness_sps = float(np.median(minimal_sps)), float(np.median(harness_sps))
    num_envs = pair.config.num_envs
    env_sps = bare_env(env_id, num_envs, seeds, first.updates_done * first.steps_per_update,
                       repeats)
    return {
        "algo": algo, "env": env_id, "seeds": seeds,
        "env_steps_per_seed": first.updates_done * first.steps_per_update,
        "minimal_steps_per_s": minimal_sps, "harness_steps_per_s": harness_sps,
        "ratio": harness_sps / minimal_sps,
        "ratio_range": [float(paired.min()), float(paired.max())], "repeats": repeats,
        "env_only_steps_per_s": env_sps,
        "num_envs": num_envs,
        "minimal_compile_s": minimal_compile_s, "harness_compile_s": first.compile_s,
        # Both sides' mean episode return over the last 5% of training, by one formula: a
        # speed comparison only means something if both learn alike.
        "minimal_final_return": final_return(metrics["returns_sum"], metrics["episodes"]),
        "harness_final_return": final_return(first.returns_sum, first.episodes),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "devices": len(harness.devices()),
    }


def run(env_id: Sequence[str] | None = None, total_timesteps: float | None = None,
        seeds: int | Sequence[int] = 1, quick: bool = False,
        algos: Sequence[str] = tuple(PAIRS), devices: Sequence[int | None] = (None,)
        ) -> list[dict]:
    """One row per (algo, env, device count, seed count): several seed or device counts
    measure scaling."""
    rows = []
    for algo in algos:
        if algo not in PAIRS:
            raise ValueError(f"no minimal implementation for algo {algo!r}; known: "
                             f"{', '.join(PAIRS)}")
        for e in env_id or DEFAULT_ENVS:
            default = DEFAULT_STEPS[algo].get(e, 200_000)
            steps = int(total_timesteps or (QUICK_STEPS if quick else default))
            for d in devices:
                for n in ([seeds] if isinstance(seeds, int) else seeds):
                    rows.append(bench_env(e, steps, seeds=int(n), repeats=1 if quick else 5,
                                          algo=algo, devices=d))
    return rows


def export_row(env_id: str, total_timesteps: int, algo: str, seeds: int = 1,
               repeats: int = 5) -> dict:
    """One row of ``bench --export``: the family's baseline trained in-process and through
    its ``jax.export`` (as a submitted rule reaches the scorer), interleaved as in
    :func:`bench_env`, on the pair's harness config."""
    import tempfile
    from pathlib import Path

    from metabench.families import base as families_base
    from metabench.submissions import export

    pair = PAIRS[algo](env_id.split("/", 1)[1], total_timesteps)
    task = _task(env_id, total_timesteps, pair.family, pair.harness_config, seeds)
    ref = harness.reference_rule(pair.rule)
    with tempfile.TemporaryDirectory(prefix="metabench-bench-export-") as tmp:
        sigs = export.call_signatures(pair.family, ref.rule, ref.meta_params, task, "test")
        order = families_base.get_family(pair.family).rule_vjp_order
        export.export_rule(ref.rule, ref.meta_params, sigs, order, ["cpu"], Path(tmp))
        loaded = export.load(tmp, pair.family, jax.default_backend())
    eref = dataclasses.replace(ref, rule=loaded.rule, meta_params=loaded.meta_params)
    env = task.test[0]
    firsts = [harness.train_env(r, task, env, range(seeds)) for r in (ref, eref)]  # compile
    sps: list[list[float]] = [[], []]
    for _ in range(repeats):
        for k, r in enumerate((ref, eref)):
            sps[k].append(harness.train_env(r, task, env, range(seeds)).env_steps_per_s)
    paired = np.asarray(sps[1]) / np.asarray(sps[0])
    med = [float(np.median(x)) for x in sps]
    return {"algo": algo, "rule": pair.rule, "env": env_id, "seeds": seeds,
            "repeats": repeats, "in_process_steps_per_s": med[0], "exported_steps_per_s": med[1],
            "ratio": med[1] / med[0], "ratio_range": [float(paired.min()), float(paired.max())],
            "in_process_compile_s": firsts[0].compile_s, "exported_compile_s": firsts[1].compile_s,
            "same_returns": bool(np.array_equal(firsts[0].returns_sum, firsts[1].returns_sum)),
            "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"}


TIME_TO_SCORE_TASK = "classic-transfer-v1-quick"


def time_to_score(folders: Sequence[str], task: str = TIME_TO_SCORE_TASK,
                  cache_dir: str | None = None) -> list[dict]:
    """Two rows per submission folder: a fresh ``metabench submit`` with a compilation cache
    that has never seen the rule (an empty one), then a re-score (``--force``) with the
    cache it filled; each split into the command's own start and finish, the sandboxed
    check, and the scoring child's start, imports, compiling and training (the record's
    ``timing`` block). Each submit is a process of its own, as a user runs it."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    rows = []
    for folder in folders:
        with tempfile.TemporaryDirectory(prefix="metabench-tts-") as tmp:
            env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
            env["METABENCH_COMPILATION_CACHE"] = cache_dir or str(Path(tmp) / "cache")
            env["METABENCH_KEY"] = str(Path(tmp) / "no-key.pem")  # unsigned: nothing to load
            for kind in ("new", "re-score"):
                cmd = [sys.executable, "-c", "import sys; from metabench.cli import main; "
                       "sys.exit(main(sys.argv[1:]))", "submit", str(folder), "--task", task,
                       "--results", str(Path(tmp) / "results"), "--force"]
                t0 = time.perf_counter()
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if out.returncode != 0:
                    raise RuntimeError(f"{folder}: submit failed: {out.stderr[-2000:]}")
                rec_path = next((Path(tmp) / "results").rglob("*.json"))
                rec = json.loads(rec_path.read_text())
                t = rec.get("timing") or {}
                child = sum(t.get(k, 0.0) for k in ("start_s", "import_s", "compile_s",
                                                     "train_s"))
                rows.append({"rule": rec["rule"]["name"], "family": rec["rule"]["family"],
                             "run": kind, "task": task, "wall_s": wall,
                             "command_s": wall - t.get("check_s", 0.0) - child, **t,
                             "iqm": rec["aggregates"]["iqm"]["point"],
                             "device": rec["provenance"]["device"]["kind"]})
    return rows


def format_time_to_score(rows: Sequence[dict]) -> str:
    cols = ("wall_s", "command_s", "check_s", "start_s", "import_s", "compile_s", "train_s")
    lines = [f"{'rule':16s} {'run':9s} " + " ".join(f"{c[:-2]:>8s}" for c in cols)
             + f" {'IQM':>6s}"]
    for r in rows:
        lines.append(f"{r['rule']:16s} {r['run']:9s} "
                     + " ".join(f"{r.get(c, float('nan')):8.1f}" for c in cols)
                     + f" {r['iqm']:6.3f}")
    return "\n".join(lines)


def format_export_table(rows: Sequence[dict]) -> str:
    lines = [f"env steps per second after compilation, median of {rows[0]['repeats']} "
             f"interleaved runs ({rows[0]['device']})" if rows else "",
             f"{'rule':16s} {'env':22s} {'in-process':>12s} {'exported':>12s} "
             f"{'ratio (range)':>19s} {'compile in/exp':>15s} {'same returns':>12s}"]
    for r in rows:
        lines.append(
            f"{r['rule']:16s} {r['env']:22s} {r['in_process_steps_per_s']:12,.0f} "
            f"{r['exported_steps_per_s']:12,.0f} {r['ratio']:6.2f} "
            f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) "
            f"{r['in_process_compile_s']:6.1f}/{r['exported_compile_s']:<6.1f}s "
            f"{'yes' if r['same_returns'] else 'no':>12s}")
    return "\n".join(lines)


def format_table(rows: Sequence[dict]) -> str:
    head = (f"{'algo':8s} {'env':26s} {'dev':>3s} {'seeds':>5s} {'steps/seed':>10s} "
            f"{'env only':>12s} {'minimal':>12s} {'harness':>12s} {'ratio (range)':>17s} "
            f"{'compile min/harness':>20s} {'return min/harness':>19s}")
    lines = [f"env steps per second after compilation, median of {rows[0]['repeats']} "
             f"interleaved runs ({rows[0]['device']})" if rows else "", head]
    for r in rows:
        lines.append(f"{r['algo']:8s} {r['env']:26s} {r.get('devices', 1):>3d} {r['seeds']:>5d} "
                     f"{r['env_steps_per_seed']:>10,d} "
                     f"{r['env_only_steps_per_s']:>12,.0f} "
                     f"{r['minimal_steps_per_s']:>12,.0f} {r['harness_steps_per_s']:>12,.0f} "
                     f"{_ratio(r):>17s} "
                     f"{_pair(r['minimal_compile_s'], r['harness_compile_s'], 's'):>20s} "
                     f"{_pair(r['minimal_final_return'], r['harness_final_return']):>19s}")
    return "\n".join(lines)


def _ratio(r: dict) -> str:
    lo, hi = r["ratio_range"]
    return f"{r['ratio']:.2f}" + (f" ({lo:.2f}-{hi:.2f})" if r["repeats"] > 1 else "")


def _pair(a: float, b: float, unit: str = "") -> str:
    return f"{a:.1f}{unit}/{b:.1f}{unit}"


_SERIES = (("env only", "env_only_steps_per_s", "#7f7f7f"),
           ("minimal", "minimal_steps_per_s", "#1f77b4"),
           ("harness", "harness_steps_per_s", "#d62728"))


def plot_html(rows: Sequence[dict]) -> str:
    """A self-contained HTML page: per (algo, env), env steps per second of the env alone,
    the minimal implementation and the harness against the number of seeds (log-log)."""
    from metabench.site.svg import Series, esc, svg_lines

    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["algo"], r["env"], r.get("devices", 1)), []).append(r)
    figures = []
    for (algo, env, devs), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seeds"])
        x = np.log2([r["seeds"] for r in rs])
        series = [Series(label, colour, x, np.log10([r[key] for r in rs]), 2.2,
                         markers=True)
                  for label, key, colour in _SERIES]
        on = f"{rs[0]['device']}" + (f" x {devs}" if devs > 1 else "")
        figures.append(svg_lines(f"{algo} on {env} ({on})", series,
                                 "log2 seeds", "log10 env steps per second"))
    legend = " ".join(f'<span style="color:{c}">&#9632;</span> {esc(label)}'
                      for label, _, c in _SERIES)
    table = esc(format_table(rows))
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>metabench bench</title>"
            "</head><body style=\"font-family:sans-serif\"><h1>metabench bench</h1>"
            f"<p>{legend}</p>{''.join(figures)}<pre>{table}</pre></body></html>\n")
