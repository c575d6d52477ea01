"""The site's HTML pages: what each page shows, computed from the data model, and rendered
by the Jinja2 templates in ``templates/`` with autoescaping on.

The split keeps every record string out of markup-building Python: this module hands the
templates plain text (and numbers), and the templates escape all of it, in element content
and attribute values alike. The only pre-rendered markup they receive is the SVG of
:mod:`metabench.site.svg`, which escapes every text it places, and the site's own static
CSS and script.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import math
from importlib import resources
from typing import Any, Iterable, NamedTuple, Sequence

import jinja2
import numpy as np
from markupsafe import Markup

from metabench.scoring import performance_profile
from metabench.site.model import (AGGREGATE_LABELS, Entry, TaskView, as_dict, as_interval,
                                  as_list, as_number, as_text, env_means, headline, pair_rng,
                                  parse_time, safe_url, trace_matrix, trace_names)
from metabench.site.svg import Series, svg_intervals, svg_lines

PROFILE_POINTS = 81
TOP_N = 3
DASH = "\u2014"


def _static(name: str) -> str:
    return (resources.files("metabench.site") / "static" / name).read_text(encoding="utf-8")


CSS = _static("site.css")
SCRIPT = _static("site.js")
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
# Only our own script runs, nothing is fetched: even a string that escaped escaping could
# neither execute nor phone home.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
       f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'")


@functools.cache
def _templates() -> jinja2.Environment:
    """The one Jinja2 environment; autoescape is on for every template, whatever its name."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("metabench.site", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    # The CSS and script are our own files, so they go in as they are (escaping would break
    # the script, and its hash in the CSP).
    env.globals.update(DASH=DASH, csp=CSP, css=Markup(CSS), script=Markup(SCRIPT))
    return env


def _render(template: str, **context: Any) -> str:
    return _templates().get_template(template).render(**context)


# --- what the templates are handed ------------------------------------------------------------


class Cell(NamedTuple):
    """A table cell: text (a dash when empty), a ``data-value`` to sort by, right-aligned
    when numeric, and a link when it has an href."""

    text: str
    value: Any = None
    num: bool = False
    href: str | None = None


class Table(NamedTuple):
    head: list[str]
    rows: list[list[Cell]]


class Link(NamedTuple):
    href: str | None
    text: str


def _cell(x: Any, value: Any = None, num: bool = False) -> Cell:
    return Cell(as_text(x), value, num)


def _link(url: Any) -> Link:
    """A link when ``url`` is plain http(s), else its text; a missing one shows a dash."""
    if not url:
        return Link(None, "")
    ok = safe_url(url)
    return Link(ok, ok if ok is not None else as_text(url))


def table_html(table: Table) -> Markup:
    """One table as the pages show it (for checking a table on its own)."""
    return Markup(_templates().get_template("macros.html").module.table(table))


# --- formatting -------------------------------------------------------------------------------


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


def _ci_text(iv: tuple[float, float, float] | None) -> str:
    return DASH if iv is None else f"{iv[0]:.3f} [{iv[1]:.3f}, {iv[2]:.3f}]"


def _created(rec: dict | None) -> datetime.datetime | None:
    return parse_time(as_dict(as_dict(rec).get("provenance")).get("created"))


def _created_utc(rec: dict | None) -> str:
    t = _created(rec)
    return t.isoformat() if t else ""


def _date(rec: dict | None) -> str:
    t = _created(rec)
    return t.date().isoformat() if t else ""


def _last_updated(records: Iterable[dict]) -> str:
    times = [t for r in records if (t := _created(r))]
    return max(times).isoformat() if times else DASH


def _versions(records: Iterable[dict]) -> str:
    vs = sorted({as_text(as_dict(r.get("provenance")).get("metabench")) for r in records} - {""})
    return ", ".join(vs) if vs else DASH


# --- per-entry facts shown in tables ----------------------------------------------------------


def _failures(rec: dict) -> int:
    return sum(1 for r in as_list(rec.get("runs")) if as_dict(r).get("status") != "ok")


def _env_steps(rec: dict) -> tuple[str, float | None]:
    vals = sorted({v for e in as_list(rec.get("envs"))
                   if (v := as_number(as_dict(e).get("env_steps_per_seed"))) is not None})
    if not vals:
        v = as_number(as_dict(rec.get("task")).get("total_timesteps"))
        return _count(v), v
    if len(vals) == 1:
        return _count(vals[0]), vals[0]
    return f"{_count(vals[0])}\u2013{_count(vals[-1])}", vals[0]


def _wall_clock(rec: dict) -> tuple[str, float | None]:
    total = as_number(rec.get("wall_clock_s"))
    if total is not None:
        return f"{total:,.0f} s", total
    parts = [as_number(as_dict(e).get(k)) for e in as_list(rec.get("envs"))
             for k in ("compile_s", "run_s")]
    parts = [p for p in parts if p is not None]
    if not parts:
        return DASH, None
    return f"\u2248{sum(parts):,.0f} s (compile+run)", sum(parts)


def _device(rec: dict) -> str:
    dev = as_dict(as_dict(rec.get("provenance")).get("device"))
    kind, plat = as_text(dev.get("kind")), as_text(dev.get("platform"))
    if not kind and not plat:
        return ""
    return f"{kind or '?'} / {plat or '?'}"


def _disclosed(e: Entry) -> tuple[str, float | None]:
    d = as_dict(e.sub.get("disclosure"))
    steps, hours = as_number(d.get("env_steps")), as_number(d.get("accelerator_hours"))
    parts = []
    if steps is not None:
        parts.append(f"{_si(steps)} env steps")
    if hours is not None:
        parts.append(f"{hours:g} accel-h")
    return (" \u00b7 ".join(parts) if parts else DASH), steps


def _sub_href(view: TaskView, e: Entry, root: str) -> str:
    return f"{root}submissions/{view.slug}/{e.slug}.html"


# --- plots ------------------------------------------------------------------------------------


def _interval_plots(view: TaskView) -> list[Markup]:
    plots = []
    for key, label in (("iqm", "IQM"), ("mean", "mean"),
                       ("optimality_gap", "optimality gap (lower is better)")):
        rows = [(e.name, e.colour, iv) for e in view.ranked if (iv := e.agg(key)) is not None]
        plots.append(svg_intervals(f"{label}, 95% CI", rows, "normalised score"))
    return plots


def _profile_plot(view: TaskView, reps: int, seed: int) -> Markup:
    top = max(1.0, *(float(e.matrix.max()) for e in view.ranked))
    taus = np.linspace(0.0, top, PROFILE_POINTS)
    series = []
    for e in view.ranked:
        p, lo, hi = performance_profile(e.matrix, taus, reps, pair_rng(seed, view.id, "profile",
                                                                   e.stem))
        series.append(Series(e.name, e.colour, taus, p, band=(lo, hi)))
    return svg_lines("Performance profiles (test), 95% CI bands", series,
                     "normalised score \u03c4", "fraction of runs with score > \u03c4",
                     include_y=(0.0, 1.0))


def _curve_plots(entries: Sequence[Entry], envs: Sequence[str],
                 seeds: bool = False) -> list[Markup]:
    """One plot per env: each entry's IQM curve, and with ``seeds`` every seed's faintly."""
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
    return plots


def _trace_plots(e: Entry, rec: dict) -> list[Markup]:
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
    return plots


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


def _point(iv: tuple[float, float, float] | None) -> float | None:
    return iv[0] if iv else None


def _rank_row(view: TaskView, i: int, e: Entry) -> dict:
    """One rank-table row: the rank, rule and verified cells (which carry badges) as facts,
    the columns between them as plain Cells in RANK_COLUMNS order."""
    rec = e.test
    iqm, mean, gap = e.agg("iqm"), e.agg("mean"), e.agg("optimality_gap")
    n_seeds = e.matrix.shape[0]
    steps_text, steps_v = _env_steps(rec)
    wall_text, wall_v = _wall_clock(rec)
    device = _device(rec)
    meta_text, meta_v = _disclosed(e)
    cells = [
        _cell(e.family, e.family.lower()),
        _cell(_ci_text(iqm), _dv(iqm[0]), num=True),
        _cell(_num(_point(mean)), _dv(_point(mean)), num=True),
        _cell(_num(_point(gap)), _dv(_point(gap)), num=True),
        _cell(_ci_text(e.poi), _dv(_point(e.poi)), num=True),
        _cell(_ci_text(e.train_iqm), _dv(_point(e.train_iqm)), num=True),
        _cell(f"{n_seeds} \u00d7 {len(e.envs)}", _dv(n_seeds * len(e.envs)), num=True),
        _cell(str(_failures(rec)), _dv(_failures(rec)), num=True),
        _cell(steps_text, _dv(steps_v), num=True),
        _cell(wall_text + (f" \u00b7 {device}" if device else ""), _dv(wall_v)),
        _cell(meta_text, _dv(meta_v)),
        _cell(_date(rec), _created_utc(rec)),
    ]
    return {"cls": "rank-row tied" if e.tied else "rank-row", "name": e.name,
            "sort_name": e.name.lower(), "href": _sub_href(view, e, "../"), "rank": i + 1,
            "control": e.is_control, "tied": e.tied, "baseline": e.is_baseline,
            "note": as_text(as_dict(rec.get("rule")).get("note")), "verified": e.verified,
            "verdict": e.verdict.reason, "numerics": numerics_note(rec),
            "cells": cells}


def _env_order(view: TaskView) -> list[str]:
    names = [e.name for e in view.spec.test] if view.spec is not None else []
    for e in view.ranked:
        names += [n for n in e.envs if n not in names]
    return names


def _env_score_table(view: TaskView) -> Table:
    envs = _env_order(view)
    head = ["rule"] + [f"{n}: {k}" for n in envs for k in ("mean score", "mean return")]
    rows = []
    for e in view.ranked:
        cells = [_cell(e.name)]
        for n in envs:
            s, r = env_means(e.test, n) if n in e.envs else (None, None)
            cells += [_cell(_num(s), num=True), _cell(_num(r, 2), num=True)]
        rows.append(cells)
    return Table(head, rows)


def _stale_table(view: TaskView) -> Table:
    """Stale entries (linked to their pages) and unreadable files, with the reason."""
    rows = [[Cell(e.name, href=_sub_href(view, e, "../")),
             _cell(e.stem + (".json" if e.test is not None else ".train.json")),
             _cell(e.stale), _cell(_date(e.record))] for e in view.stale]
    rows += [[_cell(""), _cell(name), _cell(reason), _cell("")]
             for name, reason in view.unreadable]
    return Table(["rule", "file", "why it is not ranked", "date"], rows)


def _spec_facts(view: TaskView) -> dict | None:
    spec = view.spec
    if spec is None:
        return None
    return {"description": (spec.description or "").strip(),
            "fingerprint": spec.fingerprint(),
            "test_envs": ", ".join(e.name for e in spec.test),
            "train_envs": ", ".join(e.name for e in spec.train),
            "env_steps": _count(spec.total_timesteps), "seeds": str(spec.budget.seeds),
            "baselines": ", ".join(f"{f}: {r}" for f, r in sorted(view.baseline.items()))}


def task_page(view: TaskView, reps: int, seed: int, builder: str) -> str:
    context: dict[str, Any] = {
        "title": f"{view.id} \u2014 metabench leaderboard", "root": "../", "builder": builder,
        "id": view.id, "spec": _spec_facts(view), "spec_error": view.spec_error,
        "columns": RANK_COLUMNS, "ranked": [], "stale": _stale_table(view),
        "headline": AGGREGATE_LABELS[headline(view)],
        "updated": _last_updated(view.records), "versions": _versions(view.records)}
    if view.ranked:  # the plots need at least one ranked entry
        context.update(
            ranked=[_rank_row(view, i, e) for i, e in enumerate(view.ranked)],
            env_scores=_env_score_table(view),
            legend=[{"name": e.name, "colour": e.colour} for e in view.ranked],
            interval_plots=_interval_plots(view),
            profile_plot=_profile_plot(view, reps, seed),
            curve_plots=_curve_plots(view.ranked, _env_order(view)))
    return _render("task.html", **context)


# --- submission page --------------------------------------------------------------------------


def _agg_table(e: Entry) -> Table:
    rows = []
    for split, rec, stale in (("test", e.test, e.stale), ("train", e.train, e.train_stale)):
        if rec is None:
            continue
        aggs = as_dict(rec.get("aggregates"))
        rows.append([_cell(split + (" (stale)" if stale else ""))]
                    + [_cell(_ci_text(as_interval(aggs.get(k))), num=True)
                       for k in ("iqm", "mean", "median", "optimality_gap")])
    return Table(["split", "IQM", "mean", "median", "optimality gap"], rows)


ENV_COLUMNS = ["env", "env id", "params", "seeds", "mean score", "mean return", "random",
               "reference", "env steps / seed", "compile s", "run s", "env steps / s",
               "host peak RSS MB", "device peak MB", "failures"]


def env_table(rec: dict) -> Table:
    """Per env of a record: its settings, mean score and return, cost and failures; for
    multi-agent envs the team's (summed) return beside the per-agent one."""
    multi = any("team_return" in as_dict(e) for e in as_list(rec.get("envs")))
    rows = []
    for env in map(as_dict, as_list(rec.get("envs"))):
        name = as_text(env.get("name"))
        score, ret = env_means(rec, name)
        fails = sum(1 for r in as_list(rec.get("runs"))
                    if as_text(as_dict(r).get("env")) == name and as_dict(r).get("status") != "ok")
        def number(key, digits):
            return _cell(_num(as_number(env.get(key)), digits), num=True)
        count = lambda key: _cell(_count(as_number(env.get(key))), num=True)  # noqa: E731
        rows.append([
            _cell(name), _cell(env.get("env")),
            _cell(json.dumps(env.get("params"), sort_keys=True)), _cell(env.get("seeds")),
            _cell(_num(score), num=True), _cell(_num(ret, 2), num=True),
            number("random", 2), number("reference", 2), count("env_steps_per_seed"),
            number("compile_s", 1), number("run_s", 1), count("env_steps_per_s"),
            number("host_peak_rss_mb", 0), number("device_peak_mb", 0),
            _cell(str(fails), num=True),
        ] + ([number("team_return", 2)] if multi else []))
    return Table(ENV_COLUMNS + (["mean team return"] if multi else []), rows)


def runs_table(rec: dict) -> Table:
    """One row per run; multi-agent records add the team's and each agent's return."""
    runs = list(map(as_dict, as_list(rec.get("runs"))))
    multi = any("team_return" in r for r in runs)

    def agents(r: dict) -> list[Cell]:
        if not multi:
            return []
        per = ", ".join(f"{as_text(k)} {_num(as_number(v), 2)}"
                        for k, v in sorted(as_dict(r.get("agent_returns")).items()))
        return [_cell(_num(as_number(r.get("team_return")), 2), num=True), _cell(per)]

    rows = [[_cell(r.get("env")), _cell(r.get("seed"), num=True), _cell(r.get("status")),
             _cell(r.get("reason")), _cell(_num(as_number(r.get("final_return")), 2), num=True),
             _cell(_num(as_number(r.get("score"))), num=True)] + agents(r) for r in runs]
    return Table(["env", "seed", "status", "reason", "final return", "score"]
                 + (["team return", "per-agent return"] if multi else []), rows)


def _check(rec: dict) -> dict | None:
    check = rec.get("check")
    if not isinstance(check, dict):
        return None
    mv = check.get("mirror_valid")
    rows = [[_cell(c.get("name")), _cell(c.get("passed")), _cell(c.get("detail"))]
            for c in map(as_dict, as_list(check.get("checks")))]
    return {"passed": as_text(check.get("passed")),
            "mirror_valid": DASH if mv is None else as_text(mv),
            "table": Table(["check", "passed", "detail"], rows)}


def _disclosure(sub: dict) -> dict | None:
    d = as_dict(sub.get("disclosure"))
    if not d:
        return None
    return {"task": as_text(d.get("task")),
            "envs": ", ".join(as_text(x) for x in as_list(d.get("train_envs"))),
            "env_steps": _si(as_number(d.get("env_steps"))),
            "hours": _num(as_number(d.get("accelerator_hours")), 1),
            "notes": as_text(d.get("notes"))}


def numerics_note(rec: dict) -> str:
    """What a record was scored under that is not metabench's numerics defaults (``XLA_FLAGS``,
    x64, matmul precision, ...: ``provenance.numerics``), as one line; empty when nothing, or
    for a record from before such settings were recorded."""
    num = as_dict(as_dict(as_dict(rec).get("provenance")).get("numerics"))
    settings = as_dict(num.get("settings"))
    changed = [as_text(k) for k in as_list(num.get("non_default"))]
    return "; ".join(f"{k} = {as_text(settings.get(k))!s}" for k in changed)


def _provenance(rec: dict) -> dict:
    p = as_dict(rec.get("provenance"))
    return {"created": as_text(p.get("created")), "metabench": as_text(p.get("metabench")),
            "command": as_text(p.get("command")) if p.get("command") else "",
            "platform": as_text(p.get("platform")), "python": as_text(p.get("python")),
            "libraries": ", ".join(f"{k} {as_text(v)}"
                                   for k, v in sorted(as_dict(p.get("libraries")).items())),
            "git_commit": as_text(p.get("git_commit")), "git_dirty": p.get("git_dirty") is True,
            "numerics": numerics_note(rec)}


def _downloads(view: TaskView, e: Entry) -> list[tuple[str, str]]:
    base = f"../../data/{view.slug}/{e.slug}"
    out = []
    if e.test is not None:
        out.append((f"{base}.json", "test record (JSON)"))
    if e.train is not None:
        out.append((f"{base}.train.json", "train record (JSON)"))
    return out + [(f"{base}.csv", "runs (CSV)")]


def _authors(sub: dict) -> str:
    authors = sub.get("authors")
    names = [authors] if isinstance(authors, str) else as_list(authors)
    return ", ".join(as_text(a) for a in names)


def submission_page(view: TaskView, e: Entry, builder: str) -> str:
    rec, sub = e.record, e.sub
    rule = as_dict(rec.get("rule"))
    poi = None if e.poi is None else {"baseline": view.baseline.get(e.family, ""),
                                      "interval": _ci_text(e.poi)}
    return _render(
        "submission.html", title=f"{e.name} on {view.id} \u2014 metabench leaderboard",
        root="../../", builder=builder, task_id=view.id, task_slug=view.slug,
        name=e.name, version=as_text(sub.get("version")), verified=e.verified,
        verdict=e.verdict.reason,
        baseline=e.is_baseline, control=e.is_control, stale=e.stale or "",
        note=as_text(rule.get("note")), description=as_text(sub.get("description")),
        authors=_authors(sub), affiliation=as_text(sub.get("affiliation")), family=e.family,
        paper=_link(sub.get("paper")), code=_link(sub.get("code")),
        licence=as_text(sub.get("licence")),
        rule={"factory": as_text(rule.get("factory")),
              "kwargs": json.dumps(rule.get("kwargs", {}), sort_keys=True),
              "params_hash": as_text(rule.get("params_hash"))},
        params_sha256=as_text(sub.get("params_sha256")),
        content_hash=as_text(sub.get("content_hash")),
        disclosure=_disclosure(sub), downloads=_downloads(view, e), aggregates=_agg_table(e),
        poi=poi, wall_clock=_wall_clock(rec)[0], device=_device(rec), failures=_failures(rec),
        split="test" if e.test is not None else "train", env_table=env_table(rec),
        curve_plots=_curve_plots([e], e.envs, seeds=True),
        trace_plots=_trace_plots(e, rec) if trace_names(rec) else [],
        check=_check(rec), runs_table=runs_table(rec), provenance=_provenance(rec))


# --- index ------------------------------------------------------------------------------------


def _index_row(v: TaskView) -> dict:
    top = [{"href": _sub_href(v, e, ""), "name": e.name, "iqm": _ci_text(e.agg("iqm"))}
           for e in v.contenders[:TOP_N]]
    desc = v.spec.description.strip() if v.spec is not None else (v.spec_error or "")
    return {"task": Cell(v.id, href=f"tasks/{v.slug}.html"), "description": _cell(desc),
            "top": top,
            "count": _cell(f"{len(v.contenders)} ranked / {len(v.entries)} total", num=True),
            "updated": _cell(_last_updated(v.records)), "versions": _cell(_versions(v.records))}


def index_page(views: Sequence[TaskView], builder: str) -> str:
    records = [r for v in views for r in v.records]
    return _render("index.html", title="metabench leaderboard", root="", builder=builder,
                   top_n=TOP_N, tasks=[_index_row(v) for v in views],
                   updated=_last_updated(records), versions=_versions(records))
