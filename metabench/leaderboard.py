"""Result records -> a static leaderboard site (pure, deterministic), and a localhost server.

``leaderboard/results/<task>/<submission>.json`` (test split) and ``<submission>.train.json``
(train split) are the source of truth. :func:`build` turns them into plain HTML pages with
inline CSS, hand-written SVG plots and one small inline script that sorts the rank table:

``index.html``
    every task with its top three rules by IQM on the test split
``tasks/<task>.html``
    the rank table, probability of improvement over the task's baseline, interval-estimate
    plots, performance profiles, IQM learning curves, per-env scores and the stale results
``submissions/<task>/<submission>.html``
    one page per submission and task: metadata, disclosure, scores, curves, checks, downloads
``data/<task>/<submission>.{json,train.json,csv}``
    the raw records, byte for byte, and one CSV row per run

Properties kept:

* The same records give byte-identical files: nothing depends on the clock, the machine or the
  order the filesystem lists files in, and every bootstrap is seeded from ``seed`` and the
  names of what it compares (so adding a submission leaves everyone else's numbers alone).
* Every string of a record may be hostile: all text is HTML-escaped, only http(s) links become
  hrefs, file names are slugs that cannot leave the output folder, and each page carries a
  Content-Security-Policy that allows only its own (hashed) script and no network access.
* A record whose task fingerprint differs from the current spec is never ranked; it is listed
  as stale with the reason.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import functools
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import tempfile
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from metabench.results import slug
from metabench.scoring import floor_scores, nan_iqm, performance_profile, poi_interval

__all__ = ["build", "make_server", "render_site", "serve", "slug"]

MARKER = ".metabench-site"
PROFILE_POINTS = 81
TOP_N = 3
DASH = "\u2014"

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#ad494a", "#637939", "#8c6d31")
STALE_COLOUR = "#999999"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 color:#1b1b1b;background:#fafafa}
header,main,footer{max-width:1280px;margin:0 auto;padding:0 16px}
header{padding-top:12px}
nav a{font-weight:600}
h1{font-size:1.6em;margin:.4em 0}
h2{font-size:1.25em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:1em 0 .3em}
a{color:#0b57d0}
table{border-collapse:collapse;margin:.4em 0 1em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
th[data-key]{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#rank-table td{white-space:nowrap}
.wrap{overflow-x:auto}
.muted{color:#666}
.badge{display:inline-block;font-size:.78em;padding:0 5px;border-radius:8px;margin-left:4px;
 border:1px solid #bbb;background:#eee;white-space:nowrap}
.badge.tied{background:#fff4ce;border-color:#e0c060}
.badge.verified{background:#dcf5e0;border-color:#7cc68a}
.badge.self{background:#f3f3f3}
.badge.baseline{background:#e3ecfd;border-color:#8fb0f0}
.badge.control{background:#eee;border-color:#aaa}
.badge.stale{background:#fde2e1;border-color:#e59a96}
.note{background:#fff8e1;border:1px solid #f0d68a;padding:6px 10px;margin:.6em 0}
.warn{background:#fde2e1;border:1px solid #e59a96;padding:6px 10px;margin:.6em 0}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}
dl.meta dt{font-weight:600}
dl.meta dd{margin:0;overflow-wrap:anywhere}
ul.legend{list-style:none;padding:0;margin:.2em 0 1em;display:flex;flex-wrap:wrap;gap:2px 14px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
svg{background:#fff;border:1px solid #ddd;max-width:100%;height:auto;margin:.3em 0}
.plots{display:flex;flex-wrap:wrap;gap:10px}
code{overflow-wrap:anywhere}
"""

# Sorts #rank-table by the clicked header: numeric columns by their cells' data-value, text
# columns by it too (falling back to the text); empty values always sort last.
SCRIPT = """
(function () {
  var table = document.getElementById("rank-table");
  if (!table || !table.tHead) { return; }
  var heads = table.tHead.rows[0].cells;
  function value(row, i, numeric) {
    var cell = row.cells[i];
    var v = cell.getAttribute("data-value");
    if (v === null) { v = cell.textContent; }
    if (v === "") { return null; }
    if (numeric) { var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v.toLowerCase();
  }
  function sortBy(i) {
    var th = heads[i];
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var numeric = th.getAttribute("data-type") === "num";
    for (var j = 0; j < heads.length; j++) { heads[j].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, k) { return [value(r, i, numeric), k, r]; });
    keyed.sort(function (a, b) {
      if (a[0] === null || b[0] === null) {
        if (a[0] === b[0]) { return a[1] - b[1]; }
        return a[0] === null ? 1 : -1;
      }
      var c = a[0] < b[0] ? -1 : (a[0] > b[0] ? 1 : 0);
      return (asc ? c : -c) || (a[1] - b[1]);
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    if (!th.hasAttribute("data-key")) { return; }
    th.tabIndex = 0;
    th.addEventListener("click", function () { sortBy(i); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(i); }
    });
  });
})();
"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
# Only our own script runs, nothing is fetched: even a string that escaped escaping could
# neither execute nor phone home.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
       f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'")


# --- small value helpers (records are untrusted: every accessor tolerates the wrong type) ---


def esc(x: Any) -> str:
    """HTML-escapes text for element content and quoted attributes alike."""
    return html.escape("" if x is None else str(x), quote=True)


def _d(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _l(x: Any) -> list:
    return x if isinstance(x, list) else []


def _s(x: Any) -> str:
    """A record value as display text."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, int, float)):
        return str(x)
    return json.dumps(x, sort_keys=True)


def _f(x: Any) -> float | None:
    """A finite real number, or None (bools and numeric strings are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _num(x: float | None, digits: int = 3) -> str:
    return DASH if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _count(x: float | None) -> str:
    return DASH if x is None else f"{int(round(x)):,}"


def _si(x: float | None) -> str:
    """Compact large counts (disclosed meta-training env steps)."""
    if x is None:
        return DASH
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _dv(x: float | None) -> str:
    """A data-value attribute for numeric sorting; empty sorts last."""
    return "" if x is None or not math.isfinite(x) else f"{x:.12g}"


def _interval(x: Any) -> tuple[float, float, float] | None:
    """``{point, lo, hi}`` -> a tuple; missing bounds collapse onto the point."""
    d = _d(x)
    p = _f(d.get("point"))
    if p is None:
        return None
    lo, hi = _f(d.get("lo")), _f(d.get("hi"))
    return (p, p if lo is None else lo, p if hi is None else hi)


def _ci_text(iv: tuple[float, float, float] | None) -> str:
    return DASH if iv is None else f"{iv[0]:.3f} [{iv[1]:.3f}, {iv[2]:.3f}]"


def _parse_time(s: Any) -> datetime.datetime | None:
    """An ISO timestamp in UTC (naive ones are taken as UTC), or None."""
    if not isinstance(s, str):
        return None
    try:
        t = datetime.datetime.fromisoformat(s)
        return (t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)).astimezone(
            datetime.timezone.utc)
    except (ValueError, OverflowError):
        return None


def _created_utc(rec: dict | None) -> str:
    t = _parse_time(_d(_d(rec).get("provenance")).get("created"))
    return t.isoformat() if t else ""


def _date(rec: dict | None) -> str:
    t = _parse_time(_d(_d(rec).get("provenance")).get("created"))
    return t.date().isoformat() if t else ""


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


def _link(url: Any) -> str:
    ok = safe_url(url)
    if ok is None:
        return esc(_s(url)) if _s(url) else DASH
    return f'<a href="{esc(ok)}" rel="noopener noreferrer nofollow">{esc(ok)}</a>'


def _rng(seed: int, *parts: str) -> np.random.Generator:
    # Seeded by the names of what is compared, not by build order, so a new submission does
    # not move anyone else's confidence intervals.
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *words])


def score_matrix(rec: dict) -> tuple[list[str], np.ndarray]:
    """``[seeds, envs]`` normalised scores in the order of the record's ``envs``; failed,
    missing or null runs score the floor and completed runs are clipped below at it, as the
    harness does (``scoring.floor_scores``)."""
    runs = [r for r in _l(rec.get("runs")) if isinstance(r, dict)]
    envs = [_s(_d(e).get("name")) for e in _l(rec.get("envs"))]
    if not envs:
        envs = sorted({_s(r.get("env")) for r in runs})
    seeds = sorted({_s(r.get("seed")) for r in runs}, key=lambda s: (len(s), s))
    col = {e: j for j, e in enumerate(envs)}
    row = {s: i for i, s in enumerate(seeds)}
    mat = np.full((len(seeds), len(envs)), np.nan)
    for r in runs:
        j, score = col.get(_s(r.get("env"))), _f(r.get("score"))
        if j is not None and r.get("status") == "ok" and score is not None:
            mat[row[_s(r.get("seed"))], j] = score
    return envs, floor_scores(mat, np.isfinite(mat))


def _floats(values: list) -> np.ndarray:
    """A JSON list as float64, NaN wherever it holds no finite number (null, text, ...)."""
    try:
        arr = np.array(values, dtype=np.float64)  # null -> NaN
        if arr.ndim != 1:
            raise ValueError
    except (TypeError, ValueError):  # a malformed list: convert item by item
        arr = np.array([np.nan if _f(v) is None else float(v) for v in values], dtype=np.float64)
    arr[~np.isfinite(arr)] = np.nan
    return arr


def curve_matrix(rec: dict, env: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps[T], returns[seeds, T])`` of one env's runs on the union of their step grids;
    null points are NaN."""
    return _series_matrix(rec, env, lambda r: _d(r.get("curve")), "returns")


def trace_names(rec: dict) -> list[str]:
    """Names of the per-update scalars the runs recorded (e.g. an adapted gamma)."""
    return sorted({_s(k) for r in _l(rec.get("runs")) if isinstance(r, dict)
                   for k in _d(r.get("traces"))})


def trace_matrix(rec: dict, env: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps[T], values[seeds, T])`` of one recorded trace of one env's runs."""
    return _series_matrix(rec, env, lambda r: _d(_d(r.get("traces")).get(name)), "values")


def _series_matrix(rec: dict, env: str, get: Callable[[dict], dict], key: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    curves = []
    for r in _l(rec.get("runs")):
        if isinstance(r, dict) and _s(r.get("env")) == env:
            c = get(r)
            if not c:
                continue
            steps, rets = _floats(_l(c.get("steps"))), _floats(_l(c.get(key)))
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
    for e in _l(rec.get("envs")):
        e = _d(e)
        if _s(e.get("name")) == env:
            rnd, ref = _f(e.get("random")), _f(e.get("reference"))
            per_level = bool(e.get("reference_method"))
            break
    else:
        return None
    rnds, refs = [], []
    for r in _l(rec.get("runs")):
        if isinstance(r, dict) and _s(r.get("env")) == env and _d(r.get("curve")):
            run_ref = _f(r.get("reference")) if per_level else ref
            run_rnd = _f(r.get("random")) if per_level and "random" in r else rnd
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
    envs: list[str] = dataclasses.field(default_factory=list)
    matrix: np.ndarray | None = None
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict)

    @property
    def record(self) -> dict:
        return self.test if self.test is not None else _d(self.train)

    @property
    def sub(self) -> dict:
        return _d(self.record.get("submission"))

    @property
    def name(self) -> str:
        return (_s(self.sub.get("name")) or _s(_d(self.record.get("rule")).get("name"))
                or self.stem)

    @property
    def rule_name(self) -> str:
        return _s(_d(self.record.get("rule")).get("name"))

    @property
    def family(self) -> str:
        return _s(self.sub.get("family")) or _s(_d(self.record.get("rule")).get("family"))

    def agg(self, name: str) -> tuple[float, float, float] | None:
        return _interval(_d(_d(self.test).get("aggregates")).get(name))

    @property
    def train_iqm(self) -> tuple[float, float, float] | None:
        if self.train is None or self.train_stale:
            return None
        return _interval(_d(self.train.get("aggregates")).get("iqm"))

    @property
    def verified(self) -> bool:
        return self.record.get("verified") is True

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
    from metabench.tasks import spec as spec_mod  # imports JAX; only needed at build time

    path = tasks_dir / f"{task_id}.yaml"
    if not _SAFE_ID.match(task_id) or not path.is_file():
        return None, f"the task spec {task_id}.yaml no longer exists"
    try:
        sp = spec_mod.load(path)
    except Exception as e:  # any broken spec makes its results stale, never the build fail
        return None, f"the task spec no longer loads: {str(e).replace(str(tasks_dir), 'tasks')}"
    if sp.id != task_id:
        return None, f"the task spec {task_id}.yaml has id {sp.id!r}"
    return sp, None


def _read_records(folder: Path, task_id: str) -> tuple[dict[str, Entry], list[tuple[str, str]]]:
    """Entries by file stem (``x.json`` and ``x.train.json`` pair up), and the files that are
    not valid records with the reason."""
    from metabench import results

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
    task = _d(rec.get("task"))
    if _s(task.get("id")) != task_id:
        return f"the record is for task {_s(task.get('id'))!r}, filed under {task_id!r}"
    if _s(task.get("split")) != split:
        return f"the record's split is {_s(task.get('split'))!r}, expected {split!r}"
    family = _s(_d(rec.get("rule")).get("family")) or None
    fp, current = _s(task.get("fingerprint")), spec.fingerprint(family)
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


def analyse_task(task_id: str, results_dir: Path, tasks_dir: Path, reps: int,
                 seed: int) -> TaskView:
    view = TaskView(task_id, slug(task_id))
    view.spec, view.spec_error = _load_spec(task_id, tasks_dir)
    folder = results_dir / task_id
    entries, view.unreadable = (_read_records(folder, task_id) if folder.is_dir() else ({}, []))
    for e in entries.values():
        if e.test is None:
            e.stale = f"only a train-split record ({e.stem}.train.json); no {e.stem}.json"
        else:
            e.stale = _staleness(e.test, task_id, "test", view.spec, view.spec_error)
            if e.stale is None and e.agg("iqm") is None:
                e.stale = "the record has no IQM aggregate"
        _derive(e)
        if e.stale is None and 0 in e.matrix.shape:
            e.stale = "the record has no runs"
        if e.stale is None:
            e.stale = _disagreement(e)
        if e.train is not None:
            e.train_stale = _staleness(e.train, task_id, "train", view.spec, view.spec_error)
    ordered = sorted(entries.values(), key=lambda e: e.stem)
    _assign_slugs(ordered)
    # Controls rank below every contender, whatever their IQM: they mark the floor of what
    # a task awards, and a task that cannot separate them from its baselines says so.
    view.ranked = sorted((e for e in ordered if e.stale is None),
                         key=lambda e: (e.is_control, -e.agg("iqm")[0], e.name, e.stem))
    view.stale = sorted((e for e in ordered if e.stale is not None),
                        key=lambda e: (e.name, e.stem))
    for i, e in enumerate(view.ranked):
        e.colour = PALETTE[i % len(PALETTE)]
        e.tied = i > 0 and _overlaps(e.agg("iqm"), view.ranked[i - 1].agg("iqm"))
    if view.spec is not None:
        view.baseline = dict(view.spec.scoring.baselines)
        _add_poi(view, reps, seed)
    return view


def _disagreement(e: Entry) -> str | None:
    """Why a record is not ranked when its stored IQM is not the IQM of its own runs (a
    hand-edited record, or one written by a harness that dropped failures): the site ranks
    by the stored interval, so the two must agree."""
    stored = e.agg("iqm")[0]
    runs = float(nan_iqm(e.matrix.reshape(-1, 1))[0])
    if not abs(stored - runs) <= 1e-6 * max(1.0, abs(runs)):
        return (f"the record's stored IQM {stored:.6g} is not the IQM of its runs "
                f"({runs:.6g})")
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
                e.poi = poi_interval(e.matrix, y, reps, _rng(seed, view.id, "poi", e.stem,
                                                             base.stem))


def discover_tasks(results_dir: Path, tasks_dir: Path) -> list[str]:
    """Task ids with a results folder, plus every task spec (so new tasks show up empty)."""
    ids = {p.name for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if tasks_dir.is_dir():
        ids |= {p.stem for p in tasks_dir.glob("*.yaml")
                if p.name != "calibration.lock.yaml" and not p.name.startswith(".")}
    return sorted(ids)


# --- SVG --------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, t = [], first
    while t <= hi + 1e-9 * span:
        out.append(0.0 if abs(t) < 1e-12 * max(1.0, span) else t)
        t += step
    return out


def _tick_label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2g}".replace("e+0", "e").replace("e+", "e")
    return f"{v:.4g}"


def _range(values: Iterable[float], include: Sequence[float] = ()) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)] + list(include)
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def _svg_open(w: int, h: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
            f'height="{h}" role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<text x="{w / 2:.1f}" y="16" text-anchor="middle" font-size="13" '
            f'font-weight="600">{esc(title)}</text>')


def _short(label: str, n: int = 26) -> str:
    # Truncate before escaping so an entity is never cut in half.
    return label if len(label) <= n else label[: n - 1] + "\u2026"


def svg_intervals(title: str, rows: Sequence[tuple[str, str, tuple[float, float, float]]],
                  xlabel: str) -> str:
    """A horizontal point-and-CI plot, one row per (label, colour, (point, lo, hi))."""
    if not rows:
        return ""
    left, right, top, row_h = 190, 16, 28, 18
    w, h = 560, top + row_h * len(rows) + 40
    x0, x1 = _range([v for _, _, iv in rows for v in iv])
    sx = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    out = [_svg_open(w, h, title)]
    bottom = top + row_h * len(rows)
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{bottom}" '
                   f'stroke="#e5e5e5"/><text x="{sx(t):.1f}" y="{bottom + 14}" font-size="10" '
                   f'text-anchor="middle">{esc(_tick_label(t))}</text>')
    for i, (label, colour, (p, lo, hi)) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(f'<g><title>{esc(label)}: {p:.3f} [{lo:.3f}, {hi:.3f}]</title>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
                   f'{esc(_short(label))}</text>'
                   f'<rect x="{sx(lo):.1f}" y="{y - 5:.1f}" width="{max(sx(hi) - sx(lo), 1):.1f}" '
                   f'height="10" fill="{colour}" fill-opacity="0.35"/>'
                   f'<line x1="{sx(p):.1f}" y1="{y - 7:.1f}" x2="{sx(p):.1f}" y2="{y + 7:.1f}" '
                   f'stroke="{colour}" stroke-width="2.5"/></g>')
    out.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 6}" font-size="11" '
               f'text-anchor="middle">{esc(xlabel)}</text></svg>')
    return "".join(out)


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in ``mask`` (a null point breaks a line)."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def _points(px: np.ndarray, py: np.ndarray) -> str:
    """SVG ``points`` text; one format call for the whole line keeps big sites fast."""
    flat = np.column_stack([px, py]).ravel().tolist()
    return ("%.1f,%.1f " * len(px) % tuple(flat)).rstrip()


@dataclasses.dataclass
class Series:
    label: str
    colour: str
    xs: np.ndarray
    ys: np.ndarray
    width: float = 1.8
    opacity: float = 1.0
    band: tuple[np.ndarray, np.ndarray] | None = None
    markers: bool = False
    """Draw a dot at every point, not only the line (for series with few points)."""


def svg_lines(title: str, series: Sequence[Series], xlabel: str, ylabel: str,
              include_y: Sequence[float] = (), w: int = 620, h: int = 300) -> str:
    """A line chart; each series may carry a (lo, hi) band. Dashed lines mark y = 0 and 1."""
    xs = np.concatenate([np.zeros(0)] + [np.asarray(s.xs, float) for s in series])
    ys = np.concatenate([np.zeros(0)] + [np.asarray(s.ys, float) for s in series]
                        + [np.asarray(b, float) for s in series if s.band for b in s.band])
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    if not xs.size or not ys.size:
        return f'<p class="muted">{esc(title)}: no data</p>'
    left, right, top, bottom = 56, 14, 28, 42
    x0, x1 = _range([xs.min(), xs.max()])
    y0, y1 = _range([ys.min(), ys.max()], include=include_y)
    sx = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda v: h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    out = [_svg_open(w, h, title)]
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{h - bottom}" '
                   f'stroke="#eee"/><text x="{sx(t):.1f}" y="{h - bottom + 14}" font-size="10" '
                   f'text-anchor="middle">{esc(_tick_label(t))}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{w - right}" y2="{sy(t):.1f}" '
                   f'stroke="#eee"/><text x="{left - 4}" y="{sy(t) + 3:.1f}" font-size="10" '
                   f'text-anchor="end">{esc(_tick_label(t))}</text>')
    for ref in (0.0, 1.0):
        if y0 <= ref <= y1 and include_y:
            out.append(f'<line x1="{left}" y1="{sy(ref):.1f}" x2="{w - right}" '
                       f'y2="{sy(ref):.1f}" stroke="#999" stroke-dasharray="4 3"/>')
    for s in series:
        if s.band is None:
            continue
        lo, hi = np.asarray(s.band[0], float), np.asarray(s.band[1], float)
        ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(s.xs)
        px = sx(np.asarray(s.xs, float)[ok])
        pts = _points(np.concatenate([px, px[::-1]]), sy(np.concatenate([lo[ok], hi[ok][::-1]])))
        out.append(f'<polygon points="{pts}" fill="{s.colour}" fill-opacity="0.12" '
                   f'stroke="none"/>')
    for s in series:
        xs, ys = np.asarray(s.xs, float), np.asarray(s.ys, float)
        px, py = sx(xs), sy(ys)
        for a, b in _spans(np.isfinite(xs) & np.isfinite(ys)):
            out.append(f'<polyline points="{_points(px[a:b], py[a:b])}" fill="none" '
                       f'stroke="{s.colour}" stroke-width="{s.width}" '
                       f'stroke-opacity="{s.opacity}"><title>{esc(s.label)}</title></polyline>')
            # A one-point polyline draws nothing, so a lone point always gets its dot.
            dots = range(a, b) if s.markers or b - a == 1 else ()
            out.extend(f'<circle cx="{px[k]:.1f}" cy="{py[k]:.1f}" r="{1.5 * s.width:.1f}" '
                       f'fill="{s.colour}" fill-opacity="{s.opacity}">'
                       f'<title>{esc(s.label)}</title></circle>' for k in dots)
    out.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" '
               f'stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" '
               f'stroke="#333"/>'
               f'<text x="{(left + w - right) / 2:.1f}" y="{h - 8}" font-size="11" '
               f'text-anchor="middle">{esc(xlabel)}</text>'
               f'<text x="12" y="{(top + h - bottom) / 2:.1f}" font-size="11" '
               f'text-anchor="middle" transform="rotate(-90 12 {(top + h - bottom) / 2:.1f})">'
               f'{esc(ylabel)}</text></svg>')
    return "".join(out)


def _legend(entries: Sequence[Entry]) -> str:
    items = "".join(f'<li><span class="swatch" style="background:{e.colour}"></span>'
                    f'{esc(e.name)}</li>' for e in entries)
    return f'<ul class="legend">{items}</ul>'


# --- HTML building blocks ---------------------------------------------------------------------


def _page(title: str, body: str, root: str, footer: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(CSP)}\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><nav><a href=\"{root}index.html\">metabench leaderboard</a></nav></header>\n"
        f"<main>\n{body}\n</main>\n<footer><p class=\"muted\">{footer}</p></footer>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _td(text: Any, value: Any = None, num: bool = False) -> str:
    attr = "" if value is None else f' data-value="{esc(value)}"'
    cls = ' class="num"' if num else ""
    return f"<td{cls}{attr}>{esc(_s(text)) if _s(text) != '' else DASH}</td>"


def _td_html(inner: str, value: Any = None, num: bool = False) -> str:
    attr = "" if value is None else f' data-value="{esc(value)}"'
    cls = ' class="num"' if num else ""
    return f"<td{cls}{attr}>{inner}</td>"


def _table(head: Sequence[str], rows: Sequence[str], attrs: str = "") -> str:
    ths = "".join(f"<th>{esc(h)}</th>" for h in head)
    return (f'<div class="wrap"><table{attrs}><thead><tr>{ths}</tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></div>")


def _badge(text: str, cls: str, title: str = "") -> str:
    t = f' title="{esc(title)}"' if title else ""
    return f'<span class="badge {cls}"{t}>{esc(text)}</span>'


def _verified_badge(e: Entry) -> str:
    if e.verified:
        return _badge("verified", "verified", "scored by metabench's own harness "
                      "(metabench submit)")
    return _badge("self-reported", "self", "not produced by metabench submit")


def _dl(items: Sequence[tuple[str, str]]) -> str:
    """Definition list; values are already-safe HTML."""
    return '<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) \
        + "</dl>"


def _text_or_dash(x: Any) -> str:
    return esc(_s(x)) if _s(x) else DASH


# --- per-entry facts shown in tables ----------------------------------------------------------


def _failures(rec: dict) -> int:
    return sum(1 for r in _l(rec.get("runs")) if _d(r).get("status") != "ok")


def _env_steps(rec: dict) -> tuple[str, float | None]:
    vals = sorted({v for e in _l(rec.get("envs"))
                   if (v := _f(_d(e).get("env_steps_per_seed"))) is not None})
    if not vals:
        v = _f(_d(rec.get("task")).get("total_timesteps"))
        return _count(v), v
    if len(vals) == 1:
        return _count(vals[0]), vals[0]
    return f"{_count(vals[0])}\u2013{_count(vals[-1])}", vals[0]


def _wall_clock(rec: dict) -> tuple[str, float | None]:
    total = _f(rec.get("wall_clock_s"))
    if total is not None:
        return f"{total:,.0f} s", total
    parts = [_f(_d(e).get(k)) for e in _l(rec.get("envs")) for k in ("compile_s", "run_s")]
    parts = [p for p in parts if p is not None]
    if not parts:
        return DASH, None
    return f"\u2248{sum(parts):,.0f} s (compile+run)", sum(parts)


def _device(rec: dict) -> str:
    dev = _d(_d(rec.get("provenance")).get("device"))
    kind, plat = _s(dev.get("kind")), _s(dev.get("platform"))
    if not kind and not plat:
        return ""
    return f"{kind or '?'} / {plat or '?'}"


def _disclosed(e: Entry) -> tuple[str, float | None]:
    d = _d(e.sub.get("disclosure"))
    steps, hours = _f(d.get("env_steps")), _f(d.get("accelerator_hours"))
    parts = []
    if steps is not None:
        parts.append(f"{_si(steps)} env steps")
    if hours is not None:
        parts.append(f"{hours:g} accel-h")
    return (" \u00b7 ".join(parts) if parts else DASH), steps


def _env_means(rec: dict, env: str) -> tuple[float | None, float | None]:
    """Mean normalised score (failed runs at the floor) and mean final return of one env."""
    runs = [_d(r) for r in _l(rec.get("runs")) if _s(_d(r).get("env")) == env]
    if not runs:
        return None, None
    raw = np.array([_f(r.get("score")) if r.get("status") == "ok" else None for r in runs],
                   dtype=np.float64)  # None -> NaN
    scores = floor_scores(raw, np.isfinite(raw))
    finals = [v for r in runs if (v := _f(r.get("final_return"))) is not None]
    return float(np.mean(scores)), (float(np.mean(finals)) if finals else None)


# --- task page --------------------------------------------------------------------------------

RANK_COLUMNS = (
    ("rank", "rank", "num"), ("rule", "rule", "text"), ("family", "family", "text"),
    ("iqm", "IQM [95% CI] (test)", "num"), ("mean", "mean", "num"),
    ("optimality_gap", "optimality gap", "num"), ("poi", "P(rule > baseline) [95% CI]", "num"),
    ("train_iqm", "train IQM", "num"), ("runs", "seeds \u00d7 envs", "num"),
    ("failures", "failures", "num"), ("env_steps", "env steps / run", "num"),
    ("wall_clock", "wall-clock \u00b7 device", "num"),
    ("meta_compute", "disclosed meta-training", "num"), ("date", "date", "text"),
    ("verified", "verified", "num"),
)


def _sub_href(view: TaskView, e: Entry, root: str) -> str:
    return f"{root}submissions/{view.slug}/{e.slug}.html"


def _rank_row(view: TaskView, i: int, e: Entry) -> str:
    rec = e.test
    iqm, mean, gap = e.agg("iqm"), e.agg("mean"), e.agg("optimality_gap")
    rank = _badge("control", "control", "gives the agent no learning signal; not ranked") \
        if e.is_control else esc(str(i + 1))
    if e.tied:
        rank += _badge("tied", "tied", "its IQM 95% CI overlaps the row above's")
    name = (f'<a href="{esc(_sub_href(view, e, "../"))}">{esc(e.name)}</a>'
            + (_badge("baseline", "baseline") if e.is_baseline else ""))
    note = _s(_d(rec.get("rule")).get("note"))
    if note:
        name += f' <span class="muted">({esc(note)})</span>'
    n_seeds = e.matrix.shape[0]
    steps_text, steps_v = _env_steps(rec)
    wall_text, wall_v = _wall_clock(rec)
    device = _device(rec)
    meta_text, meta_v = _disclosed(e)
    poi_text = DASH if e.poi is None else _ci_text(e.poi)
    cls = "rank-row tied" if e.tied else "rank-row"
    cells = [
        _td_html(rank, i + 1, num=True),
        _td_html(name, e.name.lower()),
        _td(e.family, e.family.lower()),
        _td(_ci_text(iqm), _dv(iqm[0]), num=True),
        _td(_num(mean[0] if mean else None), _dv(mean[0] if mean else None), num=True),
        _td(_num(gap[0] if gap else None), _dv(gap[0] if gap else None), num=True),
        _td(poi_text, _dv(e.poi[0] if e.poi else None), num=True),
        _td(_ci_text(e.train_iqm), _dv(e.train_iqm[0] if e.train_iqm else None), num=True),
        _td(f"{n_seeds} \u00d7 {len(e.envs)}", _dv(n_seeds * len(e.envs)), num=True),
        _td(str(_failures(rec)), _dv(_failures(rec)), num=True),
        _td(steps_text, _dv(steps_v), num=True),
        _td(wall_text + (f" \u00b7 {device}" if device else ""), _dv(wall_v)),
        _td(meta_text, _dv(meta_v)),
        _td(_date(rec), _created_utc(rec)),
        _td_html(_verified_badge(e), 1 if e.verified else 0),
    ]
    return (f'<tr class="{cls}" data-submission="{esc(e.name)}">' + "".join(cells) + "</tr>")


def _rank_table(view: TaskView) -> str:
    ths = "".join(f'<th data-key="{k}" data-type="{t}" scope="col">{esc(label)}</th>'
                  for k, label, t in RANK_COLUMNS)
    rows = "".join(_rank_row(view, i, e) for i, e in enumerate(view.ranked))
    return (f'<div class="wrap"><table id="rank-table"><thead><tr>{ths}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def _env_order(view: TaskView) -> list[str]:
    names = [e.name for e in view.spec.test] if view.spec is not None else []
    for e in view.ranked:
        names += [n for n in e.envs if n not in names]
    return names


def _env_score_table(view: TaskView) -> str:
    envs = _env_order(view)
    head = ["rule"] + [f"{n}: {k}" for n in envs for k in ("mean score", "mean return")]
    rows = []
    for e in view.ranked:
        cells = [_td(e.name)]
        for n in envs:
            s, r = _env_means(e.test, n) if n in e.envs else (None, None)
            cells += [_td(_num(s), num=True), _td(_num(r, 2), num=True)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table(head, rows)


def _interval_plots(view: TaskView) -> str:
    plots = []
    for key, label in (("iqm", "IQM"), ("mean", "mean"),
                       ("optimality_gap", "optimality gap (lower is better)")):
        rows = [(e.name, e.colour, iv) for e in view.ranked if (iv := e.agg(key)) is not None]
        plots.append(svg_intervals(f"{label}, 95% CI", rows, "normalised score"))
    return '<div class="plots">' + "".join(plots) + "</div>"


def _profile_plot(view: TaskView, reps: int, seed: int) -> str:
    top = max(1.0, *(float(e.matrix.max()) for e in view.ranked))
    taus = np.linspace(0.0, top, PROFILE_POINTS)
    series = []
    for e in view.ranked:
        p, lo, hi = performance_profile(e.matrix, taus, reps, _rng(seed, view.id, "profile",
                                                                   e.stem))
        series.append(Series(e.name, e.colour, taus, p, band=(lo, hi)))
    return svg_lines("Performance profiles (test), 95% CI bands", series,
                     "normalised score \u03c4", "fraction of runs with score > \u03c4",
                     include_y=(0.0, 1.0))


def _curve_plots(entries: Sequence[Entry], envs: Sequence[str], seeds: bool = False) -> str:
    plots = []
    for env in envs:
        series = []
        for e in entries:
            if env not in e.curves:
                continue
            steps, iqm, per_seed = e.curves[env]
            if seeds:
                series += [Series(f"{e.name} seed {k}", e.colour, steps, row, 0.8, 0.25)
                           for k, row in enumerate(per_seed)]
            series.append(Series(e.name, e.colour, steps, iqm, 2.2))
        plots.append(svg_lines(f"{env}: IQM over seeds", series, "env steps",
                               "normalised return", include_y=(0.0, 1.0)))
    return '<div class="plots">' + "".join(plots) + "</div>"


def _trace_plots(e: Entry, rec: dict) -> str:
    """One plot per env and recorded trace: every seed thin, their mean thick."""
    plots = []
    for env in e.envs:
        for name in trace_names(rec):
            steps, values = trace_matrix(rec, env, name)
            if not steps.size:
                continue
            series = [Series(f"seed {k}", e.colour, steps, row, 0.8, 0.35)
                      for k, row in enumerate(values)]
            count = np.isfinite(values).sum(axis=0)
            mean = np.where(count > 0, np.nansum(values, axis=0) / np.maximum(count, 1), np.nan)
            series.append(Series("mean", e.colour, steps, mean, 2.2))
            plots.append(svg_lines(f"{env}: {name}", series, "env steps", name))
    return '<div class="plots">' + "".join(plots) + "</div>"


def _stale_table(view: TaskView) -> str:
    rows = [f"<tr>{_td_html(_a(_sub_href(view, e, '../'), e.name))}"
            f"{_td(e.stem + ('.json' if e.test is not None else '.train.json'))}"
            f"{_td(e.stale)}{_td(_date(e.record))}</tr>" for e in view.stale]
    rows += [f"<tr>{_td('')}{_td(name)}{_td(reason)}{_td('')}</tr>"
             for name, reason in view.unreadable]
    if not rows:
        return '<p class="muted">none</p>'
    return _table(["rule", "file", "why it is not ranked", "date"], rows,
                  ' id="stale-table"')


def _a(href: str, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def _last_updated(records: Iterable[dict]) -> str:
    times = [t for r in records if (t := _parse_time(_d(r.get("provenance")).get("created")))]
    return max(times).isoformat() if times else DASH


def _versions(records: Iterable[dict]) -> str:
    vs = sorted({_s(_d(r.get("provenance")).get("metabench")) for r in records} - {""})
    return ", ".join(vs) if vs else DASH


def task_page(view: TaskView, reps: int, seed: int, builder: str) -> str:
    spec = view.spec
    body = [f"<h1>{esc(view.id)}</h1>"]
    if spec is not None:
        if spec.description:
            body.append(f"<p>{esc(spec.description.strip())}</p>")
        baselines = ", ".join(f"{f}: {r}" for f, r in sorted(view.baseline.items()))
        body.append(_dl([
            ("fingerprint", f"<code>{esc(spec.fingerprint())}</code>"),
            ("test envs", esc(", ".join(e.name for e in spec.test))),
            ("train envs", esc(", ".join(e.name for e in spec.train))),
            ("env steps per run", esc(_count(spec.total_timesteps))),
            ("seeds", esc(str(spec.budget.seeds))),
            ("baselines", esc(baselines) or DASH),
        ]))
    else:
        body.append(f'<p class="warn">{esc(view.spec_error)}</p>')
    body.append("<h2>Ranking (test split, by IQM)</h2>")
    if view.ranked:
        body.append('<p class="muted">Click a column header to sort. A <span class="badge tied">'
                    "tied</span> row's IQM 95% CI overlaps the row above's. Failed runs score "
                    "0 and are never dropped. Train IQM comes from the same submission scored "
                    "on the train split: its gap to the test IQM is the generalisation gap."
                    "</p>")
        body.append(_rank_table(view))
        body.append("<h2>Scores per environment (test)</h2>")
        body.append(_env_score_table(view))
        body.append("<h2>Interval estimates</h2>")
        body.append(_legend(view.ranked) + _interval_plots(view))
        body.append("<h2>Performance profiles</h2>")
        body.append(_profile_plot(view, reps, seed))
        body.append("<h2>Learning curves (IQM over seeds)</h2>")
        body.append(_curve_plots(view.ranked, _env_order(view)))
    else:
        body.append('<p class="muted">no ranked results yet</p>')
    body.append("<h2>Stale results</h2>")
    body.append('<p class="muted">Records scored against another version of this task '
                "(or unreadable) are kept here and never ranked.</p>")
    body.append(_stale_table(view))
    footer = (f"last updated {esc(_last_updated(view.records))} \u00b7 records by metabench "
              f"{esc(_versions(view.records))} \u00b7 site built by metabench {esc(builder)}")
    return _page(f"{view.id} \u2014 metabench leaderboard", "\n".join(body), "../", footer)


# --- submission page --------------------------------------------------------------------------


def _agg_table(e: Entry) -> str:
    rows = []
    for split, rec, stale in (("test", e.test, e.stale), ("train", e.train, e.train_stale)):
        if rec is None:
            continue
        aggs = _d(rec.get("aggregates"))
        cells = [_td(split + (" (stale)" if stale else ""))]
        cells += [_td(_ci_text(_interval(aggs.get(k))), num=True)
                  for k in ("iqm", "mean", "median", "optimality_gap")]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table(["split", "IQM", "mean", "median", "optimality gap"], rows)


def _env_table(rec: dict) -> str:
    rows = []
    # Multi-agent envs record the team's (summed) return beside the per-agent one.
    multi = any("team_return" in _d(e) for e in _l(rec.get("envs")))
    for env in _l(rec.get("envs")):
        env = _d(env)
        name = _s(env.get("name"))
        score, ret = _env_means(rec, name)
        fails = sum(1 for r in _l(rec.get("runs"))
                    if _s(_d(r).get("env")) == name and _d(r).get("status") != "ok")
        rows.append("<tr>" + "".join([
            _td(name), _td(env.get("env")), _td(json.dumps(env.get("params"), sort_keys=True)),
            _td(_s(env.get("seeds"))), _td(_num(score), num=True), _td(_num(ret, 2), num=True),
            _td(_num(_f(env.get("random")), 2), num=True),
            _td(_num(_f(env.get("reference")), 2), num=True),
            _td(_count(_f(env.get("env_steps_per_seed"))), num=True),
            _td(_num(_f(env.get("compile_s")), 1), num=True),
            _td(_num(_f(env.get("run_s")), 1), num=True),
            _td(_count(_f(env.get("env_steps_per_s"))), num=True),
            _td(_num(_f(env.get("host_peak_rss_mb")), 0), num=True),
            _td(_num(_f(env.get("device_peak_mb")), 0), num=True), _td(str(fails), num=True),
        ] + ([_td(_num(_f(env.get("team_return")), 2), num=True)] if multi else [])) + "</tr>")
    return _table(["env", "env id", "params", "seeds", "mean score", "mean return", "random",
                   "reference", "env steps / seed", "compile s", "run s", "env steps / s",
                   "host peak RSS MB", "device peak MB", "failures"]
                  + (["mean team return"] if multi else []), rows)


def _runs_table(rec: dict) -> str:
    runs = list(map(_d, _l(rec.get("runs"))))
    multi = any("team_return" in r for r in runs)

    def agents(r: dict) -> list[str]:
        if not multi:
            return []
        per = ", ".join(f"{_s(k)} {_num(_f(v), 2)}"
                        for k, v in sorted(_d(r.get("agent_returns")).items()))
        return [_td(_num(_f(r.get("team_return")), 2), num=True), _td(per)]

    rows = ["<tr>" + "".join([
        _td(_s(r.get("env"))), _td(_s(r.get("seed")), num=True), _td(_s(r.get("status"))),
        _td(_s(r.get("reason"))), _td(_num(_f(r.get("final_return")), 2), num=True),
        _td(_num(_f(r.get("score"))), num=True)] + agents(r)) + "</tr>" for r in runs]
    return _table(["env", "seed", "status", "reason", "final return", "score"]
                  + (["team return", "per-agent return"] if multi else []), rows)


def _check_section(rec: dict) -> str:
    check = rec.get("check")
    if not isinstance(check, dict):
        return '<p class="muted">no conformance check in this record</p>'
    mv = check.get("mirror_valid")
    head = _dl([
        ("passed", esc(_s(check.get("passed"))) or DASH),
        ("mirror valid", DASH if mv is None else esc(_s(mv))),
    ])
    rows = [f"<tr>{_td(c.get('name'))}{_td(_s(c.get('passed')))}{_td(c.get('detail'))}</tr>"
            for c in map(_d, _l(check.get("checks")))]
    return head + _table(["check", "passed", "detail"], rows)


def _disclosure(sub: dict) -> str:
    d = _d(sub.get("disclosure"))
    if not d:
        return DASH
    envs = ", ".join(_s(x) for x in _l(d.get("train_envs")))
    return _dl([
        ("meta-trained for task", _text_or_dash(d.get("task"))),
        ("meta-training envs", esc(envs) or DASH),
        ("env steps", esc(_si(_f(d.get("env_steps"))))),
        ("accelerator hours", esc(_num(_f(d.get("accelerator_hours")), 1))),
        ("notes", _text_or_dash(d.get("notes"))),
    ])


def _provenance(rec: dict) -> str:
    p = _d(rec.get("provenance"))
    libs = ", ".join(f"{k} {_s(v)}" for k, v in sorted(_d(p.get("libraries")).items()))
    return _dl([
        ("created", _text_or_dash(p.get("created"))),
        ("metabench", _text_or_dash(p.get("metabench"))),
        ("command", f"<code>{esc(_s(p.get('command')))}</code>" if p.get("command") else DASH),
        ("device", esc(_device(rec)) or DASH),
        ("platform", _text_or_dash(p.get("platform"))),
        ("python", _text_or_dash(p.get("python"))),
        ("libraries", esc(libs) or DASH),
        ("git commit", _text_or_dash(p.get("git_commit"))
         + (" (with uncommitted changes)" if p.get("git_dirty") is True else "")),
    ])


def submission_page(view: TaskView, e: Entry, builder: str) -> str:
    rec, sub = e.record, e.sub
    rule = _d(rec.get("rule"))
    badges = _verified_badge(e)
    if e.is_baseline:
        badges += _badge("baseline", "baseline")
    if e.is_control:
        badges += _badge("control", "control", "gives the agent no learning signal")
    if e.stale:
        badges += _badge("stale", "stale")
    version = _s(sub.get("version"))
    body = [f"<h1>{esc(e.name)}{' ' + esc(version) if version else ''} {badges}</h1>",
            f'<p>on task <a href="../../tasks/{esc(view.slug)}.html">{esc(view.id)}</a></p>']
    if e.stale:
        body.append(f'<p class="warn">Not ranked: {esc(e.stale)}</p>')
    if _s(rule.get("note")):
        body.append(f'<p class="note">Note: {esc(_s(rule.get("note")))}</p>')
    if _s(sub.get("description")):
        body.append(f"<p>{esc(_s(sub.get('description')))}</p>")
    authors = sub.get("authors")
    authors = ", ".join(_s(a) for a in ([authors] if isinstance(authors, str) else _l(authors)))
    body.append(_dl([
        ("authors", esc(authors) or DASH),
        ("affiliation", _text_or_dash(sub.get("affiliation"))),
        ("version", _text_or_dash(sub.get("version"))),
        ("family", _text_or_dash(e.family)),
        ("paper", _link(sub.get("paper")) if sub.get("paper") else DASH),
        ("code", _link(sub.get("code")) if sub.get("code") else DASH),
        ("licence", _text_or_dash(sub.get("licence"))),
        ("rule", f"<code>{esc(_s(rule.get('factory')))}</code> "
                 f"<code>{esc(json.dumps(rule.get('kwargs', {}), sort_keys=True))}</code>"),
        ("rule params hash", f"<code>{_text_or_dash(rule.get('params_hash'))}</code>"),
        ("submitted params sha256", f"<code>{_text_or_dash(sub.get('params_sha256'))}</code>"),
        ("content hash", f"<code>{_text_or_dash(sub.get('content_hash'))}</code>"),
        ("disclosed meta-training", _disclosure(sub)),
    ]))
    downloads = []
    if e.test is not None:
        downloads.append(_a(f"../../data/{view.slug}/{e.slug}.json", "test record (JSON)"))
    if e.train is not None:
        downloads.append(_a(f"../../data/{view.slug}/{e.slug}.train.json",
                            "train record (JSON)"))
    downloads.append(_a(f"../../data/{view.slug}/{e.slug}.csv", "runs (CSV)"))
    body.append("<p>Download: " + " \u00b7 ".join(downloads) + "</p>")
    body.append("<h2>Scores</h2>" + _agg_table(e))
    if e.poi is not None:
        body.append(f"<p>P({esc(e.name)} &gt; {esc(view.baseline.get(e.family, ''))}) = "
                    f"{esc(_ci_text(e.poi))}</p>")
    wall, _ = _wall_clock(rec)
    body.append(f"<p>wall-clock {esc(wall)} on {esc(_device(rec) or DASH)}; "
                f"{_failures(rec)} failed run(s)</p>")
    split = "test" if e.test is not None else "train"
    body.append(f"<h2>Per environment ({split})</h2>" + _env_table(rec))
    body.append("<h2>Learning curves</h2>"
                + _curve_plots([e], e.envs, seeds=True))
    if trace_names(rec):
        body.append("<h2>Meta-parameters during training</h2>" + _trace_plots(e, rec))
    body.append("<h2>Conformance check</h2>" + _check_section(rec))
    body.append(f"<h2>Runs ({split})</h2>" + _runs_table(rec))
    body.append("<h2>Provenance</h2>" + _provenance(rec))
    footer = f"site built by metabench {esc(builder)}"
    return _page(f"{e.name} on {view.id} \u2014 metabench leaderboard", "\n".join(body),
                 "../../", footer)


# --- CSV --------------------------------------------------------------------------------------


def _csv_text(x: Any) -> str:
    s = _s(x)
    # A cell starting with = + - @ is a formula to spreadsheets; quote it as text.
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") else s


def _csv_num(x: Any) -> str:
    v = _f(x)
    return "" if v is None else repr(v)


def runs_csv(task_id: str, e: Entry) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "submission", "split", "env", "seed", "status", "reason",
                "final_return", "score"])
    for split, rec in (("test", e.test), ("train", e.train)):
        for r in map(_d, _l(_d(rec).get("runs"))):
            seed = r.get("seed")
            w.writerow([_csv_text(task_id), _csv_text(e.name), split, _csv_text(r.get("env")),
                        seed if isinstance(seed, int) else _csv_text(seed),
                        _csv_text(r.get("status")), _csv_text(r.get("reason")),
                        _csv_num(r.get("final_return")), _csv_num(r.get("score"))])
    return buf.getvalue()


# --- index ------------------------------------------------------------------------------------


def index_page(views: Sequence[TaskView], builder: str) -> str:
    rows = []
    for v in views:
        top = "".join(f'<li><a href="{esc(_sub_href(v, e, ""))}">{esc(e.name)}</a> '
                      f'<span class="muted">IQM {esc(_ci_text(e.agg("iqm")))}</span></li>'
                      for e in v.contenders[:TOP_N])
        desc = v.spec.description.strip() if v.spec is not None else (v.spec_error or "")
        rows.append("<tr>" + "".join([
            _td_html(_a(f"tasks/{v.slug}.html", v.id)),
            _td(desc),
            _td_html(f"<ol>{top}</ol>" if top else '<span class="muted">no ranked results'
                     "</span>"),
            _td(f"{len(v.contenders)} ranked / {len(v.entries)} total", num=True),
            _td(_last_updated(v.records)),
            _td(_versions(v.records)),
        ]) + "</tr>")
    records = [r for v in views for r in v.records]
    body = [
        "<h1>metabench leaderboard</h1>",
        "<p>Learned reinforcement-learning update rules, scored on held-out environments under "
        "a fixed env-step budget. Rules are ranked by the interquartile mean (IQM) of "
        "normalised scores with 95% stratified-bootstrap confidence intervals.</p>",
        _dl([("last updated", esc(_last_updated(records))),
             ("benchmark (site) version", f"metabench {esc(builder)}"),
             ("harness versions in records", esc(_versions(records)))]),
        _table(["task", "description", f"top {TOP_N} by IQM (test)", "submissions",
                "last updated", "harness versions"], rows, ' id="task-table"'),
    ]
    return _page("metabench leaderboard", "\n".join(body), "",
                 f"site built by metabench {esc(builder)}")


# --- building ---------------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    # JSON may carry lone surrogates, which UTF-8 cannot encode: they become "?".
    return text.encode("utf-8", errors="replace")


def render_site(results_dir: Path, tasks_dir: Path | None = None, bootstrap_reps: int = 2000,
                seed: int = 0) -> dict[str, bytes]:
    """Every file of the site as ``{relative path: bytes}``; pure apart from reading inputs."""
    from metabench import __version__ as builder
    from metabench.tasks import spec as spec_mod

    results_dir = Path(results_dir)
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else spec_mod.TASKS_DIR
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results folder at {results_dir}")
    if bootstrap_reps < 1:
        raise ValueError(f"bootstrap_reps must be at least 1, got {bootstrap_reps}")
    views = [analyse_task(t, results_dir, tasks_dir, bootstrap_reps, seed)
             for t in discover_tasks(results_dir, tasks_dir)]
    files: dict[str, bytes] = {MARKER: b"generated by `metabench leaderboard build`; this "
                                       b"folder is replaced on every build\n"}
    files["index.html"] = _utf8(index_page(views, builder))
    for v in views:
        files[f"tasks/{v.slug}.html"] = _utf8(task_page(v, bootstrap_reps, seed, builder))
        for e in v.entries:
            base = f"{v.slug}/{e.slug}"
            files[f"submissions/{base}.html"] = _utf8(submission_page(v, e, builder))
            files[f"data/{base}.csv"] = _utf8(runs_csv(v.id, e))
            if e.test_raw is not None:
                files[f"data/{base}.json"] = e.test_raw
            if e.train_raw is not None:
                files[f"data/{base}.train.json"] = e.train_raw
    return files


def _write_tree(out_dir: Path, files: dict[str, bytes]) -> None:
    """Writes the site into a fresh sibling folder, then swaps it in, so that a reader never
    sees half a site and files of a previous build never linger."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MARKER).exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a metabench site (no {MARKER}); "
                              "refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        root = tmp.resolve()
        for rel, data in sorted(files.items()):
            path = (tmp / rel).resolve()
            if root not in path.parents:  # slugs make this impossible; keep it impossible
                raise ValueError(f"refusing to write {rel!r} outside the site folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a site is for reading
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "site")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(results_dir: Path = Path("leaderboard/results"),
          out_dir: Path = Path("leaderboard/site"), tasks_dir: Path | None = None,
          bootstrap_reps: int = 2000, seed: int = 0) -> Path:
    """Builds the static site from the result records; returns ``out_dir/index.html``."""
    files = render_site(results_dir, tasks_dir, bootstrap_reps, seed)
    _write_tree(Path(out_dir), files)
    return Path(out_dir) / "index.html"


# --- serving ----------------------------------------------------------------------------------


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map,
                      ".html": "text/html; charset=utf-8", ".json": "application/json",
                      ".csv": "text/csv; charset=utf-8", ".svg": "image/svg+xml"}

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


def make_server(site_dir: Path = Path("leaderboard/site"), port: int = 8000,
                host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server for the built site (port 0 picks a free port); call ``serve_forever``."""
    site = Path(site_dir)
    if not (site / "index.html").is_file():
        raise FileNotFoundError(f"no site at {site} (no index.html); run "
                                "`metabench leaderboard build` first")
    handler = functools.partial(_Handler, directory=str(site))
    return ThreadingHTTPServer((host, port), handler)


def serve(site_dir: Path = Path("leaderboard/site"), port: int = 8000,
          host: str = "127.0.0.1") -> None:
    """Serves the built site on ``http://host:port/`` until interrupted."""
    server = make_server(site_dir, port, host)
    h, p = server.server_address[:2]
    print(f"serving {site_dir} at http://{h}:{p}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
