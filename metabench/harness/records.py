"""From runs to a record: per-seed runs, env parts, the score matrix and the versioned record.

:func:`assemble` builds the record a rule gets on a task split from env parts (what a scoring
child process hands back and what shards carry), so that one process, many, or merged slices
give the same record; :func:`evaluate` trains a rule on every env of a split
(:mod:`metabench.harness.train`) and assembles its record in one process.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from metabench import scoring
from metabench.harness.origin import provenance
from metabench.harness.train import EnvRun, RuleRef, train_env
from metabench.results import KIND, SCHEMA
from metabench.rules import params_hash
from metabench.tasks.spec import EnvSpec, TaskSpec, require_calibrated

CURVE_POINTS = 100


# --- from runs to a record -----------------------------------------------------------------


def downsample_curve(returns_sum: np.ndarray, episodes: np.ndarray, steps_per_update: int,
                     points: int = CURVE_POINTS) -> tuple[list[int], list[float | None]]:
    """Mean episodic return per bucket of updates (exact: sums over counts)."""
    steps, rets = [], []
    for lo, hi in _buckets(len(returns_sum), points):
        count = episodes[lo:hi].sum()
        steps.append(int(hi * steps_per_update))
        rets.append(float(returns_sum[lo:hi].sum() / count) if count > 0 else None)
    return steps, rets


def _buckets(n: int, points: int) -> list[tuple[int, int]]:
    """At most ``points`` contiguous ``[lo, hi)`` ranges of updates covering ``n``."""
    if n == 0:
        return []
    edges = np.unique(np.linspace(0, n, min(points, n) + 1).astype(int))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def downsample_trace(values: np.ndarray, steps_per_update: int, points: int = CURVE_POINTS
                     ) -> tuple[list[int], list[float]]:
    """Mean of a per-update scalar per bucket of updates, on the same step grid as curves."""
    buckets = _buckets(len(values), points)
    return ([hi * steps_per_update for _, hi in buckets],
            [float(np.mean(values[lo:hi])) for lo, hi in buckets])


def agent_returns(log: dict, window: float) -> dict:
    """``team_return`` and ``agent_returns`` (by agent name) of one seed: means over the games
    that finished in the final ``window`` of its env steps (the last game if none did), the
    same window as ``final_return``."""
    steps = np.asarray(log["steps"])
    if steps.size == 0:
        return {}
    keep = steps > (1.0 - window) * log["total_steps"]
    if not keep.any():
        keep = steps == steps.max()
    agents = np.asarray(log["agents"])[keep].mean(axis=0)
    return {"team_return": float(np.mean(np.asarray(log["team"])[keep])),
            "agent_returns": {str(n): float(v) for n, v in zip(log["names"], agents)}}


def run_records(run: EnvRun, window: float) -> list[dict]:
    """Per-seed run records: status, reason, final return, normalised score, curve."""
    out = []
    norm = run.spec.normalise
    for i, seed in enumerate(run.seeds):
        reason = run.failure
        final = float("nan")
        if reason is None:
            loss = run.loss[i]
            bad = np.flatnonzero(~np.isfinite(loss))
            if bad.size:
                reason = f"non-finite loss at update {int(bad[0])}"
            else:
                final = scoring.final_window_return(run.returns_sum[i], run.episodes[i], window)
                if not math.isfinite(final):
                    reason = "no episode completed during training"
        reference, random = norm.reference, norm.random
        if norm.per_level:
            reference = None if run.references is None else run.references[i]
            random = None if run.randoms is None else run.randoms[i]
            if reason is None and (reference is None or random is None):
                reason = run.reference_error or f"no {norm.method} reference was measured"
            elif reason is None and reference <= random:
                reason = (f"the level's {norm.method} reference ({reference}) is not above "
                          f"its random return ({random}): no score")
        score = (float(scoring.normalise(final, random, reference))
                 if reason is None else None)
        steps, rets = downsample_curve(run.returns_sum[i], run.episodes[i] if run.episodes.size
                                       else run.episodes, run.steps_per_update)
        rec = {"env": run.spec.name, "seed": int(seed),
               "status": "ok" if reason is None else "failed", "reason": reason,
               "final_return": final if reason is None else None, "score": score,
               "curve": {"steps": steps, "returns": rets}}
        if norm.per_level:
            rec["reference"] = reference
            rec["random"] = random
            rec["reference_method"] = norm.method
        if reason is None and run.agent_log is not None and len(run.agent_log) == len(run.seeds):
            rec.update(agent_returns(run.agent_log[i], window))
        if run.traces:
            rec["traces"] = {}
            for name, values in sorted(run.traces.items()):
                t_steps, t_vals = downsample_trace(values[i], run.steps_per_update)
                rec["traces"][name] = {"steps": t_steps, "values": t_vals}
        out.append(rec)
    return out


def score_matrix(task: TaskSpec, split: str, runs: Sequence[dict]) -> np.ndarray:
    """``[seeds, envs]`` normalised scores in split order; failed runs score the floor."""
    return scoring.score_matrix(
        [e.name for e in task.split(split)], sorted({r["seed"] for r in runs}),
        ((r["env"], r["seed"], r["score"] if r["status"] == "ok" else None) for r in runs))


def env_part(run: EnvRun, window: float) -> dict:
    """One env's share of a record, JSON-ready: its measurements and its per-seed runs.

    Parts are what a scoring child process hands back and what shards carry, so that
    :func:`assemble` can build the same record from one process, many, or merged slices.
    """
    spec = run.spec
    runs = run_records(run, window)
    team = [r["team_return"] for r in runs if "team_return" in r]
    multi = {"team_return": float(np.mean(team))} if team else {}
    return {"env": {"name": spec.name, "env": spec.env,
                    "params": {k: v.to_json() for k, v in sorted(spec.params.items())},
                    "random": spec.normalise.random, "reference": spec.normalise.reference,
                    **reference_summary(spec, runs),
                    "seeds": len(run.seeds), "updates": run.updates_done,
                    "num_updates": run.num_updates,
                    "env_steps_per_seed": run.updates_done * run.steps_per_update,
                    "compile_s": round(run.compile_s, 3), "run_s": round(run.run_s, 3),
                    "env_steps_per_s": run.env_steps_per_s, **run.memory, **multi},
            "runs": runs}


def reference_summary(spec: EnvSpec, runs: Sequence[dict]) -> dict:
    """A per-level reference's summary for an env part: the method, the mean over the runs'
    references (as ``reference``, so readers of a single number still work) and the range;
    nothing for a fixed reference."""
    if not spec.normalise.per_level:
        return {}
    return _summary(spec.normalise.method, runs)


def _summary(method: str, runs: Sequence[dict]) -> dict:
    refs = [r["reference"] for r in runs if r.get("reference") is not None]
    return {"reference_method": method,
            "reference": float(np.mean(refs)) if refs else None,
            "reference_range": [float(min(refs)), float(max(refs))] if refs else None}


def failed_part(spec: EnvSpec, seeds: Sequence[int], reason: str) -> dict:
    """A part for an env whose runs never reported (the scoring process hung or died)."""
    run = EnvRun(spec, list(seeds), np.zeros((len(seeds), 0)), np.zeros((len(seeds), 0)),
                 np.zeros((len(seeds), 0)), 1, 0, 0.0, 0.0, failure=reason)
    return env_part(run, 0.05)


def merge_parts(parts: Sequence[dict]) -> list[dict]:
    """Joins parts of the same env (from shards) into one, in first-seen env order."""
    merged: dict[str, dict] = {}
    for p in parts:
        name = p["env"]["name"]
        if name not in merged:
            merged[name] = {"env": dict(p["env"]), "runs": list(p["runs"])}
            continue
        e, q = merged[name]["env"], p["env"]
        steps = (e["env_steps_per_s"] or 0) * e["run_s"] + (q["env_steps_per_s"] or 0) * q["run_s"]
        for k in ("seeds", "compile_s", "run_s"):
            e[k] += q[k]
        e["updates"] = max(e["updates"], q["updates"])
        e["env_steps_per_seed"] = max(e["env_steps_per_seed"], q["env_steps_per_seed"])
        e["env_steps_per_s"] = steps / e["run_s"] if e["run_s"] > 0 else None
        merged[name]["runs"].extend(p["runs"])
    for m in merged.values():
        m["runs"].sort(key=lambda r: r["seed"])
        if m["env"].get("reference_method"):  # per-level references over the merged runs
            m["env"].update(_summary(m["env"]["reference_method"], m["runs"]))
        team = [r["team_return"] for r in m["runs"] if "team_return" in r]
        if team:
            m["env"]["team_return"] = float(np.mean(team))
    return list(merged.values())


def rule_block(ref: RuleRef) -> dict:
    return {"name": ref.name, "family": ref.family, "factory": ref.factory,
            "kwargs": dict(ref.kwargs), "params_hash": params_hash(ref.meta_params),
            "note": ref.note}


def assemble(rule: dict, task: TaskSpec, split: str, parts: Sequence[dict],
             baseline_scores: np.ndarray | None = None, baseline_name: str | None = None,
             command: str | None = None, provenance_: dict | None = None) -> dict:
    """The versioned result record for one rule on one task split, from env parts."""
    parts = merge_parts(parts)
    runs = [r for p in parts for r in p["runs"]]
    mat = score_matrix(task, split, runs)
    aggs = scoring.aggregates(mat, reps=task.scoring.bootstrap_reps,
                              seed=task.scoring.bootstrap_seed)
    poi = None
    if baseline_scores is not None and baseline_scores.shape[1] == mat.shape[1]:
        iv = scoring.probability_of_improvement(mat, baseline_scores,
                                                reps=task.scoring.bootstrap_reps,
                                                seed=task.scoring.bootstrap_seed)
        poi = {"baseline": baseline_name, **iv.to_dict()}
    n_failed = sum(r["status"] != "ok" for r in runs)
    envs = []
    for p in parts:
        finals = [r["final_return"] for r in p["runs"] if r["final_return"] is not None]
        # The env's share of the aggregates: failed runs at the floor, completed ones clipped
        # at it, as in the score matrix (it counted failures as 0 before the floor was -1).
        raw = np.array([r["score"] if r["status"] == "ok" and r["score"] is not None
                        else np.nan for r in p["runs"]], dtype=np.float64)
        scores = scoring.floor_scores(raw, np.isfinite(raw))
        envs.append({**p["env"], "mean_return": float(np.mean(finals)) if finals else None,
                     "mean_score": float(np.mean(scores))})
    return {
        "kind": KIND, "schema": SCHEMA,
        "task": {"id": task.id, "fingerprint": task.fingerprint(rule["family"]), "split": split,
                 "total_timesteps": task.total_timesteps,
                 "seeds": sorted({r["seed"] for r in runs})},
        "rule": rule,
        "status": "ok" if n_failed == 0 else ("failed" if n_failed == len(runs) else "partial"),
        "envs": envs, "runs": runs,
        "aggregates": {k: v.to_dict() for k, v in aggs.items()},
        "probability_of_improvement": poi,
        "provenance": provenance_ or provenance(command),
    }


def build_record(ref: RuleRef, task: TaskSpec, split: str, env_runs: Sequence[EnvRun],
                 baseline_scores: np.ndarray | None = None, baseline_name: str | None = None,
                 command: str | None = None) -> dict:
    """The versioned result record for one rule on one task split."""
    parts = [env_part(r, task.scoring.window) for r in env_runs]
    return assemble(rule_block(ref), task, split, parts, baseline_scores, baseline_name, command)


def evaluate(ref: RuleRef, task: TaskSpec, split: str = "test", *, seeds: int | None = None,
             progress: Callable[..., None] | None = None,
             baseline: dict | None = None, command: str | None = None) -> dict:
    """Scores ``ref`` on every env of ``task``'s split; returns the result record.

    ``baseline`` is a record of the task's baseline rule on the same split and fingerprint;
    when given, probability of improvement over it is included.
    """
    require_calibrated(task, split)
    n = task.budget.seeds if seeds is None else int(seeds)
    if n < 1:
        raise ValueError(f"seeds must be at least 1, got {n}")
    env_runs = [train_env(ref, task, spec, range(n), max_seconds=task.budget.max_seconds_per_env,
                          progress=progress) for spec in task.split(split)]
    base_mat, base_name = None, None
    if baseline is not None:
        base_mat = score_matrix(task, split, baseline["runs"])
        base_name = baseline["rule"]["name"]
    return build_record(ref, task, split, env_runs, base_mat, base_name, command)
