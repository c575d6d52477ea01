"""Isolation: checking and scoring a submission in child processes of their own.

Building a rule imports submitted code, and training with it may crash, hang or exhaust
memory; so :func:`check` and every scoring run happen in child processes (``python -m
metabench.submissions``, see ``__main__.py``) in their own process groups, killed at a
wall-clock limit (and with their parent), and whatever a child could not finish becomes a
failed part of the record, not a failure of metabench.

Only the check child imports a submission's ``rule.py``, and it runs in the sandbox of
:mod:`metabench.submissions.sandbox` (no writes outside its scratch directory, no network,
bounded memory, CPU time and processes). Given a task, it also exports the rule's ``apply``
for that task's envs (:mod:`metabench.submissions.export`); the scoring child loads that
export and never imports the submission. Reference factories and loss graphs are built by
metabench's own code and are scored in-process. Both sides of each exchange live here, so
the arguments and the files a child writes (``check.json`` and the export folder;
``rule.json``, ``provenance.json``, ``part-*.json``, ``error.txt``) are read by the same
module that writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import metabench.submissions.sandbox as sandbox
from metabench.caches import compilation_cache_dir
from metabench.progress import Reporter
from metabench.results import write_json_atomic
from metabench.submissions.build import batched_rule, build_rule
from metabench.submissions.schema import Submission, SubmissionError, load

CHECK_TIMEOUT_S = 300.0
MAX_CHECK_BYTES = 2**20
"""The largest check report read back from the sandbox."""
PARENT_ENV = "METABENCH_PARENT_PID"
"""Set for a child that is not sandboxed: it dies with that process (the sandbox's own
children get the same from the jail)."""
CHILD_MODULE = "metabench.submissions"
"""What the children run with ``python -m``: the package's ``__main__``, a module nothing
imports, so runpy never executes a module that ``import metabench.submissions`` already
loaded (it warns about that)."""


def _child(args: Sequence[str], timeout: float, capture: bool = True,
           policy: "sandbox.Policy | None" = None) -> tuple[int | None, str]:
    """Runs ``python -m metabench.submissions ARGS`` in its own process group (in the
    sandbox ``policy`` when given); returns (exit code, or None when it was killed at
    ``timeout``, and the tail of its stderr). With ``capture=False`` stderr (progress) goes
    straight to ours. The child dies with this process (and is killed on SIGINT, SIGTERM or
    an exception here): no orphan outlives the scorer."""
    if policy is not None:
        cmd = sandbox.command(policy, CHILD_MODULE, list(args))
        env = sandbox.environ(policy, _sandbox_environ())
        # MuJoCo (under brax and gymnasium) otherwise probes its GL library in a subprocess
        # at import, which the sandbox forbids; nothing here renders.
        env["MUJOCO_GL"] = "disable"
    else:
        cmd = [sys.executable, "-m", CHILD_MODULE, *args]
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
    return sandbox.run(cmd, timeout, env=env, capture=capture)


_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONHASHSEED")
_WITHHELD_ENV = ("JAX_COMPILATION_CACHE_DIR",)
"""The scorer's compilation cache is outside the sandbox (and the sandbox must never write
programs the scorer would load)."""
_PASSED_PREFIXES = ("JAX_", "XLA_", "TF_CPP_", "OMP_", "OPENBLAS_", "MKL_")


def _sandbox_environ() -> dict[str, str]:
    """The environment a sandboxed child gets: the locale and the numerics settings, not
    this process's secrets (tokens and keys in the environment could otherwise be written
    into the check's report, which a record publishes)."""
    return {k: v for k, v in os.environ.items()
            if (k in _PASSED_ENV or k.startswith(_PASSED_PREFIXES)) and k not in _WITHHELD_ENV}


def build_policy(scratch: Path, reads: Sequence[Path], unsandboxed: bool,
                 own_code: bool = False) -> "tuple[sandbox.Policy | None, dict]":
    """The sandbox for a child that imports submitted code, and what the record says of it.
    Raises :class:`SandboxUnavailable` where this machine cannot sandbox and the user did
    not pass ``--unsandboxed``; ``own_code`` (a reference factory or a loss graph, which
    metabench builds itself) is then checked without one."""
    if unsandboxed:
        return None, {"sandboxed": False,
                      "reason": "scored with --unsandboxed: the submission's code ran with "
                                "the scorer's own permissions"}
    support = sandbox.support()
    if not support.ok and own_code:
        return None, {"sandboxed": False,
                      "reason": f"no submitted Python (metabench builds this rule itself); "
                                f"this machine cannot sandbox: {support.reason}"}
    if not support.ok:
        raise SandboxUnavailable(
            f"this machine cannot sandbox submitted code ({support.reason}); metabench will "
            "not run someone else's code without it. Pass --unsandboxed to run it anyway "
            "(only for code you trust; the record will say so)")
    policy = sandbox.Policy(scratch=str(scratch), reads=tuple(str(p) for p in reads))
    return policy, sandbox.describe(policy)


class SandboxUnavailable(RuntimeError):
    """This machine cannot sandbox, and running unsandboxed was not asked for."""


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
    sandbox: dict | None = None
    """What the check child ran under (:func:`build_policy`), for the record."""
    export: Path | None = None
    """The folder holding the rule exported for the task, where one was asked for and the
    rule is the submission's own code."""


def needs_export(sub: Submission) -> bool:
    """Whether the submission's rule is its own Python (scored through an export) rather
    than a reference factory or a loss graph, which metabench builds itself."""
    return sub.factory is None and not (sub.entry or "").startswith("graph:")


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def check(folder: str | os.PathLike, timeout: float = CHECK_TIMEOUT_S, *,
          task_path: str | None = None, split: str = "test", export_dir: Path | None = None,
          unsandboxed: bool = False) -> CheckResult:
    """Validates the folder, then imports and conformance-checks the rule in a sandboxed
    child. With ``task_path`` and ``export_dir``, the child also exports a submission's own
    rule for that task's ``split`` envs into ``export_dir`` (which it may write)."""
    try:
        sub = load(folder)
    except SubmissionError as e:
        return CheckResult(False, str(e))
    want_export = export_dir is not None and task_path is not None and needs_export(sub)
    memo = None if needs_export(sub) else _check_memo(sub, unsandboxed)
    if memo is not None and memo.exists():
        try:
            kept = json.loads(memo.read_text())
            return CheckResult(True, kept["text"], kept["report"], sub,
                               {**kept["sandbox"], "reused": REUSED})
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable memo: check again
    result = _check(sub, timeout, task_path, split, export_dir, want_export, unsandboxed)
    if memo is not None and result.ok and result.sandbox is not None:
        write_json_atomic(memo, {"text": result.message, "report": result.report,
                                 "sandbox": result.sandbox})
    return result


REUSED = ("the check report of an earlier check of the same submission content with the same "
          "metabench code, libraries and sandbox setting (a reference factory or loss graph)")


def _check_memo(sub: Submission, unsandboxed: bool) -> Path | None:
    """Where a passed check of a reference factory or loss graph is kept, so that re-scoring
    it (``make run`` again) does not check it again: beside the compilation cache, named by
    everything the check's outcome depends on. None when the cache is turned off. A
    submission's own code is always checked again: its check also exports the rule."""
    programs = compilation_cache_dir()
    if programs is None:
        return None
    root = Path(programs + "-checks")
    key = hashlib.sha256(json.dumps([sub.content_hash, _code_hash(), _versions(),
                                     sys.version, unsandboxed]).encode()).hexdigest()
    return root / f"{key}.json"


@functools.lru_cache(maxsize=None)
def _code_hash() -> str:
    """sha256 of metabench's own source (every module and task file): a changed family check
    or task never reuses an old check."""
    h = hashlib.sha256()
    pkg = _package_dir()
    for path in sorted(pkg.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".yaml", ".npz", ".json", ".msgpack"):
            h.update(str(path.relative_to(pkg)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _versions() -> list:
    from importlib import metadata

    out = []
    for lib in ("jax", "jaxlib", "numpy", "flax", "optax", "gymnax"):
        try:
            out.append((lib, metadata.version(lib)))
        except metadata.PackageNotFoundError:
            out.append((lib, None))
    return out


def _check(sub: Submission, timeout: float, task_path: str | None, split: str,
           export_dir: Path | None, want_export: bool, unsandboxed: bool) -> CheckResult:
    """:func:`check` after the folder loaded: the child, and reading what it wrote."""
    with tempfile.TemporaryDirectory(prefix="metabench-check-") as tmp:
        # The sandbox writes only its scratch directory: the export's folder is kept there.
        scratch = Path(export_dir) if want_export else Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        out = scratch / "check.json"
        rule_dir = scratch / "rule"
        reads = [sub.path.resolve(), _package_dir()]
        if task_path is not None:
            reads.append(Path(task_path).resolve())
        try:
            policy, info = build_policy(scratch, reads, unsandboxed,
                                        own_code=not needs_export(sub))
        except SandboxUnavailable as e:
            return CheckResult(False, f"{sub.path}: {e}", submission=sub)
        job = {"folder": str(sub.path), "out": str(out)}
        if want_export:
            job.update(task=str(task_path), split=split, export=str(rule_dir))
        code, err = _child(["_check", json.dumps(job)], timeout, policy=policy)
        if code is None:
            return CheckResult(False, f"{sub.path}: building and checking the rule did not "
                               f"finish within {timeout:g}s (a rule that never returns?)",
                               submission=sub, sandbox=info)
        try:  # the sandbox's word: bounded, and only a dict is a report
            res = (json.loads(out.read_text()) if out.exists()
                   and out.stat().st_size <= MAX_CHECK_BYTES else None)
        except ValueError:
            res = None
        if not isinstance(res, dict):
            return CheckResult(False, f"{sub.path}: {_died(code, err, timeout)}", submission=sub,
                               sandbox=info)
    if res.get("error"):
        return CheckResult(False, f"{sub.path}: {str(res['error'])[:4000]}", submission=sub,
                           sandbox=info)
    report = res.get("report")
    if not isinstance(report, dict) or not isinstance(res.get("text"), str):
        return CheckResult(False, f"{sub.path}: the check wrote no report", submission=sub,
                           sandbox=info)
    return CheckResult(report.get("passed") is True, res["text"][:20000], report, sub, info,
                       rule_dir if want_export else None)


class _Cell(NamedTuple):
    """What one scoring child process hands back: env parts by env index, and its exit."""

    parts: dict
    rule: dict | None
    provenance: dict | None
    code: int | None
    err: str
    limit: float
    timing: dict | None = None
    """Seconds of the child's phases (:func:`_phases`), when it got that far."""


def _outputs(out: Path, err: str) -> tuple[Callable[[str], Any], str]:
    """What a scoring child left in ``out``: a reader of its JSON files (None for a file it
    never wrote) and its error, the child's own ``error.txt`` over what its stderr said."""
    if (out / "error.txt").exists():
        err = (out / "error.txt").read_text()
    return (lambda name: json.loads((out / name).read_text()) if (out / name).exists()
            else None), err


def _score_cells(sub_path: str, task_path: str, split: str, per_env: list, limit: float,
                 command: str | None, capture: bool = False,
                 export_dir: str | None = None) -> _Cell:
    """Scores the envs with seeds in ``per_env`` in one isolated child process; a rule of
    the submission's own code is loaded from ``export_dir`` (see :func:`check`)."""
    with tempfile.TemporaryDirectory(prefix="metabench-score-") as tmp:
        job = {"folder": sub_path, "task": task_path, "split": split, "out": tmp,
               "per_env": per_env, "command": command, "export": export_dir}
        spawned = time.time()
        code, err = _child(["_score", json.dumps(job)], limit, capture=capture)
        read, err = _outputs(Path(tmp), err)
        parts = {i: part for i in range(len(per_env))
                 if (part := read(f"part-{i}.json")) is not None}
        return _Cell(parts, read("rule.json"), read("provenance.json"), code, err, limit,
                     _phases(spawned, read("timing.json")))


_STAMPS: dict[str, float] = {}
"""Wall-clock stamps of this scoring child's phases (``time.time()``): written to
``timing.json``, turned into seconds by the parent."""


def _phases(spawned: float, stamps: dict | None) -> dict | None:
    """Seconds of a scoring child's phases: interpreter start, imports (JAX, metabench, the
    task and the rule), compiling (the envs' programs, side by side) and training."""
    names = ("main", "imported", "compiled", "trained")
    if not isinstance(stamps, dict) or not all(isinstance(stamps.get(k), float) for k in names):
        return None
    t = [spawned] + [stamps[k] for k in names]
    return {k: round(b - a, 3) for k, a, b in zip(("start_s", "import_s", "compile_s",
                                                   "train_s"), t, t[1:])}


def _score_batch(group: Sequence[Any], command: str | None) -> list[_Cell]:
    """Scores a group of one batch key in one isolated child process; one cell per member.
    The members are :mod:`~metabench.submissions.orchestrate`'s prepared submissions (typed
    loosely here: that module calls this one, not the other way round)."""
    p0 = group[0]
    limit = sum(p.limit for p in group)
    with tempfile.TemporaryDirectory(prefix="metabench-batch-") as tmp:
        job = {"folders": [str(p.sub.path) for p in group], "task": str(p0.task.path),
               "split": p0.split, "out": tmp, "per_env": p0.per_env, "command": command}
        code, err = _child(["_score_batch", json.dumps(job)], limit, capture=False)
        read, err = _outputs(Path(tmp), err)
        cells = []
        for k in range(len(group)):
            parts = {i: part for i in range(len(p0.per_env))
                     if (part := read(f"part-{k}-{i}.json")) is not None}
            cells.append(_Cell(parts, read(f"rule-{k}.json"), read("provenance.json"), code,
                               err, limit))
        return cells


# --- the child side ------------------------------------------------------------------------


def _child_check(job_json: str) -> int:
    """The sandboxed side of :func:`check`: builds and checks the rule, then (when asked)
    exports it for the task's envs. Everything it writes is untrusted data to the parent."""
    job = json.loads(job_json)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # export for any platform, run on none
    from metabench.families import base as families_base

    out = job["out"]
    try:
        sub = load(job["folder"])
        ref = build_rule(sub)
        fam = families_base.get_family(sub.family)
        report = fam.check(ref.rule, ref.meta_params, sub.name)
        text = report.format()
        if ref.note:
            text += f"\nnote: {ref.note}"
        if report.passed and job.get("export"):
            import metabench.submissions.export as export
            from metabench.tasks import spec

            task = spec.load(job["task"])
            signatures = export.call_signatures(sub.family, ref.rule, ref.meta_params, task,
                                                job["split"])
            Path(job["export"]).mkdir()
            export.export_rule(ref.rule, ref.meta_params, signatures, fam.rule_vjp_order,
                               export.platforms(), Path(job["export"]))
        write_json_atomic(out, {"report": report.to_dict(), "text": text})
    except Exception as e:  # report any failure of submitted code as the check's result
        write_json_atomic(out, {"error": f"{type(e).__name__}: {e}"})
    return 0


def exported_ref(sub: Submission, export_dir: str | os.PathLike):
    """The RuleRef of a submission's own rule, loaded from its export (the submission's
    code is not imported)."""
    import jax

    from metabench import harness
    import metabench.submissions.export as export

    loaded = export.load(export_dir, sub.family, jax.default_backend())
    return harness.RuleRef(sub.name, sub.family, loaded.rule, loaded.meta_params, sub.entry,
                           tuple(sorted(sub.kwargs.items())), ""), loaded.params_hash


def _child_score(job_json: str) -> int:
    from metabench import harness
    from metabench.harness import train

    train.use_compilation_cache()
    from metabench.tasks import spec

    job = json.loads(job_json)
    out_dir = Path(job["out"])
    split, command = job["split"], job.get("command")
    try:
        sub = load(job["folder"])
        if needs_export(sub):
            if not job.get("export"):
                raise ValueError("a submission's own rule is scored from its export only")
            ref, phash = exported_ref(sub, job["export"])
        else:
            ref, phash = build_rule(sub), None
        task = spec.load(job["task"])
    except Exception as e:  # recorded as every run's reason by the parent
        (out_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
        return 1
    block = harness.rule_block(ref)
    if phash is not None:  # the tree's hash, as an in-process build would state it
        block["params_hash"] = phash
    write_json_atomic(out_dir / "rule.json", block)
    write_json_atomic(out_dir / "provenance.json", harness.provenance(command))
    per_env = job["per_env"]
    _STAMPS["imported"] = time.time()
    ahead = train.precompile(ref, task, list(zip(task.split(split), per_env)))
    _STAMPS["compiled"] = time.time()
    with Reporter() as show:
        for i, (e, seeds) in enumerate(zip(task.split(split), per_env)):
            if not seeds:
                continue
            run = harness.train_env(ref, task, e, seeds,
                                    max_seconds=task.budget.max_seconds_per_env, progress=show)
            run = dataclasses.replace(run, compile_s=run.compile_s + ahead.get(e.name, 0.0))
            write_json_atomic(out_dir / f"part-{i}.json",
                              harness.env_part(run, task.scoring.window))
    _STAMPS["trained"] = time.time()
    write_json_atomic(out_dir / "timing.json", _STAMPS)
    return 0


def _child_score_batch(job_json: str) -> int:
    from metabench import harness
    from metabench.harness import train

    train.use_compilation_cache()
    from metabench.tasks import spec

    job = json.loads(job_json)
    out_dir = Path(job["out"])
    split, command, per_env_json = job["split"], job.get("command"), job["per_env"]
    try:
        subs = [load(f) for f in job["folders"]]
        if any(needs_export(s) for s in subs):
            raise ValueError("only reference factories and loss graphs train in a batch")
        refs, rule, meta_batch = batched_rule(subs)
        task = spec.load(job["task"])
    except Exception as e:  # the parent scores every member alone instead
        (out_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
        return 1
    for k, ref in enumerate(refs):
        write_json_atomic(out_dir / f"rule-{k}.json", harness.rule_block(ref))
    write_json_atomic(out_dir / "provenance.json", harness.provenance(command))
    with Reporter() as show:
        for i, (e, seeds) in enumerate(zip(task.split(split), per_env_json)):
            if not seeds:
                continue
            runs = harness.train_population(
                subs[0].family, rule, meta_batch, task, e, seeds,
                max_seconds=task.budget.max_seconds_per_env * len(subs), progress=show)
            if runs[0].failure is not None:  # shared by all: the parent retries each alone
                (out_dir / "error.txt").write_text(f"{e.name}: {runs[0].failure}\n")
                return 1
            for k, run in enumerate(runs):
                write_json_atomic(out_dir / f"part-{k}-{i}.json",
                                  harness.env_part(run, task.scoring.window))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    _STAMPS["main"] = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(PARENT_ENV, "").isdigit():
        sandbox.die_with_parent(int(os.environ.pop(PARENT_ENV)))
    if len(argv) == 2 and argv[0] == "_check":
        return _child_check(argv[1])
    if len(argv) == 2 and argv[0] == "_score":
        return _child_score(argv[1])
    if len(argv) == 2 and argv[0] == "_score_batch":
        return _child_score_batch(argv[1])
    print("internal entry point of metabench's isolated checks; use `metabench check` or "
          "`metabench submit`", file=sys.stderr)
    return 2
