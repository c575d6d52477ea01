"""Submitting: check a folder, score it in isolated child processes (one per submission, one
compiled call per batch of like submissions, or one Ray task per env), and write its record.

The order is always the same: :func:`_prepare` checks the submission (in a child) and moves
a stale record aside, the scoring runs in children of
:mod:`metabench.submissions.isolate`, and :func:`_finish` assembles and writes the record,
so every way of scoring ends in the same kind of record.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from metabench.submissions.build import batch_key
from metabench.submissions.isolate import (CheckResult, _Cell, _died, _score_batch,
                                           _score_cells, check)
from metabench.submissions.schema import Submission
from metabench.submissions.store import (RESULTS_DIR, SubmitResult, _baseline_matrix,
                                         _move_stale, results_path, sealer, shard_seeds)

COMPILE_ALLOWANCE_S = 300.0
"""Added to each env's wall-clock budget for compilation before the child is killed."""


def _score_on_ray(sub_path: str, task, split: str, per_env: list, command: str | None,
                  address: str | None, log, export_dir: Path | None = None
                  ) -> list[tuple[set, _Cell]]:
    """One Ray task per (submission, task, env) cell, each taking one GPU when the cluster
    has any; every task scores its env in an isolated child process, as locally."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("the ray backend needs Ray: pip install 'metabench[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    remote = ray.remote(num_gpus=gpus, max_retries=0)(_score_cells)
    envs = [i for i, seeds in enumerate(per_env) if seeds]
    limit = task.budget.max_seconds_per_env + COMPILE_ALLOWANCE_S
    log(f"sending {len(envs)} cell(s) to Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
    refs = [remote.remote(sub_path, str(task.path), split,
                          [seeds if j == i else [] for j, seeds in enumerate(per_env)],
                          limit, command, True,
                          None if export_dir is None else str(export_dir)) for i in envs]
    return [({i}, cell) for i, cell in zip(envs, ray.get(refs))]


class _Prepared(NamedTuple):
    """A checked submission that needs scoring, and where its record goes."""

    sub: Submission
    check: CheckResult
    task: Any
    split: str
    path: Path
    per_env: list
    limit: float
    """Wall-clock limit of its scoring process."""
    shard: tuple[int, int] | None
    seeds: int
    export: Path | None = None
    """The rule exported by the sandboxed check (a submission's own code), removed once the
    record is written."""
    check_s: float = 0.0
    """Seconds the check (and export) took."""


def _prepare(folder: str | os.PathLike, task_id: str, split: str, results_dir: Path,
             force: bool, shard: tuple[int, int] | None, seeds: int | None,
             timeout: float | None, log, unsandboxed: bool = False
             ) -> "_Prepared | SubmitResult":
    """Checks the submission (in the sandbox, exporting a submission's own rule for the
    task) and moves a stale record aside; a :class:`SubmitResult` when there is nothing to
    score (it failed its check, or its record is up to date)."""
    import shutil
    import tempfile

    from metabench import results
    from metabench.tasks import spec

    task = spec.load(task_id)
    spec.require_calibrated(task, split)
    export_dir = Path(tempfile.mkdtemp(prefix="metabench-export-"))
    t0 = time.perf_counter()
    res = check(folder, task_path=str(task.path), split=split, export_dir=export_dir,
                unsandboxed=unsandboxed)
    check_s = time.perf_counter() - t0
    if not res.ok or res.export is None:
        shutil.rmtree(export_dir, ignore_errors=True)
    if not res.ok:
        return SubmitResult(False, res.message)
    sub = res.submission
    if sub.family not in task.agents:
        _drop_export(res.export)
        return SubmitResult(False, f"{sub.path}: task {task.id} has no agent config for family "
                            f"{sub.family!r} (it supports {', '.join(task.families())})")
    path = results_path(results_dir, task.id, sub.slug, split, shard)
    _move_stale(path, task, sub.family, log)
    if path.exists() and not force:
        old = results.read(path)
        same = (old.get("submission", {}).get("content_hash") == sub.content_hash
                and old["task"]["fingerprint"] == task.fingerprint(sub.family))
        if same:
            _drop_export(res.export)
            return SubmitResult(True, f"{sub.name}: unchanged since {path} was scored; nothing "
                                "to do (use --force to score again)", path, old)
    n_seeds = task.budget.seeds if seeds is None else int(seeds)
    per_env = shard_seeds(len(task.split(split)), n_seeds, shard)
    limit = timeout if timeout is not None else sum(
        task.budget.max_seconds_per_env + COMPILE_ALLOWANCE_S for s in per_env if s)
    return _Prepared(sub, res, task, split, path, per_env, limit, shard, n_seeds, res.export,
                     check_s)


def _drop_export(export_dir: Path | None) -> None:
    """Removes the check's scratch folder that holds the export (its parent)."""
    if export_dir is not None:
        import shutil

        shutil.rmtree(export_dir.parent, ignore_errors=True)


def _score_alone(p: _Prepared, command: str | None, backend: str, address: str | None,
                 log) -> list[tuple[set, _Cell]]:
    if backend == "ray":
        return _score_on_ray(str(p.sub.path), p.task, p.split, p.per_env, command, address, log,
                             p.export)
    how = "its exported rule" if p.export is not None else "its rule"
    log(f"scoring {p.sub.name} ({how}) on {p.task.id} [{p.split}] in a child process "
        f"(limit {p.limit:g}s)")
    return [(set(range(len(p.per_env))),
             _score_cells(str(p.sub.path), str(p.task.path), p.split, p.per_env, p.limit,
                          command, export_dir=None if p.export is None else str(p.export)))]


def _finish(p: _Prepared, cells: list[tuple[set, _Cell]], results_dir: Path,
            baseline: bool | None, command: str | None, wall_clock_s: float, log,
            seal: Callable[[dict], dict], batch: dict | None = None) -> SubmitResult:
    """Assembles the scored parts into the submission's record, seals it (signed by this
    machine's key, or unsigned: :func:`store.sealer`) and writes it."""
    from metabench import harness, results

    sub, task, split = p.sub, p.task, p.split
    parts, rule, prov = [], None, None
    for i, e in enumerate(task.split(split)):
        cell = next(c for covered, c in cells if i in covered) if p.per_env[i] else None
        if cell is not None and i in cell.parts:
            parts.append(cell.parts[i])
        elif cell is not None:  # its process died before it got to env i
            parts.append(harness.failed_part(e, p.per_env[i], _died(cell.code, cell.err,
                                                                     cell.limit)))
    for _, c in cells:
        rule = rule or c.rule
        prov = prov or c.provenance
        if c.code != 0:
            log(f"scoring process: {_died(c.code, c.err, c.limit)}")
    changed = ((prov or {}).get("numerics") or {}).get("non_default") or []
    if changed:
        log(f"warning: scored under non-default numerics ({', '.join(changed)}); the record "
            "says so and the site marks it (unset them to score under the defaults)")
    if rule is None:
        rule = {"name": sub.name, "family": sub.family, "factory": sub.factory or sub.entry,
                "kwargs": dict(sub.kwargs), "params_hash": None, "note": ""}
    base_mat, base_name = _baseline_matrix(results_dir, task, split, sub.family)
    if base_name == sub.name or p.shard is not None:
        base_mat = None
    rec = harness.assemble(rule, task, split, parts, base_mat, base_name, command, prov)
    is_baseline = baseline if baseline is not None else sub.reference
    rec["submission"] = sub.metadata(baseline=is_baseline)
    rec["check"] = p.check.report
    rec["sandbox"] = p.check.sandbox
    rec["wall_clock_s"] = round(wall_clock_s, 3)
    phases = [c.timing for _, c in cells]
    if len(phases) == 1 and phases[0] is not None:  # one local child: its phases add up
        rec["timing"] = {"check_s": round(p.check_s, 3), **phases[0]}
    if batch is not None:
        rec["batch"] = batch
    if p.shard is not None:
        rec["shard"] = {"index": p.shard[0], "count": p.shard[1], "seeds": p.seeds}
    rec = seal(rec)  # the signature covers exactly what is written
    results.write(p.path, rec)
    _drop_export(p.export)
    return SubmitResult(True, f"{sub.name}: wrote {p.path} (status {rec['status']})", p.path,
                        rec)


def submit(folder: str | os.PathLike, task_id: str, split: str = "test", *,
           results_dir: Path = RESULTS_DIR, force: bool = False,
           shard: tuple[int, int] | None = None, seeds: int | None = None,
           timeout: float | None = None, baseline: bool | None = None,
           log=lambda msg: print(msg, file=sys.stderr), command: str | None = None,
           backend: str = "local", address: str | None = None,
           key_path: str | os.PathLike | None = None,
           unsandboxed: bool = False) -> SubmitResult:
    """Checks, scores in a child process with a wall-clock limit, writes the record.

    ``backend="ray"`` sends one Ray task per env instead (``address`` of a running cluster,
    or None to start a local one); the parts are merged into the same record. The record is
    signed with the key at ``key_path`` (default: :func:`metabench.signing.default_key_path`)
    when there is one, else written unsigned (self-reported)."""
    return _submit(folder, task_id, split, results_dir, force, shard, seeds, timeout, baseline,
                   log, command, backend, address, sealer(key_path, log), unsandboxed)


def _submit(folder: str | os.PathLike, task_id: str, split: str, results_dir: Path,
            force: bool, shard: tuple[int, int] | None, seeds: int | None,
            timeout: float | None, baseline: bool | None, log, command: str | None,
            backend: str, address: str | None, seal: Callable[[dict], dict],
            unsandboxed: bool = False) -> SubmitResult:
    """:func:`submit` with its sealer made: a batch of folders shares one (one key load, one
    warning when there is no key)."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    p = _prepare(folder, task_id, split, results_dir, force, shard, seeds, timeout, log,
                 unsandboxed)
    if isinstance(p, SubmitResult):
        return p
    try:
        t0 = time.perf_counter()
        cells = _score_alone(p, command, backend, address, log)
        return _finish(p, cells, results_dir, baseline, command, time.perf_counter() - t0, log,
                       seal)
    finally:
        _drop_export(p.export)


def submit_many(folders: Sequence[str | os.PathLike], task_id: str, split: str = "test", *,
                batch: bool = False, results_dir: Path = RESULTS_DIR, force: bool = False,
                shard: tuple[int, int] | None = None, seeds: int | None = None,
                timeout: float | None = None, baseline: bool | None = None,
                log=lambda msg: print(msg, file=sys.stderr), command: str | None = None,
                backend: str = "local", address: str | None = None,
                key_path: str | os.PathLike | None = None,
                unsandboxed: bool = False) -> list[SubmitResult]:
    """:func:`submit` for each folder, in order. With ``batch``, submissions sharing a
    :func:`batch_key` train together: per env, one compiled call with their meta-parameters
    stacked (vmapped), in one child process whose limit is the sum of theirs. Each still gets
    its own record (with a ``batch`` block naming the members): a NaN or a diverging agent
    fails only its own runs. If the shared process dies or times out, every member is scored
    again alone. Records are finished in ``folders`` order, so a baseline listed first is the
    others' baseline. Batched numbers match scoring alone up to float rounding (vmapping over
    rules may regroup reductions), so a batched record is reproduced by the same batch."""
    if batch and backend != "local":
        raise ValueError("batching runs submissions in one local process; use "
                         "backend='local' with batch (or no batch on Ray)")
    seal = sealer(key_path, log)
    if not batch:
        return [_submit(f, task_id, split, results_dir, force, shard, seeds, timeout, baseline,
                        log, command, backend, address, seal, unsandboxed) for f in folders]
    done: dict[int, SubmitResult] = {}
    groups: dict[Any, list[tuple[int, _Prepared]]] = {}
    for j, f in enumerate(folders):
        p = _prepare(f, task_id, split, results_dir, force, shard, seeds, timeout, log,
                     unsandboxed)
        if isinstance(p, SubmitResult):
            done[j] = p
        else:
            key = batch_key(p.sub)
            groups.setdefault(("alone", j) if key is None else key, []).append((j, p))
    scored: dict[int, tuple[_Prepared, list, float, dict | None]] = {}
    for members in groups.values():
        if len(members) > 1:
            names = [p.sub.name for _, p in members]
            log(f"scoring {', '.join(names)} on {members[0][1].task.id} [{split}] together in "
                f"one child process (limit {sum(p.limit for _, p in members):g}s)")
            t0 = time.perf_counter()
            cells = _score_batch([p for _, p in members], command)
            wall = (time.perf_counter() - t0) / len(members)
            complete = all(len(c.parts) == sum(map(bool, members[0][1].per_env))
                           and c.code == 0 for c in cells)
            if complete:
                info = {"size": len(members), "members": names,
                        "note": "trained in one compiled call with the other members "
                                "(meta-parameters vmapped); wall_clock_s is its share"}
                for (j, p), c in zip(members, cells):
                    scored[j] = (p, [(set(range(len(p.per_env))), c)], wall, info)
                continue
            reason = _died(cells[0].code, cells[0].err, cells[0].limit)
            log(f"the batch did not complete ({reason}); scoring each member alone")
        for j, p in members:
            t0 = time.perf_counter()
            cells = _score_alone(p, command, backend, address, log)
            scored[j] = (p, cells, time.perf_counter() - t0, None)
    for j in sorted(scored):
        p, cells, wall, info = scored[j]
        done[j] = _finish(p, cells, results_dir, baseline, command, wall, log, seal, info)
    return [done[j] for j in range(len(folders))]
