"""Task specs as scoring uses them: :func:`load` reads a task (:mod:`metabench.tasks.schema`)
and checks it against what is registered (env ids and their parameters, the families, their
agent settings and reference rules, per-level reference methods, a budget that allows at least
one update); :func:`make_env` and :func:`agent_config` build what a run needs.

Reading needs no JAX; this module builds envs and looks up families, so it does. Every error
still names the file, the key and the expectation. The schema's names are re-exported here,
so code that trains imports one module.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from metabench.envs import make as make_backend_env
from metabench.envs import make_param_sampler, optimal, oracle, registry
from metabench.families import base as families_base
from metabench.tasks.schema import (AGGREGATE_NAMES, CALIBRATION_FILE, REFERENCE_METHODS,
                                    SCORES, SPLITS, TASKS_DIR, Budget, EnvSpec, Normalise,
                                    ParamDistribution, Scoring, SpecError, TaskSpec,
                                    list_tasks, load_calibration, read, require_calibrated,
                                    task_path)

__all__ = ["AGGREGATE_NAMES", "CALIBRATION_FILE", "REFERENCE_METHODS", "SCORES", "SPLITS",
           "TASKS_DIR", "Budget", "EnvSpec", "Normalise", "ParamDistribution", "Scoring",
           "SpecError", "TaskSpec", "agent_config", "check", "family_config", "list_tasks",
           "load", "load_calibration", "make_env", "read", "require_calibrated", "task_path"]


def load(task: str | os.PathLike, tasks_dir: Path | None = None,
         calibration: Mapping[str, Any] | None = None) -> TaskSpec:
    """Reads and checks a task by id or path: what scoring and training use."""
    spec = read(task, tasks_dir, calibration)
    check(spec)
    return spec


def make_env(env: EnvSpec):
    """``(env, base_params, sample_params)``: constants applied, distributions drawn by
    ``sample_params(key)`` inside the jitted train."""
    consts = {k: d.values[0] for k, d in env.params.items() if d.kind == "constant"}
    built, base = make_backend_env(env.env, **consts)
    dists = {k: d for k, d in env.params.items() if d.kind != "constant"}
    return built, base, make_param_sampler(built, base, dists)


def agent_config(spec: TaskSpec, family: str, env: EnvSpec | None = None):
    """The family's Config for this task (and env, with its overrides), typed."""
    if family not in spec.agents:
        raise ValueError(f"task {spec.id} has no agent config for family {family!r}; "
                         f"it supports: {', '.join(spec.families())}")
    merged = dict(spec.agents[family])
    if env is not None:
        merged.update(env.agents.get(family, {}))
    return family_config(Path(spec.path), f"agents.{family}", family, merged)


def check(spec: TaskSpec) -> None:
    """Raises SpecError at the first setting the registered envs and families reject."""
    path = Path(spec.path)
    for fam_name in spec.agents:
        family_config(path, f"agents.{fam_name}", fam_name, spec.agents[fam_name])
    for split, envs in spec.splits().items():
        for i, e in enumerate(envs):
            _check_env(path, f"{split}[{i}]", e, spec)
    for fam_name in spec.scoring.baselines:
        if fam_name not in spec.agents:
            raise SpecError(path, f"scoring.baselines.{fam_name}",
                            f"a family listed under agents ({', '.join(sorted(spec.agents))})")
    for fam_name in spec.agents:
        fam = families_base.get_family(fam_name)
        rule = spec.scoring.baselines.get(fam_name)
        if rule is None:
            raise SpecError(path, f"scoring.baselines.{fam_name}",
                            f"missing; expected the {fam_name} rule that probability of "
                            f"improvement is measured against (its default is "
                            f"{fam.baseline!r}; one of {', '.join(sorted(fam.reference_rules))})")
        if rule not in fam.reference_rules:
            raise SpecError(path, f"scoring.baselines.{fam_name}",
                            f"a reference rule of {fam_name} "
                            f"({', '.join(sorted(fam.reference_rules))}), got {rule!r}")
    for fam_name in spec.agents:  # the budget must allow at least one update of every env
        for split, envs in spec.splits().items():
            for i, e in enumerate(envs):
                cfg = agent_config(spec, fam_name, e)
                per_update = getattr(cfg, "num_envs", 1) * getattr(cfg, "rollout_len", 1)
                if spec.total_timesteps < per_update:
                    raise SpecError(path, "total_timesteps",
                                    f"at least one {fam_name} update on {split}[{i}] "
                                    f"({per_update} env steps), got {spec.total_timesteps}")


def family_config(path: Path, key: str, family: str, values: Mapping[str, Any]):
    """The family's Config from settings as written. YAML reads ``1e-3`` as a string and
    ``4.0`` as a float: a number-valued setting takes a numeric string, an integer one an
    integral float, a tuple one a list."""
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
        return fam.Config(**out)
    except (TypeError, ValueError) as e:
        raise SpecError(path, key, f"a valid {family} config ({e})") from None


def _check_env(path: Path, where: str, e: EnvSpec, spec: TaskSpec) -> None:
    try:
        env_entry = registry.entry(e.env)
    except registry.UnknownEnvError as err:
        raise SpecError(path, f"{where}.env", f"a registered env id ({err})") from None
    if e.params:  # unknown parameter names are errors now, not at scoring time
        try:
            env, base = env_entry.factory()
            fields = {f.name for f in dataclasses.fields(base)}
        except Exception:
            env, fields = None, set(e.params)
        # Options fixed when the env is built (brax's physics backend): constants only.
        static = set(env.static_params if env is not None else ())
        for k, dist in e.params.items():
            if k not in fields | static:
                raise SpecError(path, f"{where}.params.{k}", f"a parameter of {e.env} "
                                f"({', '.join(sorted(fields | static))})")
            if k in static and dist.kind != "constant":
                raise SpecError(path, f"{where}.params.{k}",
                                f"a constant: {k} is fixed when {e.env} is built")
        consts = {k: e.params[k].values[0] for k in static & set(e.params)}
        if consts:
            try:
                env_entry.factory(**consts)
            except ValueError as err:
                raise SpecError(path, f"{where}.params.{sorted(consts)[0]}", str(err)) from None
    if e.normalise.per_level:
        _check_reference_method(path, f"{where}.normalise.reference", env_entry,
                                e.normalise.method)
    for fam_name, overrides in e.agents.items():
        family_config(path, f"{where}.agents.{fam_name}", fam_name,
                      {**spec.agents[fam_name], **overrides})


def _check_reference_method(path: Path, key: str, env_entry, method: str) -> None:
    """A per-level reference must be computable for the env: say which envs it handles."""
    try:
        env, _ = env_entry.factory()
    except Exception as e:  # an env that cannot be built here cannot be solved either
        raise SpecError(path, key, f"an env that can be built to measure its {method} "
                        f"reference ({type(e).__name__}: {e})") from None
    if method == "optimal":
        if not optimal.can_solve(env):
            raise SpecError(path, key, f"a number, or 'optimal' only for an env the exact "
                            f"solver handles (tabular grids grid/tabular-*, chains chain/*); "
                            f"{env_entry.id} has no tractable optimum (use 'oracle' for grid "
                            f"envs, or a number)")
    else:
        if not oracle.can_play(env):
            raise SpecError(path, key, f"a number, or 'oracle' only for a grid env "
                            f"(grid/*); {env_entry.id} has no scripted oracle")
