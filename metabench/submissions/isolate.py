"""Isolation: checking and scoring a submission in child processes of their own.

Building a rule imports submitted code, and training with it may crash, hang or exhaust
memory; so :func:`check` and every scoring run happen in a child process (``python -m
metabench.submissions``, see ``__main__.py``) in its own process group, killed at a
wall-clock limit, and whatever it could not finish becomes a failed part of the record, not a
failure of metabench. Both sides of that exchange live here, so the arguments and the files
the child writes (``check.json``; ``rule.json``, ``provenance.json``, ``part-*.json``,
``error.txt``) are read by the same module that writes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from metabench.submissions.build import batched_rule, build_rule
from metabench.submissions.schema import Submission, SubmissionError, load

CHECK_TIMEOUT_S = 300.0
CHILD_MODULE = "metabench.submissions"
"""What the children run with ``python -m``: the package's ``__main__``, a module nothing
imports, so runpy never executes a module that ``import metabench.submissions`` already
loaded (it warns about that)."""


def _child(args: Sequence[str], timeout: float, capture: bool = True) -> tuple[int | None, str]:
    """Runs ``python -m metabench.submissions ARGS`` in its own process group; returns (exit
    code, or None when it was killed at ``timeout``, and the tail of its stderr). With
    ``capture=False`` stderr (progress) goes straight to ours."""
    cmd = [sys.executable, "-m", CHILD_MODULE, *args]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                stderr=err if capture else None, text=True,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the whole group: XLA threads and anything it spawned
            proc.wait()
            code = None
        err.seek(0)
        text = err.read()
    return code, text[-4000:]


def _died(code: int | None, stderr: str, timeout: float) -> str:
    if code is None:
        return f"did not finish within its wall-clock limit of {timeout:g}s (killed)"
    if code < 0:
        sig = -code
        what = " (out of memory?)" if sig == 9 else ""
        return f"the scoring process was killed by signal {sig}{what}"
    last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return f"the scoring process exited with code {code}: {last[-1] if last else 'no output'}"


@dataclasses.dataclass
class CheckResult:
    """The outcome of ``metabench check``: the YAML's validity, the import, conformance."""

    ok: bool
    message: str
    report: dict | None = None
    submission: Submission | None = None


def check(folder: str | os.PathLike, timeout: float = CHECK_TIMEOUT_S) -> CheckResult:
    """Validates the folder, then imports and conformance-checks the rule in a child."""
    try:
        sub = load(folder)
    except SubmissionError as e:
        return CheckResult(False, str(e))
    with tempfile.TemporaryDirectory(prefix="metabench-check-") as tmp:
        out = Path(tmp) / "check.json"
        code, err = _child(["_check", str(sub.path), str(out)], timeout)
        if code is None:
            return CheckResult(False, f"{sub.path}: building and checking the rule did not "
                               f"finish within {timeout:g}s (a rule that never returns?)",
                               submission=sub)
        if not out.exists():
            return CheckResult(False, f"{sub.path}: {_died(code, err, timeout)}", submission=sub)
        res = json.loads(out.read_text())
    if res.get("error"):
        return CheckResult(False, f"{sub.path}: {res['error']}", submission=sub)
    report = res["report"]
    return CheckResult(report["passed"], res["text"], report, sub)


class _Cell(NamedTuple):
    """What one scoring child process hands back: env parts by env index, and its exit."""

    parts: dict
    rule: dict | None
    provenance: dict | None
    code: int | None
    err: str
    limit: float


def _outputs(out: Path, err: str) -> tuple[Callable[[str], Any], str]:
    """What a scoring child left in ``out``: a reader of its JSON files (None for a file it
    never wrote) and its error, the child's own ``error.txt`` over what its stderr said."""
    if (out / "error.txt").exists():
        err = (out / "error.txt").read_text()
    return (lambda name: json.loads((out / name).read_text()) if (out / name).exists()
            else None), err


def _score_cells(sub_path: str, task_path: str, split: str, per_env: list, limit: float,
                 command: str | None, capture: bool = False) -> _Cell:
    """Scores the envs with seeds in ``per_env`` in one isolated child process."""
    with tempfile.TemporaryDirectory(prefix="metabench-score-") as tmp:
        args = ["_score", sub_path, task_path, split, tmp, json.dumps(per_env)]
        if command:
            args.append(command)
        code, err = _child(args, limit, capture=capture)
        read, err = _outputs(Path(tmp), err)
        parts = {i: part for i in range(len(per_env))
                 if (part := read(f"part-{i}.json")) is not None}
        return _Cell(parts, read("rule.json"), read("provenance.json"), code, err, limit)


def _score_batch(group: Sequence[Any], command: str | None) -> list[_Cell]:
    """Scores a group of one batch key in one isolated child process; one cell per member.
    The members are :mod:`~metabench.submissions.orchestrate`'s prepared submissions (typed
    loosely here: that module calls this one, not the other way round)."""
    p0 = group[0]
    limit = sum(p.limit for p in group)
    with tempfile.TemporaryDirectory(prefix="metabench-batch-") as tmp:
        args = ["_score_batch", json.dumps([str(p.sub.path) for p in group]), str(p0.task.path),
                p0.split, tmp, json.dumps(p0.per_env)]
        if command:
            args.append(command)
        code, err = _child(args, limit, capture=False)
        read, err = _outputs(Path(tmp), err)
        cells = []
        for k in range(len(group)):
            parts = {i: part for i in range(len(p0.per_env))
                     if (part := read(f"part-{k}-{i}.json")) is not None}
            cells.append(_Cell(parts, read(f"rule-{k}.json"), read("provenance.json"), code,
                               err, limit))
        return cells


# --- the child side ------------------------------------------------------------------------


def _child_check(folder: str, out: str) -> int:
    from metabench.families import base as families_base
    from metabench.results import write_json_atomic

    try:
        sub = load(folder)
        ref = build_rule(sub)
        report = families_base.get_family(sub.family).check(ref.rule, ref.meta_params, sub.name)
        text = report.format()
        if ref.note:
            text += f"\nnote: {ref.note}"
        write_json_atomic(out, {"report": report.to_dict(), "text": text})
    except Exception as e:  # report any failure of submitted code as the check's result
        write_json_atomic(out, {"error": f"{type(e).__name__}: {e}"})
    return 0


def _child_score(folder: str, task_path: str, split: str, out: str, per_env_json: str,
                 command: str | None = None) -> int:
    from metabench import harness
    from metabench.tasks import spec
    from metabench.results import write_json_atomic

    out_dir = Path(out)
    try:
        sub = load(folder)
        ref = build_rule(sub)
        task = spec.load(task_path)
    except Exception as e:  # recorded as every run's reason by the parent
        (out_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
        return 1
    write_json_atomic(out_dir / "rule.json", harness.rule_block(ref))
    write_json_atomic(out_dir / "provenance.json", harness.provenance(command))
    per_env = json.loads(per_env_json)
    for i, (e, seeds) in enumerate(zip(task.split(split), per_env)):
        if not seeds:
            continue
        run = harness.train_env(ref, task, e, seeds, max_seconds=task.budget.max_seconds_per_env,
                                progress=_stderr_progress)
        write_json_atomic(out_dir / f"part-{i}.json", harness.env_part(run, task.scoring.window))
    return 0


def _child_score_batch(folders_json: str, task_path: str, split: str, out: str,
                       per_env_json: str, command: str | None = None) -> int:
    from metabench import harness
    from metabench.tasks import spec
    from metabench.results import write_json_atomic

    out_dir = Path(out)
    try:
        subs = [load(f) for f in json.loads(folders_json)]
        refs, rule, meta_batch = batched_rule(subs)
        task = spec.load(task_path)
    except Exception as e:  # the parent scores every member alone instead
        (out_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
        return 1
    for k, ref in enumerate(refs):
        write_json_atomic(out_dir / f"rule-{k}.json", harness.rule_block(ref))
    write_json_atomic(out_dir / "provenance.json", harness.provenance(command))
    for i, (e, seeds) in enumerate(zip(task.split(split), json.loads(per_env_json))):
        if not seeds:
            continue
        runs = harness.train_population(
            subs[0].family, rule, meta_batch, task, e, seeds,
            max_seconds=task.budget.max_seconds_per_env * len(subs), progress=_stderr_progress)
        if runs[0].failure is not None:  # shared by all: the parent retries each alone
            (out_dir / "error.txt").write_text(f"{e.name}: {runs[0].failure}\n")
            return 1
        for k, run in enumerate(runs):
            write_json_atomic(out_dir / f"part-{k}-{i}.json",
                              harness.env_part(run, task.scoring.window))
    return 0


def _stderr_progress(env: str, done: int, total: int, steps: int, seconds: float) -> None:
    if done == total:
        print(f"  {env}: {done}/{total} updates, {steps:,} env steps per seed, {seconds:.1f}s",
              file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_check":
        return _child_check(*argv[1:3])
    if argv and argv[0] == "_score":
        return _child_score(*argv[1:])
    if argv and argv[0] == "_score_batch":
        return _child_score_batch(*argv[1:])
    print("internal entry point of metabench's isolated checks; use `metabench check` or "
          "`metabench submit`", file=sys.stderr)
    return 2
