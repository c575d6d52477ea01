"""Task specs as data: strict YAML -> frozen dataclasses, with a fingerprint.

A spec fixes where a rule may be meta-trained (``train``), where it is scored (``test``), the
fixed agent hyperparameters of every family it supports, the env-step budget, seeds and the
scoring. Unknown keys are errors; every error names the file, the key and what was expected.
``normalise.random: calibrated`` reads the uniform-random policy's mean return from
``calibration.lock.yaml`` beside the task files, written by ``metabench calibrate TASK``.
``normalise.reference`` is a number (a fixed return, its source in a YAML comment), ``optimal``
(per seed: the optimal expected return of that seed's level, computed from the env's dynamics
by :mod:`metabench.envs.optimal`; tabular grids and chains) or ``oracle`` (per seed: the mean
return of a scripted full-information agent on that seed's level, :mod:`metabench.envs.oracle`;
grid envs where the optimum is intractable). Either per-level reference is measured by the
harness from the env params the run actually trained on, and so is the random policy's return
on that level (exact for ``optimal``, simulated for ``oracle``), which then replaces the
calibrated mean in that run's score: with one mean random over levels, a level whose reference
falls below it would flip the sign of its scores.

This module only *reads*: structure, types and names, and the fingerprint, importing neither
JAX nor the envs and families, so the static site can read specs without the RL stack.
:mod:`metabench.tasks.spec` loads a task (reads it here, then checks it against the
registered envs and families) and builds its envs and agent configs. The fingerprint hashes
the agent settings as written (``lr: 1e-3`` stays the string YAML reads), so reading alone
gives the same fingerprint as loading; ``spec.agent_config`` types them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from metabench import yamlfile
from metabench.yamlfile import FieldError

TASKS_DIR = Path(__file__).resolve().parent
"""The shipped task files: package data, so a non-editable install finds them."""
CALIBRATION_FILE = "calibration.lock.yaml"
SPLITS = ("train", "test")
SCORES = ("final_return",)
AGGREGATE_NAMES = ("iqm", "mean", "median", "optimality_gap")
REFERENCE_METHODS = ("optimal", "oracle")
"""Per-level references a task may name instead of a number (see the module docstring)."""


class SpecError(FieldError):
    """A malformed spec: the message names the file, the key and the expectation."""


KINDS = ("uniform", "loguniform", "choice")
"""Distributions an env parameter may be drawn from per seed."""


class ParamDistribution(NamedTuple):
    """One parameter's distribution: ``kind`` in KINDS or ``"constant"``, and its values."""

    kind: str
    values: tuple[Any, ...]

    @staticmethod
    def parse(value: Any) -> "ParamDistribution":
        """Parses a spec value; raises ValueError saying what was expected."""
        if isinstance(value, (bool, str)):
            # Static options (a physics backend, a vectorisation mode, a gymnasium flag) are
            # passed to the env's factory as they are; they cannot be drawn per seed.
            return ParamDistribution("constant", (value,))
        if not isinstance(value, (int, float, Mapping)):
            raise ValueError(
                f"expected a number, a string, a boolean or one of "
                f"{{{', '.join(k + ': [...]' for k in KINDS)}}}, got {value!r}"
            )
        if not isinstance(value, Mapping):
            return ParamDistribution("constant", (float(value),))
        if len(value) != 1 or next(iter(value)) not in KINDS:
            raise ValueError(f"expected exactly one of {', '.join(KINDS)}, got keys {sorted(value)}")
        kind, args = next(iter(value.items()))
        if not isinstance(args, (list, tuple)) or not args or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
        ):
            raise ValueError(f"{kind} expects a list of numbers, got {args!r}")
        args = tuple(float(a) for a in args)
        if kind in ("uniform", "loguniform"):
            if len(args) != 2 or not args[0] < args[1]:
                raise ValueError(f"{kind} expects [lo, hi] with lo < hi, got {list(args)}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"loguniform expects lo > 0, got {args[0]}")
        return ParamDistribution(kind, args)

    def to_json(self) -> Any:
        return self.values[0] if self.kind == "constant" else {self.kind: list(self.values)}


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
    """A benchmark task, read from ``<id>.yaml`` (the shipped ones: ``metabench/tasks/``)."""

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

    def splits(self) -> dict[str, tuple[EnvSpec, ...]]:
        return {name: getattr(self, name) for name in SPLITS}

    def split(self, name: str) -> tuple[EnvSpec, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def families(self) -> list[str]:
        return sorted(self.agents)

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


def read(task: str | os.PathLike, tasks_dir: Path | None = None,
         calibration: Mapping[str, Any] | None = None) -> TaskSpec:
    """Reads a task by id or path: its structure, types and names, not yet checked against
    the envs and families (no JAX is loaded)."""
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
    """A read spec from its YAML data; see :mod:`metabench.tasks.validate` for the rest."""
    top = _Reader(path, raw, "")
    task_id = top.get("id", str, "the task id (a string)")
    if task_id != path.stem and path.parent.name == "tasks":
        raise SpecError(path, "id", f"the file's name {path.stem!r}, got {task_id!r}")
    description = top.get("description", str, "a string", "")
    total = top.number("total_timesteps", positive=True, integer=True)
    seed = top.number("seed", 0, integer=True)

    agents_r = top.child("agents")
    if not agents_r.data:
        raise SpecError(path, "agents", "at least one family's agent config")
    agents = {str(fam): _settings(agents_r, fam) for fam in agents_r.data}

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
    for fam_name, rule in baselines.items():
        if not isinstance(rule, str):
            raise SpecError(path, f"scoring.baselines.{fam_name}", f"a rule name, got {rule!r}")
    s.done()
    top.done()

    return TaskSpec(id=task_id, description=description, train=splits["train"],
                    test=splits["test"], total_timesteps=total, agents=agents, budget=budget,
                    scoring=Scoring(score, window, aggregate, reps, bseed, baselines),
                    seed=seed, path=str(path))


def _settings(r: _Reader, name: Any) -> dict[str, Any]:
    """One family's agent settings as written: a mapping of setting names (typed and checked
    against the family's Config by the validation)."""
    value = r.get(name, (Mapping, type(None)), "a mapping of agent settings")
    return {str(k): v for k, v in (value or {}).items()}


def _split(top: _Reader, split: str, calibration, agents) -> tuple[EnvSpec, ...]:
    path = top.file
    entries = top.get(split, list, "a non-empty list of environments")
    if not entries:
        raise SpecError(path, split, "a non-empty list of environments")
    out, names = [], set()
    for i, item in enumerate(entries):
        r = _Reader(path, item, f"{split}[{i}]")
        env_id = r.get("env", str, "a registered env id like gymnax/CartPole-v1")
        name = r.get("name", str, "a string", env_id.split("/", 1)[-1])
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
        n = r.child("normalise")
        ref_raw = n.get("reference", (int, float, str),
                        f"a number or one of {', '.join(REFERENCE_METHODS)}")
        method = "fixed"
        if isinstance(ref_raw, str) and ref_raw in REFERENCE_METHODS:
            method, ref = ref_raw, None
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
        a = r.child("agents", {})
        for fam_name in a.data:
            if fam_name not in agents:
                raise SpecError(path, a.key(str(fam_name)),
                                f"a family listed under the task's agents "
                                f"({', '.join(sorted(agents))})")
        env_agents = {str(fam): _settings(a, fam) for fam in a.data}
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
