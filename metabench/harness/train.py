"""The training engine: fresh agents trained with a rule on a task's environments.

Per environment it compiles ``init`` (mapped over seeds with ``lax.map``: a vmapped flax
orthogonal initialiser, a batched QR, can deadlock XLA's CPU thread pool) and a chunk of
``step`` vmapped over seeds, once per (family, env, config, rule structure). Meta-parameters
are an argument of the compiled call, so another rule of the same structure reuses it. The
chunks are short (about 1% of training each, one compiled shape) and are dispatched back to
back without waiting; the harness waits for their results only every ``CHUNK_SECONDS`` or so
(measured as it goes), so a progress line moves and the wall-clock budget is enforced every
few seconds, whatever the workload, while the device never idles between chunks. Nothing in
the inner loop returns to Python.

What it returns is measurements (:class:`EnvRun`): :mod:`metabench.harness.records` turns them
into a scored record and :mod:`metabench.harness.origin` says where that record came from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metabench.caches import compilation_cache_dir
from metabench.envs.oracle import level_randoms, level_references
from metabench.families import base as families_base
from metabench.rules import UpdateRule, tree_structure
from metabench.tasks.spec import EnvSpec, TaskSpec, agent_config, make_env


@dataclasses.dataclass(frozen=True)
class RuleRef:
    """A rule together with what a record says about it."""

    name: str
    """Display name (a reference rule's name or a submission's)."""
    family: str
    """Family name."""
    rule: UpdateRule
    """The rule."""
    meta_params: Any
    """Its meta-parameters."""
    factory: str = ""
    """How it was built, e.g. ``drift.ppo_clip``."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    """Factory keyword arguments."""
    note: str = ""
    """Caveats shown with scores, e.g. that the parameters are untrained."""


def reference_rule(name: str, **kwargs: Any) -> RuleRef:
    """A family's reference rule by name, with its default (or shipped) meta-parameters."""
    info = families_base.find_rule(name)
    rule = info.factory(**kwargs)
    if info.default_params is not None:
        meta_params, note = info.default_params(rule)
    else:
        meta_params, note = rule.init(jax.random.PRNGKey(0)), ""
    return RuleRef(name, info.family, rule, meta_params,
                   f"{info.family}.{info.factory.__name__}", tuple(sorted(kwargs.items())), note)


@dataclasses.dataclass
class EnvRun:
    """Everything measured for one environment: per-seed metrics and timings."""

    spec: EnvSpec
    seeds: list[int]
    returns_sum: np.ndarray  # [seeds, updates_done]
    episodes: np.ndarray  # [seeds, updates_done]
    loss: np.ndarray  # [seeds, updates_done]
    steps_per_update: int
    num_updates: int
    compile_s: float
    run_s: float
    failure: str | None = None  # a reason that applies to every seed
    # Per-update named scalars (Metrics.traces): name -> [seeds, updates_done].
    traces: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    memory: dict = dataclasses.field(default_factory=dict)  # see memory_usage()
    # Multi-agent envs: per seed, the finished games' team and per-agent returns
    # (pettingzoo.GamePool.episode_log plus the agent names), or None.
    agent_log: list[dict] | None = None
    # Per-level references (normalise.reference optimal / oracle): one per seed, measured on
    # the env params that seed trained on; None when the reference is fixed or unknown.
    references: list[float] | None = None
    reference_error: str | None = None
    # With a per-level reference, the random policy's return on each seed's level too.
    randoms: list[float] | None = None
    # The training call never compiled (the rule failed to trace or lower): nothing ran, and
    # no other candidate or seed of the same call can fare better.
    failed_to_compile: bool = False

    @property
    def updates_done(self) -> int:
        return int(self.returns_sum.shape[1]) if self.returns_sum.ndim == 2 else 0

    @property
    def env_steps_per_s(self) -> float:
        steps = len(self.seeds) * self.updates_done * self.steps_per_update
        return steps / self.run_s if self.run_s > 0 else float("nan")


# --- compiled pieces, cached ---------------------------------------------------------------

_CACHE: dict[tuple, tuple] = {}

CACHE_MAX_BYTES = 4 * 2**30
"""The cache's size bound. A bound also makes JAX take a file lock around every read and
write, which is what makes the cache safe for scoring processes running side by side
(without one it writes entries in place, and a reader could see half of one)."""


def use_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache, so that re-scoring a rule, and every
    baseline in ``make run``, loads its compiled programs instead of compiling them again;
    returns its folder (None when turned off). A ``JAX_COMPILATION_CACHE_DIR`` the user set
    wins; else ``$METABENCH_COMPILATION_CACHE`` when it is a path, else
    ``$XDG_CACHE_HOME/metabench/xla`` (``~/.cache/metabench/xla``). The cache's keys cover
    the program, the compile options, XLA flags, the JAX version and the device, so a hit
    is the program that would have been compiled."""
    path = compilation_cache_dir()
    if path is None:
        return None
    path = jax.config.jax_compilation_cache_dir or path
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path


CHUNK_SECONDS = 3.0
"""Wall-clock seconds between the harness's looks at a run (progress, budget, failures)."""
MIN_CHUNK_ENV_STEPS = 1 << 16
"""Env steps (over all of a call's agents) below which a chunk is not cut: tinier chunks
cost more in dispatch than they give in responsiveness."""


def _chunk_len(num_updates: int, target_chunks: int = 100, min_len: int = 1) -> int:
    """About ``max(num_updates / target_chunks, min_len)`` updates (at most all of them); the
    last chunk may be shorter, run by the same program (its trip count is an argument)."""
    return min(num_updates, max(1, math.ceil(num_updates / target_chunks), min_len))


class Compiled(NamedTuple):
    """One cell's compiled pieces (see :func:`compiled`)."""

    trainer: Any
    init_fn: Callable
    chunk_fn: Callable
    env: Any
    """The env the trainer steps; host-stepped envs are released after every run."""


def compiled(family: families_base.Family, spec: EnvSpec, config: Any, rule: UpdateRule,
             meta_params: Any, total_timesteps: int, population: bool = False):
    """``Compiled(trainer, init_fn, chunk_fn, env)`` for this cell, built once; ``chunk_fn(length, states,
    meta_params)`` returns the compiled chunk, compiling it on first use only.

    With ``population``, meta-parameters carry a leading candidate axis ``K`` and states are
    ``[K, seeds, ...]``: K rules of one structure train in one call (a search's population).
    """
    key = (family.name, spec.calibration_key(), config, int(total_timesteps), rule,
           tree_structure(meta_params), population)
    if key not in _CACHE:
        env, _, sampler = make_env(spec)
        trainer = family.make_train(env, config, rule, total_timesteps=total_timesteps,
                                    sample_params=sampler)

        def init(rngs):
            flat = rngs.reshape((-1,) + rngs.shape[-1:])
            states = jax.lax.map(trainer.init, flat)
            return jax.tree_util.tree_map(lambda x: x.reshape(rngs.shape[:-1] + x.shape[1:]),
                                          states)

        init_fn = jax.jit(init)
        executables: dict[tuple, Any] = {}

        def run(states, mp, start, count, length):
            # A loop of ``count`` (<= length) updates writing into a [length] buffer, not a
            # scan of ``length``: a run's last, shorter chunk then needs no program of its
            # own (a second compile as long as the first). Metrics are bit-identical to a
            # scan's (checked per family in tests/test_harness.py).
            def seeds(s, m):
                def one(s1):
                    shapes = jax.eval_shape(lambda c: trainer.step(c, m, start)[1], s1)
                    buffers = jax.tree_util.tree_map(
                        lambda a: jnp.zeros((length,) + a.shape, a.dtype), shapes)

                    def body(j, carry):
                        c, ys = carry
                        c, y = trainer.step(c, m, start + j)
                        return c, jax.tree_util.tree_map(
                            lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, j, 0), ys, y)
                    return jax.lax.fori_loop(0, count, body, (s1, buffers))
                return jax.vmap(one)(s)
            return jax.vmap(seeds)(states, mp) if population else seeds(states, mp)

        # No buffer donation: on CPU it made every chunk ~15% slower (measured with bench),
        # and the carried state is small next to the rollout buffers anyway.
        jitted = jax.jit(run, static_argnums=4)

        def chunk_fn(length: int, states, mp):
            """The compiled chunk of at most ``length`` updates for these argument shapes
            and shardings (AOT, cached): ``(states, mp, start, count) -> (states, metrics)``,
            metrics with a trailing axis of ``length``, of which the first ``count`` are
            written."""
            shapes = jax.tree_util.tree_map(
                lambda x: (x.shape, str(x.dtype), str(getattr(x, "sharding", None))),
                (states, mp))
            k = (length, jax.tree_util.tree_structure((states, mp)),
                 tuple(jax.tree_util.tree_leaves(shapes)))
            if k not in executables:
                executables[k] = jitted.lower(states, mp, jnp.int32(0), jnp.int32(length),
                                              length).compile()
            return executables[k]

        _CACHE[key] = Compiled(trainer, init_fn, chunk_fn, env)
    return _CACHE[key]


def devices() -> list:
    """The local devices the seed axis is sharded over: all of the default backend's, or the
    first ``METABENCH_DEVICES`` of them (``METABENCH_DEVICES=1`` turns sharding off)."""
    devs = jax.local_devices()
    limit = os.environ.get("METABENCH_DEVICES", "").strip()
    if limit:
        if not limit.isdigit() or int(limit) < 1:
            raise ValueError(f"METABENCH_DEVICES must be a positive integer, got {limit!r}")
        devs = devs[:int(limit)]
    return devs


class _Placement(NamedTuple):
    """How one call's seeds are laid out: padded to a multiple of the device count and sharded
    along the seed axis (``jax.sharding``; meta-parameters replicated)."""

    seeds: int
    """Real seeds (the rest of the axis is padding, dropped from the metrics)."""
    axis: int
    """The seed axis of keys, states and metrics (1 for a population, else 0)."""
    states: Any
    """NamedSharding of the states, or None on one device."""
    replicated: Any
    """NamedSharding of the meta-parameters, or None on one device."""


def _place(keys: jax.Array, population: bool, shard: bool = True
           ) -> tuple[jax.Array, _Placement]:
    axis = 1 if population else 0
    n = keys.shape[axis]
    devs = devices() if shard else devices()[:1]
    if len(devs) < 2:
        return keys, _Placement(n, axis, None, None)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    pad = -n % len(devs)
    if pad:
        # Padding seeds repeat the last key: real work, discarded, never recorded.
        last = jax.lax.slice_in_dim(keys, n - 1, n, axis=axis)
        keys = jnp.concatenate([keys] + [last] * pad, axis=axis)
    mesh = Mesh(np.array(devs), ("seeds",))
    spec = PartitionSpec(*([None] * axis), "seeds")
    return keys, _Placement(n, axis, NamedSharding(mesh, spec),
                            NamedSharding(mesh, PartitionSpec()))


def seed_keys(base_seed: int, seeds: Sequence[int]) -> jax.Array:
    """One key per seed index, independent of which other seeds run (so shards agree)."""
    base = jax.random.PRNGKey(base_seed)
    return jnp.stack([jax.random.fold_in(base, int(s)) for s in seeds])


class _Trained(NamedTuple):
    metrics: Any  # Metrics of numpy arrays [..., updates_done], or None
    steps_per_update: int
    num_updates: int
    compile_s: float
    run_s: float
    failure: str | None
    memory: dict = {}
    agent_log: list[dict] | None = None
    references: list[float] | None = None
    reference_error: str | None = None
    randoms: list[float] | None = None
    failed_to_compile: bool = False


def _level_references(spec: EnvSpec, env: Any, states: Any, place: "_Placement"
                      ) -> tuple[list[float] | None, str | None, list[float] | None]:
    """Each seed's per-level reference (``normalise.reference: optimal / oracle``) and random
    return, measured on the env params in that seed's initial runner state: exactly the
    level it trains on."""
    if not spec.normalise.per_level:
        return None, None, None
    try:
        params = getattr(states, "env_params", None)
        if params is None:
            raise ValueError("the family's runner state has no env_params")
        params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
        if place.axis == 1:  # a population: every candidate trains on the same seeds
            params = jax.tree_util.tree_map(lambda x: x[0], params)
        params = jax.tree_util.tree_map(lambda x: x[:place.seeds], params)
        refs = [float(r) for r in level_references(spec.normalise.method, env, params)]
        randoms = [float(r) for r in level_randoms(spec.normalise.method, env, params)]
        return refs, None, randoms
    except Exception as e:
        return None, f"{type(e).__name__} while measuring the {spec.normalise.method} " \
                     f"reference: {e}", None


def memory_usage() -> dict:
    """Peak host RSS of this process and peak bytes in use on the first device (None where
    the backend keeps no statistics, as on CPU), in MB. A scoring child process trains one
    submission's envs in order, so the host peak after an env bounds that env's use."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host = rss / 1024 if sys.platform != "darwin" else rss / 2**20  # KB on Linux, B on macOS
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    peak = stats.get("peak_bytes_in_use")
    return {"host_peak_rss_mb": round(host, 1),
            "device_peak_mb": None if peak is None else round(peak / 2**20, 1)}


def _agent_log(env: Any) -> list[dict] | None:
    """A multi-agent env's finished games per seed (reset order is seed order)."""
    log = env.episode_log()
    return None if log is None else [{**g, "names": list(env.agents)} for g in log]


def _release(env: Any) -> None:
    """Closes a host-stepped env's live copies once its run is over (no-op for JAX envs)."""
    if env is not None:
        env.release()


def _cell(family: families_base.Family, spec: EnvSpec, config: Any, rule: UpdateRule,
          meta_params: Any, keys: jax.Array, total_timesteps: int, population: bool,
          host: bool = True) -> tuple:
    """One cell's compiled training, ready to run: ``(trainer, env, states, meta_params,
    placement, chunk lengths, the chunk program)`` (see ``chunk_fn`` in :func:`compiled`); with ``host=False``, None for a
    host-stepped env (whose initial states would start its live copies)."""
    trainer, init_fn, chunk_fn, env = compiled(family, spec, config, rule, meta_params,
                                               total_timesteps, population)
    if not host and not env.jittable:
        return None
    agents = env.num_agents
    if getattr(config, "num_envs", agents) % agents:
        raise ValueError(f"{spec.env} has {agents} agents per game and every agent is an "
                         f"env copy: num_envs ({config.num_envs}) must be a multiple of "
                         f"{agents}")
    # A host-stepped env lives in this process: its callbacks cannot be sharded.
    keys, place = _place(keys, population, shard=env.jittable)
    states = init_fn(keys)
    if place.states is not None:
        states = jax.device_put(states, place.states)
        meta_params = jax.device_put(meta_params, place.replicated)
    agents_per_call = int(np.prod(keys.shape[:-1]))
    length = _chunk_len(trainer.num_updates, min_len=math.ceil(
        MIN_CHUNK_ENV_STEPS / (trainer.steps_per_update * agents_per_call)))
    lengths = [length] * (trainer.num_updates // length)
    if trainer.num_updates % length:
        lengths.append(trainer.num_updates % length)
    # AOT-compile now, so compile time is not run time.
    program = chunk_fn(length, states, meta_params)
    jax.block_until_ready(states)
    return trainer, env, states, meta_params, place, lengths, program


def precompile(ref: "RuleRef", task: TaskSpec, cells: Sequence[tuple[EnvSpec, Sequence[int]]],
               workers: int | None = None) -> dict[str, float]:
    """Compiles the training programs of several envs side by side, one thread each: XLA
    compiles a program on one thread, so on a machine of n cores n envs compile in about the
    time of one. :func:`train_env` then finds them compiled (its ``compile_s`` is what was
    left to wait for, so add the seconds returned here, per env name). Host-stepped envs are
    left to :func:`train_env`; any error is too (it is reported there, as a failed part of
    the record)."""
    from concurrent.futures import ThreadPoolExecutor

    family = families_base.get_family(ref.family)

    def one(cell) -> float:
        spec, seeds = cell
        t0 = time.perf_counter()
        try:
            _cell(family, spec, agent_config(task, ref.family, spec), ref.rule, ref.meta_params,
                  seed_keys(task.seed, list(seeds)), task.total_timesteps, False, host=False)
        except Exception:  # train_env meets it again and records it
            pass
        return time.perf_counter() - t0

    cells = [c for c in cells if c[1]]
    if len(cells) < 2:
        return {}
    with ThreadPoolExecutor(max_workers=workers or min(len(cells), os.cpu_count() or 1)) as ex:
        return dict(zip((c[0].name for c in cells), ex.map(one, cells)))


def _train(family: families_base.Family, spec: EnvSpec, config: Any, rule: UpdateRule,
           meta_params: Any, keys: jax.Array, total_timesteps: int, population: bool,
           max_seconds: float | None, progress: Callable[..., None] | None) -> _Trained:
    t0 = time.perf_counter()
    try:
        trainer, env, states, meta_params, place, lengths, program = _cell(
            family, spec, config, rule, meta_params, keys, total_timesteps, population)
        references, reference_error, randoms = _level_references(spec, env, states, place)
    except Exception as e:  # a rule may fail to trace; that is a failed record, not a crash
        _release(locals().get("env"))
        return _Trained(None, 1, 0, time.perf_counter() - t0, 0.0,
                        f"{type(e).__name__} while compiling: {e}", failed_to_compile=True)
    compile_s = time.perf_counter() - t0
    chunks, failure = [], None
    t1 = time.perf_counter()
    done, i, per_chunk = 0, 0, None
    while i < len(lengths):
        # Dispatch as many chunks as fill about CHUNK_SECONDS (one until a chunk was timed)
        # before waiting for their metrics: the device runs them back to back.
        batch = lengths[i:i + (1 if per_chunk is None else
                               max(1, int(CHUNK_SECONDS / max(per_chunk, 1e-6))))]
        t2 = time.perf_counter()
        try:
            pending, start = [], done
            for n in batch:
                states, metrics = program(states, meta_params, jnp.int32(start), jnp.int32(n))
                pending.append((metrics, n))
                start += n
            pending = [jax.tree_util.tree_map(lambda x: x[..., :n], m)
                       for m, n in jax.device_get(pending)]
        except Exception as e:
            failure = f"{type(e).__name__} after {done} of {trainer.num_updates} updates: {e}"
            break
        per_chunk = (time.perf_counter() - t2) / len(batch)
        chunks += pending
        done, i = start, i + len(batch)
        elapsed = time.perf_counter() - t1
        if progress is not None:
            progress(spec.name, done, trainer.num_updates, done * trainer.steps_per_update,
                     elapsed)
        if max_seconds is not None and elapsed > max_seconds and done < trainer.num_updates:
            failure = (f"exceeded the wall-clock budget of {max_seconds:g}s after {done} of "
                       f"{trainer.num_updates} updates")
            break
    run_s = time.perf_counter() - t1
    agent_log = _agent_log(env)
    _release(env)
    metrics = None
    if chunks:
        metrics = jax.tree_util.tree_map(
            lambda *xs: np.take(np.concatenate(xs, axis=-1), np.arange(place.seeds),
                                axis=place.axis), *chunks)
    return _Trained(metrics, trainer.steps_per_update, trainer.num_updates, compile_s, run_s,
                    failure, memory_usage(), agent_log, references, reference_error, randoms)


def _env_run(spec: EnvSpec, seeds: list[int], t: _Trained, index: Any = ()) -> EnvRun:
    empty = np.zeros((len(seeds), 0))

    def get(field):
        return empty if t.metrics is None else np.asarray(getattr(t.metrics, field))[index]

    traces = {} if t.metrics is None or t.metrics.traces is None else {
        str(k): np.asarray(v)[index] for k, v in t.metrics.traces.items()}
    log = t.agent_log
    if log is not None and index != ():
        # A population's host copies were reset candidate by candidate, seeds within each.
        log = log[index * len(seeds):(index + 1) * len(seeds)]
    return EnvRun(spec, seeds, get("returns_sum"), get("episodes"), get("loss"),
                  t.steps_per_update, t.num_updates, t.compile_s, t.run_s, t.failure, traces,
                  t.memory, log, t.references, t.reference_error, t.randoms,
                  t.failed_to_compile)


def train_env(ref: RuleRef, task: TaskSpec, spec: EnvSpec, seeds: Sequence[int], *,
              max_seconds: float | None = None,
              progress: Callable[..., None] | None = None) -> EnvRun:
    """Trains ``len(seeds)`` fresh agents with the rule on one env in one vmapped call.

    ``progress(env_name, updates_done, num_updates, env_steps_per_seed, seconds)`` is called
    after every chunk.
    """
    family = families_base.get_family(ref.family)
    seeds = list(seeds)
    t = _train(family, spec, agent_config(task, ref.family, spec), ref.rule, ref.meta_params,
               seed_keys(task.seed, seeds), task.total_timesteps, False, max_seconds, progress)
    return _env_run(spec, seeds, t)


def train_population(family: str, rule: UpdateRule, meta_batch: Any, task: TaskSpec,
                     spec: EnvSpec, seeds: Sequence[int], *, total_timesteps: int | None = None,
                     max_seconds: float | None = None,
                     progress: Callable[..., None] | None = None) -> list[EnvRun]:
    """Trains K rules of one structure (``meta_batch`` has a leading axis K) x seeds on one
    env in one compiled call; one :class:`EnvRun` per candidate (compile and run times are
    the shared call's). Every candidate gets the same seed keys, so candidates are compared
    on common random numbers. ``total_timesteps`` overrides the task's (a search's hurdle)."""
    fam = families_base.get_family(family)
    seeds = list(seeds)
    k = len(jax.tree_util.tree_leaves(meta_batch)[0])
    base = seed_keys(task.seed, seeds)
    keys = jnp.broadcast_to(base, (k,) + base.shape)
    steps = task.total_timesteps if total_timesteps is None else int(total_timesteps)
    t = _train(fam, spec, agent_config(task, family, spec), rule, meta_batch, keys, steps, True,
               max_seconds, progress)
    return [_env_run(spec, seeds, t, i) for i in range(k)]

