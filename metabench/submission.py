"""Submissions: load and validate a folder, hash its content, check and score it in isolation.

A submission is a folder with ``submission.yaml`` (metadata, the entry point, an optional
parameters file with its sha256, and a meta-training disclosure), an optional ``rule.py``
and an optional parameters file (``.npz`` or flax ``.msgpack``). Loading the YAML never runs
submitted code; building the rule imports ``rule.py`` and is done in a child process
(``python -m metabench._child``) by :func:`check` and :func:`submit`, so that a rule that
crashes, hangs or exhausts memory harms nothing but its own record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from metabench import yamlfile
from metabench.params_io import load_params, sha256, tree_signature
from metabench.results import slug
from metabench.yamlfile import FieldError

SUBMISSION_FILE = "submission.yaml"
RESULTS_DIR = Path("leaderboard/results")
COMPILE_ALLOWANCE_S = 300.0
"""Added to each env's wall-clock budget for compilation before the child is killed."""
CHECK_TIMEOUT_S = 300.0

REQUIRED = ("name", "version", "authors", "family", "description", "licence", "rule",
            "disclosure")
OPTIONAL = ("affiliation", "paper", "code", "params")


class SubmissionError(FieldError):
    """A malformed submission: names the file, the key and what was expected."""


@dataclasses.dataclass(frozen=True)
class Disclosure:
    """What meta-training the submitted rule has seen, as its authors declare it."""

    task: str | None
    """The task whose train split was used (None for hand-designed rules)."""
    train_envs: tuple[str, ...]
    """Env ids meta-trained on."""
    env_steps: float | None
    """Total env steps spent on meta-training."""
    accelerator_hours: float | None
    """Accelerator-hours spent on meta-training."""
    notes: str
    """Anything else a reader should know."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """A validated submission folder (nothing of it has been imported)."""

    path: Path
    """The folder."""
    name: str
    """Display name; records are stored under :func:`slug` of it."""
    version: str
    """The authors' version string."""
    authors: tuple[str, ...]
    """Author names."""
    affiliation: str
    """Affiliation(s)."""
    family: str
    """The family whose slot the rule fills."""
    description: str
    """What the rule is."""
    paper: str
    """Paper URL, or empty."""
    code: str
    """Code URL, or empty."""
    licence: str
    """Licence of the rule and its parameters."""
    factory: str | None
    """A reference rule name of the family (``rule: {factory: dpo}``), or None."""
    entry: str | None
    """``rule.py:make_rule`` style entry point inside the folder, ``graph:FILE.yaml`` for a
    loss graph, or None."""
    kwargs: Mapping[str, Any]
    """Keyword arguments of the factory or entry point."""
    params_file: str | None
    """Parameters file inside the folder, or None (the rule's own defaults)."""
    params_sha256: str | None
    """Declared sha256 of the parameters file (verified on load)."""
    disclosure: Disclosure
    """Meta-training disclosure."""
    content_hash: str
    """sha256 over the YAML, the entry file and the parameters file."""

    @property
    def slug(self) -> str:
        return slug(self.name)

    @property
    def control(self) -> bool:
        """Whether the rule is one of its family's controls (a reference rule that gives the
        agent no learning signal, ``RuleInfo.control``)."""
        if self.factory is None:
            return False
        from metabench.families import get_family

        info = get_family(self.family).reference_rules.get(self.factory)
        return bool(info is not None and info.control)

    def metadata(self, baseline: bool = False) -> dict:
        """The ``submission`` block of a result record."""
        d = self.disclosure
        return {"name": self.name, "version": self.version, "authors": list(self.authors),
                "affiliation": self.affiliation, "family": self.family,
                "description": self.description, "paper": self.paper, "code": self.code,
                "licence": self.licence, "content_hash": self.content_hash,
                "params_sha256": self.params_sha256, "baseline": baseline,
                "control": self.control,
                "disclosure": {"task": d.task, "train_envs": list(d.train_envs),
                               "env_steps": d.env_steps,
                               "accelerator_hours": d.accelerator_hours, "notes": d.notes}}


def _inside(folder: Path, rel: str, file: Path, key: str) -> Path:
    """Resolves ``rel`` inside ``folder``; anything escaping it (``..``, absolute paths,
    symlinks pointing out) is an error."""
    if not isinstance(rel, str) or not rel:
        raise SubmissionError(file, key, f"a file name inside the folder, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise SubmissionError(file, key, f"a path inside the submission folder, got {rel!r}")
    full = (folder / p).resolve()
    if folder.resolve() not in full.parents:
        raise SubmissionError(file, key, f"a path inside the submission folder; {rel!r} "
                              f"resolves to {full}")
    if not full.is_file():
        raise SubmissionError(file, key, f"an existing file, {rel!r} is missing")
    return full


def load(folder: str | os.PathLike) -> Submission:
    """Parses and validates ``folder/submission.yaml`` without running any submitted code."""
    from metabench.families import base as families_base

    folder = Path(folder)
    file = folder / SUBMISSION_FILE
    if not folder.is_dir():
        raise SubmissionError(folder, "<folder>", "a submission folder")
    if not file.is_file():
        raise SubmissionError(file, "<file>", f"a {SUBMISSION_FILE} in the folder")
    raw = yamlfile.read(file, SubmissionError)
    if not isinstance(raw, dict):
        raise SubmissionError(file, "<top level>", "a mapping")
    unknown = sorted(set(map(str, raw)) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise SubmissionError(file, unknown[0], f"unknown key; expected one of "
                              f"{', '.join(REQUIRED + OPTIONAL)}")
    for k in REQUIRED:
        if k not in raw:
            raise SubmissionError(file, k, "missing")

    def text(key: str, value: Any, allow_empty: bool = False) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise SubmissionError(file, key, f"a non-empty string, got {value!r}")
        return value

    authors = raw["authors"]
    if isinstance(authors, str):
        authors = [authors]
    if not isinstance(authors, list) or not authors:
        raise SubmissionError(file, "authors", "a non-empty list of names")
    authors = tuple(text(f"authors[{i}]", a) for i, a in enumerate(authors))

    family = text("family", raw["family"])
    try:
        fam = families_base.get_family(family)
    except KeyError:
        raise SubmissionError(file, "family", f"a known family "
                              f"({', '.join(families_base.families())}), got {family!r}") from None

    rule = raw["rule"]
    if not isinstance(rule, dict):
        raise SubmissionError(file, "rule", "a mapping with `factory` or `entry`")
    bad = sorted(set(rule) - {"factory", "entry", "graph", "kwargs"})
    if bad:
        raise SubmissionError(file, f"rule.{bad[0]}", "unknown key; expected factory, entry, "
                              "graph, kwargs")
    if sum(k in rule for k in ("factory", "entry", "graph")) != 1:
        raise SubmissionError(file, "rule", "exactly one of `factory` (a reference rule name), "
                              "`entry` (e.g. rule.py:make_rule) or `graph` (a loss graph YAML)")
    factory = entry = None
    extra_files: list[Path] = []
    if "graph" in rule:
        if family != "td_loss":
            raise SubmissionError(file, "rule.graph", "a family with loss graphs (td_loss), "
                                  f"not {family}")
        gpath = _inside(folder, text("rule.graph", rule["graph"]), file, "rule.graph")
        extra_files.append(gpath)
        entry = f"graph:{rule['graph']}"
    if "factory" in rule:
        factory = text("rule.factory", rule["factory"])
        if factory not in fam.reference_rules:
            raise SubmissionError(file, "rule.factory", f"a {family} reference rule "
                                  f"({', '.join(sorted(fam.reference_rules))}), got {factory!r}")
    elif "entry" in rule:
        entry = text("rule.entry", rule["entry"])
        if entry.count(":") != 1 or not entry.split(":")[1].isidentifier():
            raise SubmissionError(file, "rule.entry", f"FILE.py:FUNCTION, got {entry!r}")
        path = entry.split(":")[0]
        if not path.endswith(".py"):
            raise SubmissionError(file, "rule.entry", f"a .py file, got {path!r}")
        extra_files.append(_inside(folder, path, file, "rule.entry"))
    kwargs = rule.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise SubmissionError(file, "rule.kwargs", "a mapping of keyword arguments")

    params_file = params_sha = None
    if raw.get("params") is not None:
        params = raw["params"]
        if not isinstance(params, dict) or set(params) - {"file", "sha256"} or "file" not in params:
            raise SubmissionError(file, "params", "a mapping {file: NAME, sha256: HEX}")
        params_file = params["file"]
        full = _inside(folder, params_file, file, "params.file")
        if full.suffix not in (".npz", ".msgpack"):
            raise SubmissionError(file, "params.file", f"a .npz or .msgpack file, got "
                                  f"{params_file!r}")
        params_sha = params.get("sha256")
        if not isinstance(params_sha, str) or not re.fullmatch(r"[0-9a-f]{64}", params_sha):
            raise SubmissionError(file, "params.sha256", "the file's sha256 as 64 hex digits "
                                  f"(it is {sha256(full)})")
        actual = sha256(full)
        if actual != params_sha:
            raise SubmissionError(file, "params.sha256", f"the sha256 of {params_file} "
                                  f"({actual}), got {params_sha}")
        extra_files.append(full)

    d = raw["disclosure"]
    if not isinstance(d, dict):
        raise SubmissionError(file, "disclosure", "a mapping (task, train_envs, env_steps, "
                              "accelerator_hours, notes)")
    bad = sorted(set(d) - {"task", "train_envs", "env_steps", "accelerator_hours", "notes"})
    if bad:
        raise SubmissionError(file, f"disclosure.{bad[0]}", "unknown key; expected task, "
                              "train_envs, env_steps, accelerator_hours, notes")

    def number(key: str) -> float | None:
        v = d.get(key)
        if v is None:
            return None
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise SubmissionError(file, f"disclosure.{key}", f"a number or null, got {v!r}") from None
        if v < 0:
            raise SubmissionError(file, f"disclosure.{key}", f"a non-negative number, got {v}")
        return v

    envs = d.get("train_envs") or []
    if not isinstance(envs, list):
        raise SubmissionError(file, "disclosure.train_envs", "a list of env ids")
    disclosure = Disclosure(
        task=None if d.get("task") is None else text("disclosure.task", d["task"]),
        train_envs=tuple(text(f"disclosure.train_envs[{i}]", e) for i, e in enumerate(envs)),
        env_steps=number("env_steps"), accelerator_hours=number("accelerator_hours"),
        notes=text("disclosure.notes", d.get("notes") or "", allow_empty=True))

    h = hashlib.sha256(file.read_bytes())
    for f in extra_files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return Submission(
        path=folder, name=text("name", raw["name"]), version=text("version", raw["version"]),
        authors=authors, affiliation=text("affiliation", raw.get("affiliation") or "", True),
        family=family, description=text("description", raw["description"]),
        paper=text("paper", raw.get("paper") or "", True),
        code=text("code", raw.get("code") or "", True), licence=text("licence", raw["licence"]),
        factory=factory, entry=entry, kwargs=dict(kwargs), params_file=params_file,
        params_sha256=params_sha, disclosure=disclosure, content_hash=h.hexdigest())


# --- building the rule (imports submitted code: call in a child process) -------------------


def build_rule(sub: Submission):
    """The submission's :class:`~metabench.harness.RuleRef`: imports the entry point, loads
    and verifies the parameters against the rule's ``init`` structure."""
    import jax

    from metabench import harness
    from metabench.families import base as families_base
    from metabench.rules import UpdateRule

    file = sub.path / SUBMISSION_FILE
    note = ""
    if sub.factory is not None:
        info = families_base.get_family(sub.family).reference_rules[sub.factory]
        rule = info.factory(**sub.kwargs)
        origin = f"{sub.family}.{info.factory.__name__}"
        default = info.default_params
    elif sub.entry.startswith("graph:"):
        from metabench.families import td_loss

        rel = sub.entry.split(":", 1)[1]
        graph = td_loss.load_graph(_inside(sub.path, rel, file, "rule.graph"))
        td_loss.typecheck(graph)
        rule, origin, default = td_loss.compile_graph(graph), sub.entry, None
        note = f"loss graph: {td_loss.equation(graph)}"
    else:
        rel, fn_name = sub.entry.split(":")
        path = _inside(sub.path, rel, file, "rule.entry")
        spec = importlib.util.spec_from_file_location(f"metabench_submission_{sub.slug}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(sub.path.resolve()))  # let rule.py import its siblings
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(sub.path.resolve()))
        if not hasattr(module, fn_name):
            raise SubmissionError(file, "rule.entry", f"{rel} to define {fn_name}()")
        rule = getattr(module, fn_name)(**sub.kwargs)
        origin, default = sub.entry, None
        if not isinstance(rule, UpdateRule):
            if isinstance(rule, tuple) and len(rule) == 2 and all(map(callable, rule)):
                rule = UpdateRule(*rule)
            else:
                raise SubmissionError(file, "rule.entry", f"{fn_name}() to return an "
                                      f"UpdateRule(init, apply), got {type(rule).__name__}")
    init_params = rule.init(jax.random.PRNGKey(0))
    if sub.params_file is not None:
        meta_params = load_params(sub.path / sub.params_file)
        want, got = tree_signature(init_params), tree_signature(meta_params)
        if want != got:
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            shape = sorted(k for k in set(want) & set(got) if want[k] != got[k])
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:5])}")
            if extra:
                parts.append(f"unexpected {', '.join(extra[:5])}")
            if shape:
                parts.append(", ".join(f"{k} has shape {got[k][0]} {got[k][1]}, expected "
                                       f"{want[k][0]} {want[k][1]}" for k in shape[:5]))
            raise SubmissionError(file, "params.file", "parameters with the structure of the "
                                  f"rule's init(); {'; '.join(parts)}")
        meta_params = jax.tree_util.tree_map(lambda a, b: jax.numpy.asarray(b, a.dtype),
                                             init_params, meta_params)
    elif default is not None:
        meta_params, note = default(rule)
    else:
        meta_params = init_params
    return harness.RuleRef(sub.name, sub.family, rule, meta_params, origin,
                           tuple(sorted(sub.kwargs.items())), note)


# --- child processes -----------------------------------------------------------------------


def _child(args: Sequence[str], timeout: float, capture: bool = True) -> tuple[int | None, str]:
    """Runs ``python -m metabench._child ARGS`` in its own process group; returns (exit
    code, or None when it was killed at ``timeout``, and the tail of its stderr). With
    ``capture=False`` stderr (progress) goes straight to ours."""
    cmd = [sys.executable, "-m", "metabench._child", *args]
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


class _Cell(NamedTuple):
    """What one scoring child process hands back: env parts by env index, and its exit."""

    parts: dict
    rule: dict | None
    provenance: dict | None
    code: int | None
    err: str
    limit: float


def _score_cells(sub_path: str, task_path: str, split: str, per_env: list, limit: float,
                 command: str | None, capture: bool = False) -> _Cell:
    """Scores the envs with seeds in ``per_env`` in one isolated child process."""
    with tempfile.TemporaryDirectory(prefix="metabench-score-") as tmp:
        args = ["_score", sub_path, task_path, split, tmp, json.dumps(per_env)]
        if command:
            args.append(command)
        code, err = _child(args, limit, capture=capture)
        out = Path(tmp)
        if (out / "error.txt").exists():
            err = (out / "error.txt").read_text()
        parts = {i: json.loads((out / f"part-{i}.json").read_text())
                 for i in range(len(per_env)) if (out / f"part-{i}.json").exists()}
        read = lambda name: (json.loads((out / name).read_text())  # noqa: E731
                             if (out / name).exists() else None)
        return _Cell(parts, read("rule.json"), read("provenance.json"), code, err, limit)


def _score_on_ray(sub_path: str, task, split: str, per_env: list, command: str | None,
                  address: str | None, log) -> list[tuple[set, _Cell]]:
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
                          limit, command, True) for i in envs]
    return [({i}, cell) for i, cell in zip(envs, ray.get(refs))]


@dataclasses.dataclass
class SubmitResult:
    ok: bool
    message: str
    path: Path | None = None
    record: dict | None = None


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


def _prepare(folder: str | os.PathLike, task_id: str, split: str, results_dir: Path,
             force: bool, shard: tuple[int, int] | None, seeds: int | None,
             timeout: float | None, log) -> "_Prepared | SubmitResult":
    """Checks the submission and moves a stale record aside; a :class:`SubmitResult` when
    there is nothing to score (it failed its check, or its record is up to date)."""
    from metabench import results, spec

    task = spec.load(task_id)
    spec.require_calibrated(task, split)
    res = check(folder)
    if not res.ok:
        return SubmitResult(False, res.message)
    sub = res.submission
    if sub.family not in task.agents:
        return SubmitResult(False, f"{sub.path}: task {task.id} has no agent config for family "
                            f"{sub.family!r} (it supports {', '.join(task.families())})")
    path = results_path(results_dir, task.id, sub.slug, split, shard)
    _move_stale(path, task, sub.family, log)
    if path.exists() and not force:
        old = results.read(path)
        same = (old.get("submission", {}).get("content_hash") == sub.content_hash
                and old["task"]["fingerprint"] == task.fingerprint(sub.family))
        if same:
            return SubmitResult(True, f"{sub.name}: unchanged since {path} was scored; nothing "
                                "to do (use --force to score again)", path, old)
    n_seeds = task.budget.seeds if seeds is None else int(seeds)
    per_env = shard_seeds(len(task.split(split)), n_seeds, shard)
    limit = timeout if timeout is not None else sum(
        task.budget.max_seconds_per_env + COMPILE_ALLOWANCE_S for s in per_env if s)
    return _Prepared(sub, res, task, split, path, per_env, limit, shard, n_seeds)


def _score_alone(p: _Prepared, command: str | None, backend: str, address: str | None,
                 log) -> list[tuple[set, _Cell]]:
    if backend == "ray":
        return _score_on_ray(str(p.sub.path), p.task, p.split, p.per_env, command, address, log)
    log(f"scoring {p.sub.name} on {p.task.id} [{p.split}] in a child process "
        f"(limit {p.limit:g}s)")
    return [(set(range(len(p.per_env))),
             _score_cells(str(p.sub.path), str(p.task.path), p.split, p.per_env, p.limit,
                          command))]


def _finish(p: _Prepared, cells: list[tuple[set, _Cell]], results_dir: Path,
            baseline: bool | None, command: str | None, wall_clock_s: float, log,
            batch: dict | None = None) -> SubmitResult:
    """Assembles the scored parts into the submission's record and writes it."""
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
    if rule is None:
        rule = {"name": sub.name, "family": sub.family, "factory": sub.factory or sub.entry,
                "kwargs": dict(sub.kwargs), "params_hash": None, "note": ""}
    base_mat, base_name = _baseline_matrix(results_dir, task, split, sub.family)
    if base_name == sub.name or p.shard is not None:
        base_mat = None
    rec = harness.assemble(rule, task, split, parts, base_mat, base_name, command, prov)
    is_baseline = baseline if baseline is not None else (
        sub.path.resolve().parent.name == "baselines")
    rec["submission"] = sub.metadata(baseline=is_baseline)
    rec["check"] = p.check.report
    rec["verified"] = True
    rec["wall_clock_s"] = round(wall_clock_s, 3)
    if batch is not None:
        rec["batch"] = batch
    if p.shard is not None:
        rec["shard"] = {"index": p.shard[0], "count": p.shard[1], "seeds": p.seeds}
    results.write(p.path, rec)
    return SubmitResult(True, f"{sub.name}: wrote {p.path} (status {rec['status']})", p.path,
                        rec)


def submit(folder: str | os.PathLike, task_id: str, split: str = "test", *,
           results_dir: Path = RESULTS_DIR, force: bool = False,
           shard: tuple[int, int] | None = None, seeds: int | None = None,
           timeout: float | None = None, baseline: bool | None = None,
           log=lambda msg: print(msg, file=sys.stderr), command: str | None = None,
           backend: str = "local", address: str | None = None) -> SubmitResult:
    """Checks, scores in a child process with a wall-clock limit, writes the record.

    ``backend="ray"`` sends one Ray task per env instead (``address`` of a running cluster,
    or None to start a local one); the parts are merged into the same record."""
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    p = _prepare(folder, task_id, split, results_dir, force, shard, seeds, timeout, log)
    if isinstance(p, SubmitResult):
        return p
    t0 = time.perf_counter()
    cells = _score_alone(p, command, backend, address, log)
    return _finish(p, cells, results_dir, baseline, command, time.perf_counter() - t0, log)


# --- several submissions in one compiled call ----------------------------------------------


def batch_key(sub: Submission) -> tuple | None:
    """Submissions with equal keys compute one function of their meta-parameters, so they can
    train in one compiled call with their meta-parameters stacked: those built by the same
    reference factory with the same arguments, and loss graphs of one family (run through
    the graph interpreter, as ``discover evolve`` does). A ``rule.py`` is its authors' own
    code: it is always scored alone (None)."""
    if sub.factory is not None:
        return ("factory", sub.family, sub.factory,
                json.dumps(dict(sub.kwargs), sort_keys=True, default=str))
    if sub.entry is not None and sub.entry.startswith("graph:"):
        return ("graph", sub.family)
    return None


def batched_rule(subs: Sequence[Submission]):
    """``(refs, rule, meta_batch)``: each submission's own RuleRef (for its record), and the
    one rule with the stacked meta-parameters (leading axis = submission) that trains them
    all. Raises ValueError unless all share one :func:`batch_key`."""
    import jax
    import numpy as np

    keys = {batch_key(s) for s in subs}
    if len(keys) != 1 or None in keys:
        raise ValueError("a batch needs submissions of one batch key (one reference factory "
                         f"and arguments, or loss graphs of one family); got {sorted(map(str, keys))}")
    refs = [build_rule(s) for s in subs]
    if next(iter(keys))[0] == "graph":
        from metabench.families import td_loss

        loaded = [td_loss.load_graph(_inside(s.path, s.entry.split(":", 1)[1],
                                             s.path / SUBMISSION_FILE, "rule.graph"))
                  for s in subs]
        size = max(td_loss.live_size(g) for g in loaded)
        encoded = [td_loss.encode(g, size) for g in loaded]
        return refs, td_loss.interpreter_rule(), td_loss.EncodedGraph(
            *(np.stack(a) for a in zip(*encoded)))
    return refs, refs[0].rule, jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                                      *[r.meta_params for r in refs])


def _score_batch(group: Sequence[_Prepared], command: str | None) -> list[_Cell]:
    """Scores a group of one batch key in one isolated child process; one cell per member."""
    p0 = group[0]
    limit = sum(p.limit for p in group)
    with tempfile.TemporaryDirectory(prefix="metabench-batch-") as tmp:
        args = ["_score_batch", json.dumps([str(p.sub.path) for p in group]), str(p0.task.path),
                p0.split, tmp, json.dumps(p0.per_env)]
        if command:
            args.append(command)
        code, err = _child(args, limit, capture=False)
        out = Path(tmp)
        if (out / "error.txt").exists():
            err = (out / "error.txt").read_text()
        read = lambda name: (json.loads((out / name).read_text())  # noqa: E731
                             if (out / name).exists() else None)
        cells = []
        for k in range(len(group)):
            parts = {i: read(f"part-{k}-{i}.json") for i in range(len(p0.per_env))
                     if (out / f"part-{k}-{i}.json").exists()}
            cells.append(_Cell(parts, read(f"rule-{k}.json"), read("provenance.json"), code,
                               err, limit))
        return cells


def submit_many(folders: Sequence[str | os.PathLike], task_id: str, split: str = "test", *,
                batch: bool = False, results_dir: Path = RESULTS_DIR, force: bool = False,
                shard: tuple[int, int] | None = None, seeds: int | None = None,
                timeout: float | None = None, baseline: bool | None = None,
                log=lambda msg: print(msg, file=sys.stderr), command: str | None = None,
                backend: str = "local", address: str | None = None) -> list[SubmitResult]:
    """:func:`submit` for each folder, in order. With ``batch``, submissions sharing a
    :func:`batch_key` train together: per env, one compiled call with their meta-parameters
    stacked (vmapped), in one child process whose limit is the sum of theirs. Each still gets
    its own record (with a ``batch`` block naming the members): a NaN or a diverging agent
    fails only its own runs. If the shared process dies or times out, every member is scored
    again alone. Records are finished in ``folders`` order, so a baseline listed first is the
    others' baseline. Batched numbers match scoring alone up to float rounding (vmapping over
    rules may regroup reductions), so a batched record is reproduced by the same batch."""
    if not batch:
        return [submit(f, task_id, split, results_dir=results_dir, force=force, shard=shard,
                       seeds=seeds, timeout=timeout, baseline=baseline, log=log,
                       command=command, backend=backend, address=address) for f in folders]
    if backend != "local":
        raise ValueError("batching runs submissions in one local process; use "
                         "backend='local' with batch (or no batch on Ray)")
    done: dict[int, SubmitResult] = {}
    groups: dict[Any, list[tuple[int, _Prepared]]] = {}
    for j, f in enumerate(folders):
        p = _prepare(f, task_id, split, results_dir, force, shard, seeds, timeout, log)
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
        done[j] = _finish(p, cells, results_dir, baseline, command, wall, log, info)
    return [done[j] for j in range(len(folders))]


def merge(paths: Sequence[str | os.PathLike], results_dir: Path = RESULTS_DIR,
          out: Path | None = None, task: str | os.PathLike | None = None) -> SubmitResult:
    """Joins the shard records of one submission on one task split into its full record.
    ``task`` (an id or a YAML path) defaults to the id the shards recorded."""
    from metabench import harness, results, spec

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
    for k in ("submission", "check", "verified"):
        rec[k] = first.get(k)
    rec["wall_clock_s"] = sum(r.get("wall_clock_s", 0.0) for r in recs)
    rec["merged_from"] = [f"shard {r['shard']['index']}/{count}" for r in recs]
    name = first.get("submission", {}).get("name", first["rule"]["name"])
    path = out or results_path(results_dir, task.id, slug(name), split)
    results.write(path, rec)
    return SubmitResult(True, f"merged {len(recs)} shards into {path} (status {rec['status']})",
                        path, rec)


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
    from metabench import harness, spec
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
    from metabench import harness, spec
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


if __name__ == "__main__":
    sys.exit(main())
