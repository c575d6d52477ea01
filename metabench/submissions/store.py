"""Where submissions' records live, and keeping them honest: result paths, shards of the
(env, seed) cells, records of an older task moved aside as stale, and shard records merged
into a full one. Nothing here runs submitted code; it reads and writes records only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from metabench.results import slug

RESULTS_DIR = Path("leaderboard/results")


@dataclasses.dataclass
class SubmitResult:
    """What submitting (or merging shards) came to: success, a message for the user, and the
    record written or found up to date."""

    # Here rather than beside ``submit``: merge returns it too, and the orchestration
    # imports this module, not the other way round.
    ok: bool
    message: str
    path: Path | None = None
    record: dict | None = None


def sealer(key_path: str | os.PathLike | None, log) -> Callable[[dict], dict]:
    """What a record goes through just before it is written: signed by this machine's key
    (``key_path``, default :func:`metabench.signing.default_key_path`), or, with no key
    there, written unsigned (self-reported) after saying so once. A key file that exists but
    does not load is an error now, before any scoring, not an unsigned record later."""
    from metabench import signing

    path = Path(key_path) if key_path is not None else signing.default_key_path()
    if path.exists():
        key = signing.load_private_key(path)
        return lambda rec: signing.sign(rec, key)
    said: list[bool] = []

    def unsigned(rec: dict) -> dict:
        if not said:
            log(f"no signing key at {path}: the record is self-reported "
                "(run `metabench keys init`)")
            said.append(True)
        return signing.unsigned(rec)

    return unsigned


def results_path(results_dir: Path, task_id: str, sub_slug: str, split: str,
                 shard: tuple[int, int] | None = None) -> Path:
    """Where a record lives: ``<task>/<slug>.json`` (test), ``<slug>.train.json`` (train);
    shard slices go to ``<task>/shards/``."""
    suffix = "" if split == "test" else f".{split}"
    if shard is not None:
        return results_dir / task_id / "shards" / f"{sub_slug}{suffix}.shard-{shard[0]}-of-{shard[1]}.json"
    return results_dir / task_id / f"{sub_slug}{suffix}.json"


def shard_seeds(n_envs: int, n_seeds: int, shard: tuple[int, int] | None) -> list[list[int]]:
    """Per env, the seeds this shard scores: (env, seed) cells dealt round-robin."""
    cells = [(e, s) for e in range(n_envs) for s in range(n_seeds)]
    if shard is not None:
        i, n = shard
        cells = cells[i - 1::n]
    return [[s for e, s in cells if e == env] for env in range(n_envs)]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"--shard expects I/N with 1 <= I <= N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _baseline_matrix(results_dir: Path, task, split: str, family: str):
    """The task baseline's score matrix from its committed record, when it matches."""
    from metabench import harness, results

    name = task.scoring.baselines.get(family)
    if name is None:
        return None, None
    path = results_path(results_dir, task.id, slug(name), split)
    if not path.exists():
        return None, name
    rec = results.read(path)
    if rec["task"]["fingerprint"] != task.fingerprint(family) or rec["rule"]["family"] != family:
        return None, name
    return harness.score_matrix(task, split, rec["runs"]), name


def _unused(dest: Path) -> Path:
    """``dest``, or ``<stem>.2.json``, ``.3``, ... when a record was already moved there (two
    unreadable records, or a task retuned back and forth): a stale record is never
    overwritten."""
    n, found = 1, dest
    while found.exists():
        n += 1
        found = dest.with_name(f"{dest.stem}.{n}{dest.suffix}")
    return found


def _move_stale(path: Path, task, family: str, log) -> None:
    """A record of an older task fingerprint is moved aside, never mixed with new ones."""
    from metabench import results

    if not path.exists():
        return
    try:
        old = results.read(path)
        fp = old["task"]["fingerprint"]
    except Exception:  # an unreadable record is kept for a human, under stale/ too
        old, fp = None, "unreadable"
    current = task.fingerprint(family)
    if fp == current:
        return
    dest = _unused(path.parent / "stale" / f"{path.stem}.{fp}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if old is not None:
        old["stale"] = {"reason": f"task fingerprint changed from {fp} to {current}"}
        results.write(dest, old)
        path.unlink()
    else:
        shutil.move(str(path), dest)
    log(f"moved stale record (fingerprint {fp}) to {dest}")


def merge(paths: Sequence[str | os.PathLike], results_dir: Path = RESULTS_DIR,
          out: Path | None = None, task: str | os.PathLike | None = None, *,
          key_path: str | os.PathLike | None = None,
          log=lambda msg: print(msg, file=sys.stderr)) -> SubmitResult:
    """Joins the shard records of one submission on one task split into its full record.
    ``task`` (an id or a YAML path) defaults to the id the shards recorded. The merged record
    is a new document: it is signed by the merging machine's key (``key_path``, as in
    :func:`sealer`), never carries over a shard's signature or verdict."""
    from metabench import harness, results
    from metabench.tasks import spec

    seal = sealer(key_path, log)
    recs = [results.read(p) for p in paths]
    if not recs:
        return SubmitResult(False, "merge: no shard records given")
    first = recs[0]
    key = lambda r: (r["task"]["id"], r["task"]["fingerprint"], r["task"]["split"],  # noqa: E731
                     r.get("submission", {}).get("content_hash"))
    for p, r in zip(paths, recs):
        if "shard" not in r:
            return SubmitResult(False, f"merge: {p} is not a shard record")
        if key(r) != key(first):
            return SubmitResult(False, f"merge: {p} is of another task, fingerprint, split or "
                                f"submission content than {paths[0]}")
    count = first["shard"]["count"]
    got = sorted(r["shard"]["index"] for r in recs)
    if got != list(range(1, count + 1)):
        return SubmitResult(False, f"merge: expected shards 1..{count} exactly once, got {got}")
    task = spec.load(task or first["task"]["id"])
    if task.fingerprint(first["rule"]["family"]) != first["task"]["fingerprint"]:
        return SubmitResult(False, f"merge: task {task.id} changed since these shards were "
                            "scored (fingerprint differs); score them again")
    split = first["task"]["split"]
    parts = []
    for r in recs:
        for e in r["envs"]:
            env = {k: v for k, v in e.items() if k not in ("mean_return", "mean_score")}
            parts.append({"env": env, "runs": [x for x in r["runs"] if x["env"] == e["name"]]})
    order = [e.name for e in task.split(split)]
    parts.sort(key=lambda p: order.index(p["env"]["name"]))
    base_mat, base_name = _baseline_matrix(results_dir, task, split, first["rule"]["family"])
    if base_name == first["rule"]["name"]:
        base_mat = None
    rec = harness.assemble(first["rule"], task, split, parts, base_mat, base_name,
                           provenance_=first["provenance"])
    for k in ("submission", "check"):
        rec[k] = first.get(k)
    rec["wall_clock_s"] = sum(r.get("wall_clock_s", 0.0) for r in recs)
    rec["merged_from"] = [f"shard {r['shard']['index']}/{count}" for r in recs]
    name = first.get("submission", {}).get("name", first["rule"]["name"])
    path = out or results_path(results_dir, task.id, slug(name), split)
    rec = seal(rec)
    results.write(path, rec)
    return SubmitResult(True, f"merged {len(recs)} shards into {path} (status {rec['status']})",
                        path, rec)
