"""The committed records under leaderboard/results are the leaderboard's source of truth: each
must be a valid record of the current task spec, scored with the shipped baseline's exact
content and parameters, its stored aggregates must be the ones its own runs give, and it must
be signed by a key in leaderboard/keys (so the site shows it verified).

Nothing here is pinned to a count or a value: the records are re-scored from time to time,
and any honest record passes. A hand-edited score or aggregate, a task YAML edit that makes
records stale, or a re-shipped ``<rule>.npz`` that no longer matches a record's hash fails.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from metabench import results, signing, submissions
from metabench.tasks import spec
from metabench.rules import params_hash
from metabench.site.model import analyse_task

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "leaderboard" / "results"
TASKS = spec.TASKS_DIR
BASELINES = ROOT / "submissions" / "baselines"
KEYS = ROOT / "leaderboard" / "keys"

# Only records filed directly under a task folder are ranked (stale/ and shards/ are not).
RECORDS = sorted(p for p in RESULTS.glob("*/*.json") if not p.name.startswith("."))
TASK_IDS = sorted({p.parent.name for p in RECORDS})


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def test_there_are_committed_records():
    # Guards the parametrisations below against passing vacuously on an empty glob.
    assert RECORDS and TASK_IDS


@functools.lru_cache(maxsize=None)
def _trusted() -> dict:
    return signing.trusted_keys(KEYS)


@functools.lru_cache(maxsize=None)
def _task(task_id: str):
    return spec.load(TASKS / f"{task_id}.yaml")


@functools.lru_cache(maxsize=None)
def _baseline(name: str):
    """(content_hash, params_hash) of the shipped baseline submission ``name``."""
    sub = submissions.load(BASELINES / name)
    return sub.content_hash, params_hash(submissions.build_rule(sub).meta_params), sub


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_the_leaderboard_ranks_every_committed_record(task_id):
    view = analyse_task(task_id, RESULTS, TASKS, reps=10, seed=0)
    assert view.spec_error is None
    assert view.unreadable == []
    assert [(e.stem, e.stale) for e in view.stale] == []
    assert [(e.stem, e.train_stale) for e in view.entries if e.train is not None
            and e.train_stale] == []
    on_disk = {p.name.removesuffix(".train.json").removesuffix(".json")
               for p in RECORDS if p.parent.name == task_id}
    assert {e.stem for e in view.ranked} == on_disk
    assert [(e.stem, e.verdict.reason) for e in view.ranked if not e.verified] == []


def _floored_matrix(rec: dict, task) -> np.ndarray:
    """``[seeds, envs]`` scores written out independently of the harness and the site: a
    failed run counts as -1, a completed one is clipped below at -1."""
    envs = [e.name for e in task.split(rec["task"]["split"])]
    seeds = sorted({r["seed"] for r in rec["runs"]})
    mat = np.full((len(seeds), len(envs)), np.nan)
    for r in rec["runs"]:
        i, j = seeds.index(r["seed"]), envs.index(r["env"])
        assert math.isnan(mat[i, j]), f"two runs for {r['env']} seed {r['seed']}"
        mat[i, j] = max(r["score"], -1.0) if r["status"] == "ok" else -1.0
    assert not np.isnan(mat).any(), "a (seed, env) cell has no run"
    return mat


@pytest.mark.parametrize("path", RECORDS, ids=_id)
def test_committed_record_matches_its_runs_task_and_baseline(path):
    rec = results.read(path)  # validates the schema
    task = _task(path.parent.name)
    split = "train" if path.name.endswith(".train.json") else "test"
    assert rec["task"]["id"] == task.id and rec["task"]["split"] == split
    family = rec["rule"]["family"]
    assert rec["task"]["fingerprint"] == task.fingerprint(family)
    assert rec["task"]["total_timesteps"] == task.total_timesteps

    # Every run's score is its final return normalised by its env's (or its level's) pair.
    envs = {e.name: e for e in task.split(split)}
    n_failed = 0
    for r in rec["runs"]:
        if r["status"] != "ok":
            assert r["score"] is None and r["reason"]
            n_failed += 1
            continue
        norm = envs[r["env"]].normalise
        rnd, ref = ((r["random"], r["reference"]) if norm.per_level
                    else (norm.random, norm.reference))
        assert r["score"] == pytest.approx((r["final_return"] - rnd) / (ref - rnd), abs=1e-9)
    assert rec["status"] == ("ok" if n_failed == 0 else
                             "failed" if n_failed == len(rec["runs"]) else "partial")

    # The stored aggregates are those of the runs, failures at the floor.
    mat = _floored_matrix(rec, task)
    aggs = rec["aggregates"]
    assert aggs["mean"]["point"] == pytest.approx(mat.mean(), abs=1e-9)
    assert aggs["iqm"]["point"] == pytest.approx(scipy.stats.trim_mean(mat.ravel(), 0.25),
                                                 abs=1e-9)
    assert aggs["median"]["point"] == pytest.approx(np.median(mat.mean(axis=0)), abs=1e-9)
    for k in ("iqm", "mean"):
        assert aggs[k]["lo"] <= aggs[k]["point"] + 1e-9 <= aggs[k]["hi"] + 2e-9, k
    assert [e["name"] for e in rec["envs"]] == list(envs)

    # Scored with the shipped baseline's exact content and meta-parameters.
    name = rec["submission"]["name"]
    content, shipped_hash, sub = _baseline(name)
    assert rec["submission"]["content_hash"] == content
    assert rec["rule"]["params_hash"] == shipped_hash
    assert rec["rule"]["name"] == name and rec["rule"]["family"] == sub.family == family
    assert rec["check"]["passed"] is True
    # Signed, over exactly these bytes' content, by a key leaderboard/keys trusts: the
    # site shows it verified. A record re-scored must be signed again after review.
    verdict = signing.verify(rec, _trusted())
    assert verdict.verified, f"{_id(path)}: {verdict.reason} (re-sign it: metabench keys sign)"
    assert "verified" not in rec  # the old self-asserted flag is gone
