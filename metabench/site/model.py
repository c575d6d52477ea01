"""The leaderboard's reading of result records: untrusted-value accessors, the records and
specs of each task, the data model (:class:`Entry`, :class:`TaskView`) and its analysis
(ranking, ties, staleness, probability of improvement).

Every record is untrusted: each accessor tolerates a value of the wrong type, so a malformed
record is listed with the reason rather than breaking the build. Nothing here renders HTML.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from metabench import results, scoring, signing
from metabench.results import slug
from metabench.scoring import floor_scores, nan_iqm, poi_interval
from metabench.tasks import schema

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#ad494a", "#637939", "#8c6d31")
STALE_COLOUR = "#999999"


# --- small value helpers (records are untrusted: every accessor tolerates the wrong type) ---


def as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list:
    return x if isinstance(x, list) else []


def as_text(x: Any) -> str:
    """A record value as display text."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, int, float)):
        return str(x)
    return json.dumps(x, sort_keys=True)


def as_number(x: Any) -> float | None:
    """A finite real number, or None (bools and numeric strings are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def as_interval(x: Any) -> tuple[float, float, float] | None:
    """``{point, lo, hi}`` -> a tuple; missing bounds collapse onto the point."""
    d = as_dict(x)
    p = as_number(d.get("point"))
    if p is None:
        return None
    lo, hi = as_number(d.get("lo")), as_number(d.get("hi"))
    return (p, p if lo is None else lo, p if hi is None else hi)




def parse_time(s: Any) -> datetime.datetime | None:
    """An ISO timestamp in UTC (naive ones are taken as UTC), or None."""
    if not isinstance(s, str):
        return None
    try:
        t = datetime.datetime.fromisoformat(s)
        return (t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)).astimezone(
            datetime.timezone.utc)
    except (ValueError, OverflowError):
        return None




def safe_url(url: Any) -> str | None:
    """The URL when it is a plain http(s) link, else None (``javascript:``, ``data:``, ...)."""
    if not isinstance(url, str):
        return None
    url = url.strip()
    # Browsers drop tabs/newlines inside URLs, so "java\tscript:" must not pass as text here.
    if not url or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return url




def pair_rng(seed: int, *parts: str) -> np.random.Generator:
    # Seeded by the names of what is compared, not by build order, so a new submission does
    # not move anyone else's confidence intervals.
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *words])


def score_matrix(rec: dict) -> tuple[list[str], np.ndarray]:
    """``[seeds, envs]`` normalised scores in the order of the record's ``envs``; failed,
    missing or null runs score the floor and completed runs are clipped below at it, as the
    harness does (``scoring.floor_scores``)."""
    runs = [r for r in as_list(rec.get("runs")) if isinstance(r, dict)]
    envs = [as_text(as_dict(e).get("name")) for e in as_list(rec.get("envs"))]
    if not envs:
        envs = sorted({as_text(r.get("env")) for r in runs})
    seeds = sorted({as_text(r.get("seed")) for r in runs}, key=lambda s: (len(s), s))
    return envs, scoring.score_matrix(envs, seeds, (
        (as_text(r.get("env")), as_text(r.get("seed")),
         as_number(r.get("score")) if r.get("status") == "ok" else None) for r in runs))


def _floats(values: list) -> np.ndarray:
    """A JSON list as float64, NaN wherever it holds no finite number (null, text, ...)."""
    try:
        arr = np.array(values, dtype=np.float64)  # null -> NaN
        if arr.ndim != 1:
            raise ValueError
    except (TypeError, ValueError):  # a malformed list: convert item by item
        arr = np.array([np.nan if as_number(v) is None else float(v) for v in values],
                       dtype=np.float64)
    arr[~np.isfinite(arr)] = np.nan
    return arr


def curve_matrix(rec: dict, env: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps[T], returns[seeds, T])`` of one env's runs on the union of their step grids;
    null points are NaN."""
    return _series_matrix(rec, env, lambda r: as_dict(r.get("curve")), "returns")


def trace_names(rec: dict) -> list[str]:
    """Names of the per-update scalars the runs recorded (e.g. an adapted gamma)."""
    return sorted({as_text(k) for r in as_list(rec.get("runs")) if isinstance(r, dict)
                   for k in as_dict(r.get("traces"))})


def trace_matrix(rec: dict, env: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps[T], values[seeds, T])`` of one recorded trace of one env's runs."""
    return _series_matrix(rec, env, lambda r: as_dict(as_dict(r.get("traces")).get(name)), "values")


def _series_matrix(rec: dict, env: str, get: Callable[[dict], dict], key: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    curves = []
    for r in as_list(rec.get("runs")):
        if isinstance(r, dict) and as_text(r.get("env")) == env:
            c = get(r)
            if not c:
                continue
            steps, rets = _floats(as_list(c.get("steps"))), _floats(as_list(c.get(key)))
            k = min(len(steps), len(rets))
            ok = np.isfinite(steps[:k])
            curves.append((steps[:k][ok], rets[:k][ok]))
    union = np.unique(np.concatenate([s for s, _ in curves])) if curves else np.zeros(0)
    mat = np.full((len(curves), len(union)), np.nan)
    for i, (steps, rets) in enumerate(curves):
        mat[i, np.searchsorted(union, steps)] = rets
    return union, mat


def _normaliser(rec: dict, env: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(random, reference)`` per row of :func:`curve_matrix` (runs with a curve, in order):
    a run's own ``reference`` and ``random`` where it has them (per-level references,
    ``optimal`` / ``oracle``), else the env's; None when some row has no usable pair."""
    rnd = ref = None
    for e in as_list(rec.get("envs")):
        e = as_dict(e)
        if as_text(e.get("name")) == env:
            rnd, ref = as_number(e.get("random")), as_number(e.get("reference"))
            per_level = bool(e.get("reference_method"))
            break
    else:
        return None
    rnds, refs = [], []
    for r in as_list(rec.get("runs")):
        if isinstance(r, dict) and as_text(r.get("env")) == env and as_dict(r.get("curve")):
            run_ref = as_number(r.get("reference")) if per_level else ref
            run_rnd = as_number(r.get("random")) if per_level and "random" in r else rnd
            if run_rnd is None or run_ref is None or run_ref == run_rnd:
                return None
            rnds.append(run_rnd)
            refs.append(run_ref)
    return np.array(rnds), np.array(refs)


# --- the data model -------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    """One submission on one task: its test record, its train record, and what we derive."""

    stem: str
    test: dict | None = None
    train: dict | None = None
    test_raw: bytes | None = None
    train_raw: bytes | None = None
    slug: str = ""
    stale: str | None = None
    train_stale: str | None = None
    tied: bool = False
    poi: tuple[float, float, float] | None = None
    is_baseline: bool = False
    colour: str = STALE_COLOUR
    verdict: signing.Verdict = signing.Verdict(signing.SELF_REPORTED, "not checked")
    envs: list[str] = dataclasses.field(default_factory=list)
    matrix: np.ndarray | None = None
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict)

    @property
    def record(self) -> dict:
        return self.test if self.test is not None else as_dict(self.train)

    @property
    def sub(self) -> dict:
        return as_dict(self.record.get("submission"))

    @property
    def name(self) -> str:
        return (as_text(self.sub.get("name"))
                or as_text(as_dict(self.record.get("rule")).get("name"))
                or self.stem)

    @property
    def rule_name(self) -> str:
        return as_text(as_dict(self.record.get("rule")).get("name"))

    @property
    def family(self) -> str:
        return (as_text(self.sub.get("family"))
                or as_text(as_dict(self.record.get("rule")).get("family")))

    def agg(self, name: str) -> tuple[float, float, float] | None:
        return as_interval(as_dict(as_dict(self.test).get("aggregates")).get(name))

    @property
    def train_iqm(self) -> tuple[float, float, float] | None:
        if self.train is None or self.train_stale:
            return None
        return as_interval(as_dict(self.train.get("aggregates")).get("iqm"))

    @property
    def verified(self) -> bool:
        """Signed by a key the leaderboard trusts, over the record as it is (never what the
        record says of itself)."""
        return self.verdict.verified

    @property
    def is_control(self) -> bool:
        """A family's control (``null_<family>``): listed below every contender."""
        return self.sub.get("control") is True


@dataclasses.dataclass
class TaskView:
    """A task with its spec (when it loads) and its entries, ranked and not."""

    id: str
    slug: str
    spec: Any = None
    spec_error: str | None = None
    ranked: list[Entry] = dataclasses.field(default_factory=list)
    stale: list[Entry] = dataclasses.field(default_factory=list)
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    baseline: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def entries(self) -> list[Entry]:
        return self.ranked + self.stale

    @property
    def contenders(self) -> list[Entry]:
        """The ranked entries that are not controls."""
        return [e for e in self.ranked if not e.is_control]

    @property
    def records(self) -> list[dict]:
        return [r for e in self.entries for r in (e.test, e.train) if r is not None]


_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _load_spec(task_id: str, tasks_dir: Path):
    """``(spec, None)`` or ``(None, reason)``: records of a missing or broken spec are stale."""
    path = tasks_dir / f"{task_id}.yaml"
    if not _SAFE_ID.match(task_id) or not path.is_file():
        return None, f"the task spec {task_id}.yaml no longer exists"
    try:
        sp = schema.read(path)
    except Exception as e:  # any broken spec makes its results stale, never the build fail
        return None, f"the task spec no longer reads: {str(e).replace(str(tasks_dir), 'tasks')}"
    if sp.id != task_id:
        return None, f"the task spec {task_id}.yaml has id {sp.id!r}"
    return sp, None


def _read_records(folder: Path, task_id: str) -> tuple[dict[str, Entry], list[tuple[str, str]]]:
    """Entries by file stem (``x.json`` and ``x.train.json`` pair up), and the files that are
    not valid records with the reason."""
    entries: dict[str, Entry] = {}
    bad: list[tuple[str, str]] = []
    files = sorted(p for p in folder.iterdir()
                   if p.name.endswith(".json") and not p.name.startswith(".") and p.is_file())
    for p in files:
        train = p.name.endswith(".train.json")
        stem = p.name[: -len(".train.json")] if train else p.name[: -len(".json")]
        try:
            raw = p.read_bytes()  # kept: the site offers the record byte for byte
            rec = results.validate(json.loads(raw), f"{task_id}/{p.name}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            bad.append((p.name, f"{task_id}/{p.name}: not valid JSON ({e})"))
            continue
        except results.RecordError as e:
            bad.append((p.name, str(e)))
            continue
        e = entries.setdefault(stem, Entry(stem))
        if train:
            e.train, e.train_raw = rec, raw
        else:
            e.test, e.test_raw = rec, raw
    return entries, bad


def _staleness(rec: dict, task_id: str, split: str, spec, spec_error: str | None) -> str | None:
    """Why ``rec`` cannot be ranked against the current spec, or None."""
    if spec_error:
        return spec_error
    task = as_dict(rec.get("task"))
    if as_text(task.get("id")) != task_id:
        return f"the record is for task {as_text(task.get('id'))!r}, filed under {task_id!r}"
    if as_text(task.get("split")) != split:
        return f"the record's split is {as_text(task.get('split'))!r}, expected {split!r}"
    family = as_text(as_dict(rec.get("rule")).get("family")) or None
    fp, current = as_text(task.get("fingerprint")), spec.fingerprint(family)
    if fp != current:
        return (f"task fingerprint {fp or '(none)'} differs from the current spec's "
                f"{current}: the task changed since this was scored")
    return None


def _assign_slugs(entries: Sequence[Entry]) -> None:
    slugs = {e.stem: slug(e.name) for e in entries}
    taken: dict[str, int] = {}
    for s in slugs.values():
        taken[s.lower()] = taken.get(s.lower(), 0) + 1  # case-insensitive filesystems too
    for e in entries:
        s = slugs[e.stem]
        e.slug = slug(f"{e.name}@{e.stem}") if taken[s.lower()] > 1 else s


def _derive(e: Entry) -> None:
    """Score matrix and IQM learning curves of an entry's primary record."""
    rec = e.record
    e.envs, e.matrix = score_matrix(rec)
    for env in e.envs:
        steps, returns = curve_matrix(rec, env)
        norm = _normaliser(rec, env)
        if norm is None or steps.size == 0:
            continue
        rnd, ref = norm[0][:, None], norm[1][:, None]
        scores = (returns - rnd) / (ref - rnd)
        e.curves[env] = (steps, nan_iqm(scores), scores)


def _overlaps(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    return a[1] <= b[2] and b[1] <= a[2]


def _pick_baseline(entries: Sequence[Entry], family: str, name: str) -> Entry | None:
    cands = [e for e in entries if e.family == family and name in (e.name, e.rule_name)]
    # Prefer what was submitted as a baseline and scored by the harness itself.
    cands.sort(key=lambda e: (e.sub.get("baseline") is not True, not e.verified, e.stem))
    return cands[0] if cands else None


def _align(entry: Entry, other: Entry) -> np.ndarray | None:
    """``other``'s score matrix in ``entry``'s env order, or None when the envs differ."""
    if sorted(entry.envs) != sorted(other.envs) or len(set(entry.envs)) != len(entry.envs):
        return None
    return other.matrix[:, [other.envs.index(n) for n in entry.envs]]


AGGREGATE_LABELS = {"iqm": "IQM", "mean": "mean", "median": "median",
                    "optimality_gap": "optimality gap"}
LOWER_IS_BETTER = frozenset({"optimality_gap"})
"""Aggregates where a smaller value ranks higher (the gap to a score of 1)."""


def headline(view: TaskView) -> str:
    """The aggregate the task ranks by, its ``scoring.aggregate`` (IQM without a spec)."""
    return view.spec.scoring.aggregate if view.spec is not None else "iqm"


def keys_dir_for(results_dir: Path) -> Path:
    """The trusted public keys of a leaderboard: ``keys/`` beside its ``results/``."""
    return Path(results_dir).parent / "keys"


def analyse_task(task_id: str, results_dir: Path, tasks_dir: Path, reps: int,
                 seed: int, trusted: Mapping[str, signing.TrustedKey] | None = None
                 ) -> TaskView:
    """``trusted`` defaults to the keys beside ``results_dir`` (:func:`keys_dir_for`)."""
    if trusted is None:
        trusted = signing.trusted_keys(keys_dir_for(results_dir))
    view = TaskView(task_id, slug(task_id))
    view.spec, view.spec_error = _load_spec(task_id, tasks_dir)
    folder = results_dir / task_id
    entries, view.unreadable = (_read_records(folder, task_id) if folder.is_dir() else ({}, []))
    for e in entries.values():
        e.verdict = signing.verify(e.record, trusted)
        if e.test is None:
            e.stale = f"only a train-split record ({e.stem}.train.json); no {e.stem}.json"
        else:
            e.stale = _staleness(e.test, task_id, "test", view.spec, view.spec_error)
            for name in dict.fromkeys(("iqm", headline(view))):
                if e.stale is None and e.agg(name) is None:
                    e.stale = f"the record has no {AGGREGATE_LABELS[name]} aggregate"
        _derive(e)
        if e.stale is None and 0 in e.matrix.shape:
            e.stale = "the record has no runs"
        if e.stale is None:
            e.stale = _disagreement(e)
        if e.train is not None:
            e.train_stale = _staleness(e.train, task_id, "train", view.spec, view.spec_error)
    ordered = sorted(entries.values(), key=lambda e: e.stem)
    _assign_slugs(ordered)
    # Controls rank below every contender, whatever their score: they mark the floor of what
    # a task awards, and a task that cannot separate them from its baselines says so.
    h = headline(view)
    sign = 1.0 if h in LOWER_IS_BETTER else -1.0
    view.ranked = sorted((e for e in ordered if e.stale is None),
                         key=lambda e: (e.is_control, sign * e.agg(h)[0], e.name, e.stem))
    view.stale = sorted((e for e in ordered if e.stale is not None),
                        key=lambda e: (e.name, e.stem))
    for i, e in enumerate(view.ranked):
        e.colour = PALETTE[i % len(PALETTE)]
        e.tied = i > 0 and _overlaps(e.agg(h), view.ranked[i - 1].agg(h))
    if view.spec is not None:
        view.baseline = dict(view.spec.scoring.baselines)
        _add_poi(view, reps, seed)
    return view


AGREEMENT_RTOL = 1e-9
"""How far a stored aggregate may be from its runs' (relative; absolute below 1): float
rounding from summing in another order, never an edit."""


def _shown(stored: float, runs: float) -> tuple[str, str]:
    # Enough digits that the two numbers of a disagreement never print alike.
    for digits in (6, 17):
        a, b = f"{stored:.{digits}g}", f"{runs:.{digits}g}"
        if a != b:
            break
    return a, b


def _disagreement(e: Entry) -> str | None:
    """Why a record is not ranked when a point aggregate it stores is not that aggregate of
    its own runs (a hand-edited record, or one written by a harness that dropped failures):
    the site ranks by the stored values, so they must be the runs'. Recomputed with the
    harness's own functions (``scoring.aggregate_functions``) on the same floored matrix;
    the bootstrap intervals are not, as that would cost seconds per record."""
    funcs = scoring.aggregate_functions()
    for name in scoring.AGGREGATES:
        stored = e.agg(name)
        if stored is None:
            continue
        runs = float(funcs[name](e.matrix))
        if not abs(stored[0] - runs) <= AGREEMENT_RTOL * max(1.0, abs(runs)):
            label = AGGREGATE_LABELS[name]
            a, b = _shown(stored[0], runs)
            return f"the record's stored {label} {a} is not the {label} of its runs ({b})"
    return None


def _add_poi(view: TaskView, reps: int, seed: int) -> None:
    for family, name in sorted(view.baseline.items()):
        base = _pick_baseline(view.ranked, family, name)
        if base is None:
            continue
        base.is_baseline = True
        for e in view.ranked:
            y = _align(e, base) if e.family == family else None
            if y is not None:
                e.poi = poi_interval(e.matrix, y, reps, pair_rng(seed, view.id, "poi", e.stem,
                                                             base.stem))


def discover_tasks(results_dir: Path, tasks_dir: Path) -> list[str]:
    """Task ids with a results folder, plus every task spec (so new tasks show up empty)."""
    ids = {p.name for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if tasks_dir.is_dir():
        ids |= {p.stem for p in tasks_dir.glob("*.yaml")
                if p.name != "calibration.lock.yaml" and not p.name.startswith(".")}
    return sorted(ids)


def env_means(rec: dict, env: str) -> tuple[float | None, float | None]:
    """Mean normalised score (failed runs at the floor) and mean final return of one env."""
    runs = [as_dict(r) for r in as_list(rec.get("runs")) if as_text(as_dict(r).get("env")) == env]
    if not runs:
        return None, None
    raw = np.array([as_number(r.get("score")) if r.get("status") == "ok" else None for r in runs],
                   dtype=np.float64)  # None -> NaN
    scores = floor_scores(raw, np.isfinite(raw))
    finals = [v for r in runs if (v := as_number(r.get("final_return"))) is not None]
    return float(np.mean(scores)), (float(np.mean(finals)) if finals else None)
