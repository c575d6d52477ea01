"""The ``submission.yaml`` schema: loading and validating a submission folder.

A submission is a folder with ``submission.yaml`` (metadata, the entry point, an optional
parameters file with its sha256, and a meta-training disclosure), an optional ``rule.py``
and an optional parameters file (``.npz`` or flax ``.msgpack``). Everything here reads files
only and never runs submitted code, so the parent process may call it freely; building the
rule from the folder is :mod:`metabench.submissions.build`, done in a child process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Mapping

from metabench import yamlfile
from metabench.params_io import sha256
from metabench.results import slug
from metabench.yamlfile import FieldError

SUBMISSION_FILE = "submission.yaml"

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
    def reference(self) -> bool:
        """Whether the submission is one of its family's reference rules as the project ships
        it: ``factory`` names the rule, its kwargs are the factory's defaults (or a subset of
        them) and it brings no parameters of its own. Such a record is marked as a baseline;
        what marks it is the rule, not the folder it sits in."""
        if self.factory is None or self.params_sha256 is not None:
            return False
        from metabench.families import get_family

        info = get_family(self.family).reference_rules.get(self.factory)
        if info is None:
            return False
        defaults = {k: p.default for k, p in inspect.signature(info.factory).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return all(k in defaults and defaults[k] == v for k, v in self.kwargs.items())

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
