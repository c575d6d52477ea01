"""Task specs: strict YAML -> frozen dataclasses, with a fingerprint.

A spec fixes where a rule may be meta-trained (``train``), where it is scored (``test``), the
fixed agent hyperparameters of every family it supports, the env-step budget, seeds and the
scoring. Unknown keys are errors; every error names the file, the key and what was expected.
``normalise.random: calibrated`` reads the uniform-random policy's mean return from
``tasks/calibration.lock.yaml``, written by ``metabench calibrate TASK``.
``normalise.reference`` is a number (a fixed return, its source in a YAML comment), ``optimal``
(per seed: the optimal expected return of that seed's level, computed from the env's dynamics
by :mod:`metabench.envs.optimal`; tabular grids and chains) or ``oracle`` (per seed: the mean
return of a scripted full-information agent on that seed's level, :mod:`metabench.envs.oracle`;
grid envs where the optimum is intractable). Either per-level reference is measured by the
harness from the env params the run actually trained on, and so is the random policy's return
on that level (exact for ``optimal``, simulated for ``oracle``), which then replaces the
calibrated mean in that run's score: with one mean random over levels, a level whose reference
falls below it would flip the sign of its scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from metabench import yamlfile
from metabench.envs import ParamDistribution, make_param_sampler, registry
from metabench.envs import make as make_env
from metabench.families import base as families_base
from metabench.yamlfile import FieldError

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
CALIBRATION_FILE = "calibration.lock.yaml"
SPLITS = ("train", "test")
SCORES = ("final_return",)
AGGREGATE_NAMES = ("iqm", "mean", "median", "optimality_gap")
REFERENCE_METHODS = ("optimal", "oracle")
"""Per-level references a task may name instead of a number (see the module docstring)."""


class SpecError(FieldError):
    """A malformed spec: the message names the file, the key and the expectation."""


@dataclasses.dataclass(frozen=True)
class Normalise:
    """Normalisation references: score = (R - random) / (reference - random)."""

    random: float | None
    """Mean return of a uniform random policy; None until calibrated."""
    reference: float | None
    """A fixed published or measured return, with its source in the YAML comment; None when
    the reference is per level (``method`` optimal or oracle)."""
    calibrated: bool
    """Whether ``random`` comes from the calibration lock file."""
    method: str = "fixed"
    """``fixed`` (``reference`` is the number), or one of REFERENCE_METHODS: each seed's
    reference is measured on the level that seed trained on."""

    @property
    def per_level(self) -> bool:
        return self.method != "fixed"


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """One environment of a split."""

    name: str
    """Unique key within the split (defaults to the env id's name)."""
    env: str
    """Registered env id, ``backend/Name[-vN]``."""
    params: Mapping[str, ParamDistribution]
    """Env-parameter overrides: constants or distributions sampled per seed."""
    normalise: Normalise
    """Normalisation references."""
    agents: Mapping[str, Mapping[str, Any]]
    """Per-family agent-config overrides for this env (on top of the task's ``agents``)."""

    def make(self):
        """``(env, base_params, sample_params)``: constants applied, distributions drawn by
        ``sample_params(key)`` inside the jitted train."""
        consts = {k: d.values[0] for k, d in self.params.items() if d.kind == "constant"}
        env, base = make_env(self.env, **consts)
        dists = {k: d for k, d in self.params.items() if d.kind != "constant"}
        return env, base, make_param_sampler(env, base, dists)

    def calibration_key(self) -> str:
        """Identity of the random-policy measurement: the env id and its param distribution."""
        params = {k: v.to_json() for k, v in sorted(self.params.items())}
        return f"{self.env} {json.dumps(params, sort_keys=True)}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Compute budget of a scoring run."""

    seeds: int
    """Independent runs per environment."""
    max_seconds_per_env: float
    """Wall-clock limit per environment (all seeds); enforced between chunks."""


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How runs become scores and aggregates."""

    score: str
    """Per-run score; ``final_return`` = mean episodic return over the final ``window``."""
    window: float
    """Fraction of training env steps whose completed episodes make the final return."""
    aggregate: str
    """The headline aggregate (one of iqm, mean, median, optimality_gap)."""
    bootstrap_reps: int
    """Stratified bootstrap resamples for the CIs."""
    bootstrap_seed: int
    """Seed of the bootstrap, so rebuilt numbers are identical."""
    baselines: Mapping[str, str]
    """Per family, the rule that probability of improvement is measured against."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A benchmark task, loaded from ``tasks/<id>.yaml``."""

    id: str
    """Task id; equals the file name without ``.yaml``."""
    description: str
    """One paragraph for people."""
    train: tuple[EnvSpec, ...]
    """Environments a submission may be meta-trained on."""
    test: tuple[EnvSpec, ...]
    """Held-out environments a submission is scored on."""
    total_timesteps: int
    """Env steps per run, the same for every family: rules compete on equal data."""
    agents: Mapping[str, Mapping[str, Any]]
    """Fixed agent hyperparameters per supported family (validated against its Config)."""
    budget: Budget
    """Seeds and wall-clock limits."""
    scoring: Scoring
    """Scoring settings."""
    seed: int
    """Base PRNG seed of the runs."""
    path: str
    """Where the spec was loaded from."""

    def split(self, name: str) -> tuple[EnvSpec, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def families(self) -> list[str]:
        return sorted(self.agents)

    def agent_config(self, family: str, env: EnvSpec | None = None):
        """The family's Config for this task (and env, with its overrides)."""
        if family not in self.agents:
            raise ValueError(f"task {self.id} has no agent config for family {family!r}; "
                             f"it supports: {', '.join(self.families())}")
        fam = families_base.get_family(family)
        merged = dict(self.agents[family])
        if env is not None:
            merged.update(env.agents.get(family, {}))
        return fam.Config(**merged)

    def canonical(self, family: str | None = None) -> dict:
        """The spec as plain JSON data (what the fingerprint hashes); with ``family``, only
        that family's agent settings and baseline, which are all its results depend on."""

        def agents(a: Mapping[str, Any]) -> dict:
            return {k: dict(sorted(v.items())) for k, v in sorted(a.items())
                    if family is None or k == family}

        def env_json(e: EnvSpec) -> dict:
            return {"name": e.name, "env": e.env,
                    "params": {k: v.to_json() for k, v in sorted(e.params.items())},
                    "normalise": {"random": e.normalise.random,
                                  "reference": (e.normalise.method if e.normalise.per_level
                                                else e.normalise.reference)},
                    "agents": agents(e.agents)}

        baselines = {k: v for k, v in sorted(self.scoring.baselines.items())
                     if family is None or k == family}
        return {
            "id": self.id, "total_timesteps": self.total_timesteps, "seed": self.seed,
            "train": [env_json(e) for e in self.train], "test": [env_json(e) for e in self.test],
            "agents": agents(self.agents),
            "budget": dataclasses.asdict(self.budget),
            "scoring": {**dataclasses.asdict(self.scoring), "baselines": baselines},
        }

    def fingerprint(self, family: str | None = None) -> str:
        """sha256 of the canonical form (descriptions and comments don't count). Records carry
        their family's fingerprint, so adding or retuning another family's agent does not make
        them stale."""
        blob = json.dumps(self.canonical(family), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --- loading -----------------------------------------------------------------------------


def task_path(task: str | os.PathLike, tasks_dir: Path | None = None) -> Path:
    """A task id (``classic-transfer-v1-quick``) or a path to a YAML file."""
    p = Path(task)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    d = tasks_dir or TASKS_DIR
    path = d / f"{task}.yaml"
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(str(task), list_tasks(d), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FileNotFoundError(f"unknown task {task!r}{hint} (tasks live in {d})")
    return path


def list_tasks(tasks_dir: Path | None = None) -> list[str]:
    d = tasks_dir or TASKS_DIR
    return sorted(p.stem for p in d.glob("*.yaml") if p.name != CALIBRATION_FILE)


def load(task: str | os.PathLike, tasks_dir: Path | None = None,
         calibration: Mapping[str, Any] | None = None) -> TaskSpec:
    """Loads and validates a task by id or path."""
    path = task_path(task, tasks_dir)
    raw = yamlfile.read(path, SpecError)
    if calibration is None:
        calibration = load_calibration(path.parent)
    return parse(raw, path, calibration)


class _Reader:
    """Walks a mapping with a key path, turning every mistake into a SpecError."""

    def __init__(self, file: Path, data: Any, where: str):
        self.file, self.where = file, where
        if not isinstance(data, Mapping):
            raise SpecError(file, where or "<top level>", f"a mapping, got {_kind(data)}")
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, types: tuple[type, ...] | type, expected: str, default=...):
        self.used.add(name)
        if name not in self.data:
            if default is ...:
                raise SpecError(self.file, self.key(name), f"missing; expected {expected}")
            return default
        value = self.data[name]
        if isinstance(value, bool) and bool not in _as_tuple(types):
            raise SpecError(self.file, self.key(name), f"{expected}, got {value!r}")
        if not isinstance(value, types):
            raise SpecError(self.file, self.key(name), f"{expected}, got {value!r}")
        return value

    def number(self, name: str, default=..., positive: bool = False, integer: bool = False):
        expected = ("a positive " if positive else "a ") + ("integer" if integer else "number")
        value = self.get(name, (int, float, str), expected, default)
        if isinstance(value, str):  # YAML reads 1e7 as a string
            try:
                value = float(value)
            except ValueError:
                raise SpecError(self.file, self.key(name), f"{expected}, got {value!r}") from None
        if integer:
            if float(value) != int(float(value)):
                raise SpecError(self.file, self.key(name), f"{expected}, got {value!r}")
            value = int(float(value))
        if positive and not value > 0:
            raise SpecError(self.file, self.key(name), f"{expected}, got {value!r}")
        return value

    def child(self, name: str, default=...) -> "_Reader":
        return _Reader(self.file, self.get(name, Mapping, "a mapping", default), self.key(name))

    def done(self, allowed_extra: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(map(str, self.data)) - self.used - set(allowed_extra))
        if unknown:
            raise SpecError(self.file, self.key(unknown[0]),
                            f"unknown key; expected one of {', '.join(sorted(self.used))}")


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _kind(v: Any) -> str:
    return type(v).__name__ if v is not None else "nothing"


def parse(raw: Any, path: Path, calibration: Mapping[str, Any]) -> TaskSpec:
    top = _Reader(path, raw, "")
    task_id = top.get("id", str, "the task id (a string)")
    if task_id != path.stem and path.parent.name == "tasks":
        raise SpecError(path, "id", f"the file's name {path.stem!r}, got {task_id!r}")
    description = top.get("description", str, "a string", "")
    total = top.number("total_timesteps", positive=True, integer=True)
    seed = top.number("seed", 0, integer=True)

    agents_r = top.child("agents")
    agents: dict[str, dict[str, Any]] = {}
    if not agents_r.data:
        raise SpecError(path, "agents", "at least one family's agent config")
    for fam_name in agents_r.data:
        agents[fam_name] = _family_config(path, f"agents.{fam_name}", fam_name,
                                          agents_r.child(fam_name).data)
        agents_r.used.add(fam_name)

    splits = {s: _split(top, s, calibration, agents) for s in SPLITS}

    b = top.child("budget")
    budget = Budget(seeds=b.number("seeds", positive=True, integer=True),
                    max_seconds_per_env=float(b.number("max_seconds_per_env", positive=True)))
    b.done()

    s = top.child("scoring", {})
    score = s.get("score", str, f"one of {', '.join(SCORES)}", "final_return")
    if score not in SCORES:
        raise SpecError(path, "scoring.score", f"one of {', '.join(SCORES)}, got {score!r}")
    window = float(s.number("window", 0.05, positive=True))
    if window > 1:
        raise SpecError(path, "scoring.window", f"a fraction in (0, 1], got {window}")
    aggregate = s.get("aggregate", str, f"one of {', '.join(AGGREGATE_NAMES)}", "iqm")
    if aggregate not in AGGREGATE_NAMES:
        raise SpecError(path, "scoring.aggregate",
                        f"one of {', '.join(AGGREGATE_NAMES)}, got {aggregate!r}")
    reps = s.number("bootstrap_reps", 2000, positive=True, integer=True)
    bseed = s.number("bootstrap_seed", 0, integer=True)
    baselines = dict(s.get("baselines", Mapping, "a mapping family -> rule", {}))
    for fam_name in agents:
        fam = families_base.get_family(fam_name)
        rule = baselines.setdefault(fam_name, fam.baseline)
        if rule not in fam.reference_rules:
            raise SpecError(path, f"scoring.baselines.{fam_name}",
                            f"a reference rule of {fam_name} "
                            f"({', '.join(sorted(fam.reference_rules))}), got {rule!r}")
    for fam_name in baselines:
        if fam_name not in agents:
            raise SpecError(path, f"scoring.baselines.{fam_name}",
                            f"a family listed under agents ({', '.join(sorted(agents))})")
    s.done()
    top.done()

    spec = TaskSpec(id=task_id, description=description, train=splits["train"],
                    test=splits["test"], total_timesteps=total, agents=agents, budget=budget,
                    scoring=Scoring(score, window, aggregate, reps, bseed, baselines),
                    seed=seed, path=str(path))
    for fam_name in agents:  # the budget must allow at least one update of every env
        for split in SPLITS:
            for i, e in enumerate(spec.split(split)):
                cfg = spec.agent_config(fam_name, e)
                per_update = getattr(cfg, "num_envs", 1) * getattr(cfg, "rollout_len", 1)
                if total < per_update:
                    raise SpecError(path, "total_timesteps",
                                    f"at least one {fam_name} update on {split}[{i}] "
                                    f"({per_update} env steps), got {total}")
    return spec


def _family_config(path: Path, key: str, family: str, values: Mapping[str, Any]) -> dict:
    try:
        fam = families_base.get_family(family)
    except KeyError as e:
        raise SpecError(path, key, f"a known family ({', '.join(families_base.families())})") from e
    fields = {f.name: f for f in dataclasses.fields(fam.Config)}
    out = {}
    for k, v in values.items():
        if k not in fields:
            raise SpecError(path, f"{key}.{k}",
                            f"unknown {family} agent setting; expected one of "
                            f"{', '.join(sorted(fields))}")
        default = fields[k].default
        if isinstance(v, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                v = float(v)
            except ValueError:
                raise SpecError(path, f"{key}.{k}", f"a number, got {v!r}") from None
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float):
            if v != int(v):
                raise SpecError(path, f"{key}.{k}", f"an integer, got {v!r}")
            v = int(v)
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        out[k] = v
    try:
        fam.Config(**out)
    except (TypeError, ValueError) as e:
        raise SpecError(path, key, f"a valid {family} config ({e})") from None
    return out


def _split(top: _Reader, split: str, calibration, agents) -> tuple[EnvSpec, ...]:
    path = top.file
    entries = top.get(split, list, "a non-empty list of environments")
    if not entries:
        raise SpecError(path, split, "a non-empty list of environments")
    out, names = [], set()
    for i, item in enumerate(entries):
        r = _Reader(path, item, f"{split}[{i}]")
        env_id = r.get("env", str, "a registered env id like gymnax/CartPole-v1")
        try:
            env_entry = registry.entry(env_id)
        except registry.UnknownEnvError as e:
            raise SpecError(path, r.key("env"), f"a registered env id ({e})") from None
        name = r.get("name", str, "a string", env_id.split("/", 1)[1])
        if name in names:
            raise SpecError(path, r.key("name"), f"a name unique within {split}; "
                            f"{name!r} is used twice (give each entry a `name`)")
        names.add(name)
        params = {}
        for k, v in r.get("params", Mapping, "a mapping of env parameters", {}).items():
            try:
                params[str(k)] = ParamDistribution.parse(v)
            except ValueError as e:
                raise SpecError(path, r.key(f"params.{k}"), str(e)) from None
        if params:  # unknown parameter names are errors now, not at scoring time
            try:
                env, base = env_entry.factory()
                fields = {f.name for f in dataclasses.fields(base)}
            except Exception:
                env, fields = None, set(params)
            # Options fixed when the env is built (brax's physics backend): constants only.
            static = set(getattr(env, "static_params", ()))
            for k in params:
                if k not in fields | static:
                    raise SpecError(path, r.key(f"params.{k}"), f"a parameter of {env_id} "
                                    f"({', '.join(sorted(fields | static))})")
                if k in static and params[k].kind != "constant":
                    raise SpecError(path, r.key(f"params.{k}"),
                                    f"a constant: {k} is fixed when {env_id} is built")
            consts = {k: params[k].values[0] for k in static & set(params)}
            if consts:
                try:
                    env_entry.factory(**consts)
                except ValueError as e:
                    raise SpecError(path, r.key(f"params.{sorted(consts)[0]}"), str(e)) from None
        n = r.child("normalise")
        ref_raw = n.get("reference", (int, float, str),
                        f"a number or one of {', '.join(REFERENCE_METHODS)}")
        method = "fixed"
        if isinstance(ref_raw, str) and ref_raw in REFERENCE_METHODS:
            method, ref = ref_raw, None
            _check_reference_method(path, n.key("reference"), env_entry, method)
        else:
            try:
                ref = float(ref_raw)  # YAML reads 1e7 as a string
            except ValueError:
                raise SpecError(path, n.key("reference"),
                                f"a number or one of {', '.join(REFERENCE_METHODS)} (a "
                                f"per-level reference), got {ref_raw!r}") from None
        rnd = n.get("random", (int, float, str), "a number or 'calibrated'")
        calibrated = rnd == "calibrated"
        if isinstance(rnd, str) and not calibrated:
            raise SpecError(path, n.key("random"), f"a number or 'calibrated', got {rnd!r}")
        env_agents = {}
        for fam_name, overrides in r.get("agents", Mapping, "a mapping family -> settings",
                                         {}).items():
            if fam_name not in agents:
                raise SpecError(path, r.key(f"agents.{fam_name}"),
                                f"a family listed under the task's agents "
                                f"({', '.join(sorted(agents))})")
            env_agents[fam_name] = _family_config(
                path, r.key(f"agents.{fam_name}"), fam_name,
                {**agents[fam_name], **dict(overrides or {})})
            env_agents[fam_name] = {k: v for k, v in env_agents[fam_name].items()
                                    if k in (overrides or {})}
        spec = EnvSpec(name, env_id, params, Normalise(None, ref, calibrated, method),
                       env_agents)
        if calibrated:
            rnd = calibration.get(spec.calibration_key(), {}).get("random")
        else:
            rnd = float(rnd)
        if rnd is not None and ref is not None and float(rnd) == ref:
            raise SpecError(path, n.key("reference"),
                            f"a value different from random ({rnd}); scores would divide by 0")
        n.done()
        r.done()
        out.append(dataclasses.replace(
            spec, normalise=Normalise(None if rnd is None else float(rnd), ref, calibrated,
                                      method)))
    return tuple(out)


def _check_reference_method(path: Path, key: str, env_entry, method: str) -> None:
    """A per-level reference must be computable for the env: say which envs it handles."""
    try:
        env, _ = env_entry.factory()
    except Exception as e:  # an env that cannot be built here cannot be solved either
        raise SpecError(path, key, f"an env that can be built to measure its {method} "
                        f"reference ({type(e).__name__}: {e})") from None
    if method == "optimal":
        from metabench.envs import optimal

        if not optimal.can_solve(env):
            raise SpecError(path, key, f"a number, or 'optimal' only for an env the exact "
                            f"solver handles (tabular grids grid/tabular-*, chains chain/*); "
                            f"{env_entry.id} has no tractable optimum (use 'oracle' for grid "
                            f"envs, or a number)")
    else:
        from metabench.envs import oracle

        if not oracle.can_play(env):
            raise SpecError(path, key, f"a number, or 'oracle' only for a grid env "
                            f"(grid/*); {env_entry.id} has no scripted oracle")


# --- calibration lock --------------------------------------------------------------------


def load_calibration(tasks_dir: Path | None = None) -> dict[str, Any]:
    path = (tasks_dir or TASKS_DIR) / CALIBRATION_FILE
    if not path.exists():
        return {}
    data = yamlfile.read(path, SpecError) or {}
    if not isinstance(data, Mapping):
        raise SpecError(path, "<top level>", f"a mapping, got {_kind(data)}")
    envs = data.get("envs", {})
    if not isinstance(envs, Mapping):
        raise SpecError(path, "envs", "a mapping of calibration key -> measurement")
    return dict(envs)


def require_calibrated(spec: TaskSpec, split: str) -> None:
    """Raises a clear error when a ``calibrated`` random reference has not been measured."""
    for i, e in enumerate(spec.split(split)):
        if e.normalise.random is None:
            raise SpecError(spec.path, f"{split}[{i}].normalise.random",
                            f"a calibrated value for {e.calibration_key()!r} in "
                            f"{CALIBRATION_FILE}; run `metabench calibrate {spec.id}`")
