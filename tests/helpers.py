"""Helpers shared by the tests: task specs written to a folder (``TINY_TASK``, a two-seed
CartPole task at a small budget), and synthetic result records and task specs for the site's
tests.

Records follow the schema of ``metabench.harness.assemble`` (plus the keys a submission adds),
but their numbers are made up: scores come from the caller, curves rise towards the final
return, and aggregates are rliable's point estimates with CIs the caller may set by hand.
"""


from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rliable import metrics

from metabench import results, scoring, signing
from metabench.tasks import spec

HOSTILE = '<script>alert(1)</script>"onmouseover="alert(2)'
# As the site escapes it (markupsafe, through the templates and the SVG alike).
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;onmouseover=&#34;alert(2)"

# The tests' stand-in for a scoring machine's key: ``make_record(verified=True)`` signs with
# it, and a leaderboard trusts it once ``trust_test_key`` put it in its keys folder.
TEST_KEY = Ed25519PrivateKey.generate()
TEST_KEY_FILE = "test-machine.pub"


def trust_test_key(keys_dir: Path, key: Ed25519PrivateKey = TEST_KEY,
                   name: str = TEST_KEY_FILE) -> Path:
    """Adds ``key``'s public half to a leaderboard's trusted keys (``keys_dir/name``)."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    path = keys_dir / name
    path.write_text(f"# a test key\n{signing.public_key_text(key)}\n")
    return path


# Two test envs with different normalisers, so per-env normalisation is exercised.
ENVS = (("CartPole-a", "gymnax/CartPole-v1", 20.0, 500.0),
        ("Acrobot-b", "gymnax/Acrobot-v1", -500.0, -80.0))

TASK_YAML = """
id: {id}
description: {description}
total_timesteps: 4096
seed: 0
train:
  - env: gymnax/CartPole-v1
    normalise: {{random: 20.0, reference: 500.0}}
test:
{test}
agents:
  drift: {{num_envs: 4, rollout_len: 32, epochs: 2, minibatches: 2}}
budget: {{seeds: 16, max_seconds_per_env: 600}}
scoring: {{bootstrap_reps: 200, aggregate: {aggregate}, baselines: {{drift: ppo_clip}}}}
"""


def write_site_task(tasks_dir: Path, task_id: str, description: str = "a synthetic task",
                    envs: Sequence[tuple[str, str, float, float]] = ENVS,
                    aggregate: str = "iqm") -> Callable[[str], str]:
    """Writes ``tasks_dir/<task_id>.yaml``; returns its ``fingerprint(family)``."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    test = "\n".join(f"  - env: {env}\n    name: {json.dumps(name)}\n"
                     f"    normalise: {{random: {rnd}, reference: {ref}}}"
                     for name, env, rnd, ref in envs)
    path = tasks_dir / f"{task_id}.yaml"
    path.write_text(textwrap.dedent(TASK_YAML).format(id=task_id,
                                                      description=json.dumps(description),
                                                      test=test, aggregate=aggregate))
    return spec.load(path).fingerprint


def submission_block(name: str, **over: Any) -> dict:
    block = {"name": name, "version": "1.0", "authors": ["A. Author", "B. Author"],
             "affiliation": "Somewhere", "family": "drift",
             "description": f"the {name} rule", "paper": "https://example.org/paper",
             "code": "https://example.org/code", "licence": "Apache-2.0",
             "content_hash": "c0ffee", "params_sha256": None, "baseline": False,
             "disclosure": {"task": None, "train_envs": ["gymnax/CartPole-v1"],
                            "env_steps": 1.0e8, "accelerator_hours": 2.5, "notes": ""}}
    block.update(over)
    return block


def _interval(point: float, ci: tuple[float, float] | None, width: float = 0.05) -> dict:
    lo, hi = ci if ci is not None else (point - width, point + width)
    return {"point": float(point), "lo": float(lo), "hi": float(hi)}


def _with_mean(scores: np.ndarray, mean: float) -> np.ndarray:
    """``scores`` moved to the given mean with their IQM unchanged: only the quarter that the
    IQM trims at one end moves (the top one up, or the bottom one down), so that a record can
    rank differently by mean and by IQM and still store its runs' own aggregates."""
    flat = scores.ravel().copy()
    k = int(flat.size * 0.25)  # what scipy's trim_mean (rliable's IQM) cuts at each end
    assert k > 0, "too few runs to move the mean without moving the IQM"
    order = np.argsort(flat, kind="stable")
    delta = (mean - flat.mean()) * flat.size / k
    flat[order[-k:] if delta > 0 else order[:k]] += delta
    assert flat.min() >= scoring.SCORE_FLOOR, f"mean {mean} would push runs below the floor"
    return flat.reshape(scores.shape)


def make_record(task_id: str, fingerprint: str | Callable[[str], str], name: str, scores: np.ndarray, *,
                split: str = "test", family: str = "drift",
                envs: Sequence[tuple[str, str, float, float]] = ENVS,
                failed: Sequence[tuple[int, int]] = (), iqm: float | None = None,
                iqm_ci: tuple[float, float] | None = None, mean: float | None = None,
                submission: dict | None = None, verified: bool | None = None,
                created: str = "2026-11-21T00:00:00+00:00", curve_points: int = 100,
                note: str = "", seed: int = 0) -> dict:
    """A record whose run scores are ``scores[seed, env]``; ``failed`` lists (seed, env)
    cells recorded as failed runs. ``iqm``/``mean`` move the runs to those aggregates (the site
    ranks only records whose stored aggregates are their runs'); ``iqm_ci`` sets the IQM's CI.
    ``fingerprint`` is a literal or ``write_site_task``'s per-family fingerprint.
    ``verified=True`` signs the record with :data:`TEST_KEY` (edit it afterwards and the
    signature no longer matches); otherwise it is unsigned."""
    if callable(fingerprint):
        fingerprint = fingerprint(family)
    scores = np.asarray(scores, dtype=np.float64)
    if iqm is not None:
        # The site refuses to rank a record whose stored IQM is not its runs' IQM: shift the
        # runs so that their IQM is the one asked for.
        ok = scores.copy()
        for cell in failed:
            ok[cell] = np.nan
        scores = scores + iqm - metrics.aggregate_iqm(scoring.floor_scores(ok, np.isfinite(ok)))
    if mean is not None:
        assert not failed, "mean= moves completed runs only: give no failed cells"
        scores = _with_mean(scores, mean)
    n_seeds = scores.shape[0]
    rng = np.random.default_rng(seed)
    steps = np.linspace(4096 / curve_points, 4096, curve_points).astype(int).tolist()
    t = np.linspace(0, 1, curve_points)
    runs, floored = [], scores.copy()
    for j, (env_name, _, rnd, ref) in enumerate(envs):
        for s in range(n_seeds):
            ok = (s, j) not in failed
            final = rnd + scores[s, j] * (ref - rnd)
            curve = rnd + (final - rnd) * (1 - np.exp(-5 * t)) + rng.normal(0, 0.02, t.size) \
                * abs(ref - rnd)
            rets: list[float | None] = [float(v) for v in curve]
            rets[0] = None  # real curves start with a bucket that completed no episode
            runs.append({"env": env_name, "seed": s, "status": "ok" if ok else "failed",
                         "reason": None if ok else "non-finite loss at update 3",
                         "final_return": float(final) if ok else None,
                         "score": float(scores[s, j]) if ok else None,
                         "curve": {"steps": steps, "returns": rets}})
            if not ok:
                floored[s, j] = np.nan
    floored = scoring.floor_scores(floored, np.isfinite(floored))
    aggs = {
        "iqm": _interval(metrics.aggregate_iqm(floored) if iqm is None else iqm, iqm_ci),
        "mean": _interval(metrics.aggregate_mean(floored), None),
        "median": _interval(metrics.aggregate_median(floored), None),
        "optimality_gap": _interval(metrics.aggregate_optimality_gap(floored, gamma=1), None),
    }
    rec = {
        "kind": results.KIND, "schema": results.SCHEMA,
        "task": {"id": task_id, "fingerprint": fingerprint, "split": split,
                 "total_timesteps": 4096, "seeds": list(range(n_seeds))},
        "rule": {"name": name, "family": family, "factory": f"{family}.{name}", "kwargs": {},
                 "params_hash": "ab" * 32, "note": note},
        "status": "ok" if not failed else "partial",
        "envs": [{"name": env_name, "env": env, "params": {}, "random": rnd,
                  "reference": ref, "seeds": n_seeds, "updates": 32, "num_updates": 32,
                  "env_steps_per_seed": 4096, "compile_s": 5.0, "run_s": 2.5,
                  "env_steps_per_s": 50000.0,
                  "mean_return": float(np.mean(rnd + scores[:, j] * (ref - rnd))),
                  "mean_score": float(np.mean(floored[:, j]))}
                 for j, (env_name, env, rnd, ref) in enumerate(envs)],
        "runs": runs,
        "aggregates": aggs,
        "probability_of_improvement": None,
        "provenance": {"metabench": "0.1.0", "created": created, "command": "synthetic",
                       "device": {"platform": "cpu", "kind": "cpu", "count": 1},
                       "platform": "Linux", "cpu_count": 2, "python": "3.11.7",
                       "libraries": {"jax": "0.10.2"}, "git_commit": None},
    }
    if submission is not None:
        rec["submission"] = submission
        rec["check"] = {"passed": True, "mirror_valid": True,
                        "checks": [{"name": "finite", "passed": True, "detail": "ok"}]}
        rec["wall_clock_s"] = 15.0
    return signing.sign(rec, TEST_KEY) if verified else rec


def write_record(results_dir: Path, stem: str, record: dict) -> Path:
    """Files ``record`` as ``results_dir/<task>/<stem>.json`` (or ``.train.json``)."""
    suffix = ".train.json" if record["task"]["split"] == "train" else ".json"
    return results.write(results_dir / record["task"]["id"] / f"{stem}{suffix}", record)


def random_scores(rng: np.random.Generator, level: float, seeds: int = 16,
                  envs: int = 2) -> np.ndarray:
    return np.clip(rng.normal(level, 0.15, size=(seeds, envs)), -0.2, 1.3)


def make_bench_set(root: Path, n_subs: int = 50, n_tasks: int = 3, seeds: int = 16,
                   train_every: int = 2) -> tuple[Path, Path]:
    """``n_subs`` submissions on ``n_tasks`` tasks (``seeds`` x 2 envs, 100-point curves),
    with a train-split record for every ``train_every``-th. Returns (results, tasks) dirs."""
    results_dir, tasks_dir = root / "results", root / "tasks"
    trust_test_key(root / "keys")
    rng = np.random.default_rng(0)
    for t in range(n_tasks):
        task_id = f"bench-{t}"
        fp = write_site_task(tasks_dir, task_id, f"synthetic benchmark task {t}")
        for i in range(n_subs):
            name = "ppo_clip" if i == 0 else f"rule_{i:03d}"
            level = rng.uniform(0.1, 0.9)
            created = f"2026-11-{1 + i % 28:02d}T12:00:00+00:00"
            sub = submission_block(name, baseline=(i == 0))
            rec = make_record(task_id, fp, name, random_scores(rng, level, seeds),
                              submission=sub, verified=i % 3 == 0, created=created,
                              failed=[(0, 1)] if i % 7 == 0 else (), seed=i)
            write_record(results_dir, name, rec)
            if i % train_every == 0:
                train = make_record(task_id, fp, name, random_scores(rng, level + 0.1, seeds),
                                    split="train", submission=sub, created=created, seed=i + 1)
                write_record(results_dir, name, train)
    return results_dir, tasks_dir


CARTPOLE_SPLITS = """train:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
test:
  - env: gymnax/CartPole-v1
    normalise: {random: 22.0, reference: 500.0}
"""
"""CartPole as the one train and the one test env of a small task (random policy 22; 500 is
PureJaxRL's episode cap): tests write their own id, budget and agents around it."""


TINY_TASK = """
id: tiny
description: a tiny CartPole task for tests
total_timesteps: {steps}
seed: 0
train:
  - env: gymnax/CartPole-v1
    normalise: {{random: 22.0, reference: 500.0}}
test:
  - env: gymnax/CartPole-v1
    normalise: {{random: 22.0, reference: 500.0}}
  - env: gymnax/CartPole-v1
    name: CartPole-long-pole
    params: {{length: {{uniform: [0.5, 1.0]}}}}
    normalise: {{random: 22.0, reference: 500.0}}
agents:
  drift: {{num_envs: 4, rollout_len: 32, epochs: 2, minibatches: 2}}
budget: {{seeds: 2, max_seconds_per_env: 600}}
scoring: {{bootstrap_reps: 200, baselines: {{drift: ppo_clip}}}}
"""


def write_task(folder: Path, text: str, name: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path
