"""The static leaderboard: ranking, ties, probability of improvement, staleness, escaping,
safe file names, determinism, downloads, the index, and the build-time budget."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from rliable import metrics

from helpers import (ENVS, ESCAPED, HOSTILE, make_bench_set, make_record, random_scores,
                     submission_block, trust_test_key, write_record, write_site_task)
from metabench import results, scoring
from metabench.site import model, pages, svg
from metabench.site.build import build as build_site
from metabench.site.pages import DASH

REPS = 200  # bootstrap reps for the small sites; the budget test uses the default


# --- helpers ----------------------------------------------------------------------------------


def rank_rows(page: str) -> list[dict]:
    """The rank table's rows as {column key: (text, data-value)} plus their class and name."""
    table = re.search(r'<table id="rank-table">(.*?)</table>', page, re.S)
    assert table, "no rank table"
    keys = re.findall(r'<th data-key="([^"]+)"', table.group(1))
    rows = []
    for cls, name, inner in re.findall(
            r'<tr class="([^"]*)" data-submission="([^"]*)">(.*?)</tr>', table.group(1), re.S):
        cells = re.findall(r'<td([^>]*)>(.*?)</td>', inner, re.S)
        row = {"class": cls.split(), "name": html.unescape(name)}
        for key, (attrs, content) in zip(keys, cells):
            dv = re.search(r'data-value="([^"]*)"', attrs)
            row[key] = (html.unescape(re.sub(r"<[^>]+>", "", content)).strip(),
                        html.unescape(dv.group(1)) if dv else None)
        rows.append(row)
    return rows


def site_files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*"))
            if p.is_file()}


def html_texts(site: Path) -> dict[str, str]:
    return {k: v.decode() for k, v in site_files(site).items() if k.endswith(".html")}


@pytest.fixture
def env(tmp_path):
    """A tasks dir with task ``t``, an empty results dir, and a builder."""
    tasks, res = tmp_path / "tasks", tmp_path / "results"
    res.mkdir()
    trust_test_key(tmp_path / "keys")
    fp = write_site_task(tasks, "t", "the test task")

    def build(out: str = "site", reps: int = REPS) -> Path:
        build_site(res, tmp_path / out, tasks, bootstrap_reps=reps, seed=0)
        return tmp_path / out

    return {"tasks": tasks, "results": res, "fp": fp, "build": build, "root": tmp_path}


def add(env, name, scores=None, stem=None, **kw):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if scores is None:
        scores = random_scores(rng, 0.5)
    kw.setdefault("submission", submission_block(name))
    rec = make_record(kw.pop("task", "t"), kw.pop("fp", env["fp"]), name, scores, **kw)
    return write_record(env["results"], stem or name, rec), rec


# --- ranking ----------------------------------------------------------------------------------


def test_ranks_by_iqm_point_not_mean(env):
    add(env, "alpha", iqm=0.5, iqm_ci=(0.45, 0.55), mean=0.9)
    add(env, "bravo", iqm=0.7, iqm_ci=(0.65, 0.75), mean=0.45)
    add(env, "charlie", iqm=0.3, iqm_ci=(0.25, 0.35), mean=0.5)
    site = env["build"]()
    rows = rank_rows((site / "tasks" / "t.html").read_text())
    assert [r["name"] for r in rows] == ["bravo", "alpha", "charlie"]
    assert [r["rank"][1] for r in rows] == ["1", "2", "3"]
    assert rows[0]["iqm"] == ("0.700 [0.650, 0.750]", "0.7")
    index = (site / "index.html").read_text()
    assert index.index("bravo") < index.index("alpha") < index.index("charlie")


def test_ranks_by_the_tasks_aggregate_and_a_gap_ranks_lowest_first(env):
    """``scoring.aggregate`` is what a task ranks by: the same records rank by their mean
    when the task says mean, and by the smallest optimality gap when it says that."""
    add(env, "alpha", iqm=0.5, iqm_ci=(0.45, 0.55), mean=0.9)
    add(env, "bravo", iqm=0.7, iqm_ci=(0.65, 0.75), mean=0.45)
    for aggregate, order in (("mean", ["alpha", "bravo"]), ("iqm", ["bravo", "alpha"])):
        fp = write_site_task(env["tasks"], "t", "the test task", aggregate=aggregate)
        for name in ("alpha", "bravo"):  # the same runs, recorded under the retuned spec
            rec = json.loads((env["results"] / "t" / f"{name}.json").read_text())
            rec["task"]["fingerprint"] = fp("drift")
            (env["results"] / "t" / f"{name}.json").write_text(json.dumps(rec))
        page = (env["build"]() / "tasks" / "t.html").read_text()
        assert [r["name"] for r in rank_rows(page)] == order, aggregate
        label = {"mean": "mean", "iqm": "IQM"}[aggregate]
        assert f"Ranking (test split, by {label})" in page
    view = model.analyse_task("t", env["results"], env["tasks"], REPS, 0)
    gaps = {e.name: e.agg("optimality_gap")[0] for e in view.ranked}
    fp = write_site_task(env["tasks"], "t", "the test task", aggregate="optimality_gap")
    for name in ("alpha", "bravo"):
        rec = json.loads((env["results"] / "t" / f"{name}.json").read_text())
        rec["task"]["fingerprint"] = fp("drift")
        (env["results"] / "t" / f"{name}.json").write_text(json.dumps(rec))
    view = model.analyse_task("t", env["results"], env["tasks"], REPS, 0)
    assert [e.name for e in view.ranked] == sorted(gaps, key=gaps.get)


def test_controls_are_listed_below_every_contender_and_never_numbered(env):
    # A control that scores above a contender (a task that cannot separate them) is still
    # listed last, badged, and left out of the index's top list and ranked count.
    add(env, "good", iqm=0.7, iqm_ci=(0.65, 0.75))
    add(env, "poor", iqm=0.2, iqm_ci=(0.15, 0.25))
    add(env, "null_drift", iqm=0.4, iqm_ci=(0.35, 0.45),
        submission=submission_block("null_drift", control=True))
    site = env["build"]()
    task_page = (site / "tasks" / "t.html").read_text()
    rows = rank_rows(task_page)
    assert [r["name"] for r in rows] == ["good", "poor", "null_drift"]
    assert [r["rank"][1] for r in rows[:2]] == ["1", "2"]
    assert "control" in rows[2]["rank"][0] and rows[2]["rank"][1] == "3"
    index = (site / "index.html").read_text()
    assert "null_drift" not in index and "2 ranked / 3 total" in index
    sub_page = next(p for p in (site / "submissions" / "t").iterdir() if "null" in p.name)
    assert 'class="badge control"' in sub_page.read_text()


def test_overlapping_cis_are_marked_tied(env):
    add(env, "a", iqm=0.80, iqm_ci=(0.75, 0.85))
    add(env, "b", iqm=0.70, iqm_ci=(0.60, 0.76))   # reaches into a's CI
    add(env, "c", iqm=0.50, iqm_ci=(0.45, 0.55))   # clear of b's
    add(env, "d", iqm=0.45, iqm_ci=(0.30, 0.46))   # reaches into c's
    page = (env["build"]() / "tasks" / "t.html").read_text()
    rows = rank_rows(page)
    assert [r["name"] for r in rows] == ["a", "b", "c", "d"]
    assert ["tied" in r["class"] for r in rows] == [False, True, False, True]
    assert [r["rank"][0] for r in rows] == ["1", "2tied", "3", "4tied"]


# --- probability of improvement ---------------------------------------------------------------


@pytest.mark.parametrize("ny", [16, 10])
def test_poi_point_equals_rliable_exactly(ny):
    rng = np.random.default_rng(ny)
    x = np.round(rng.normal(0.6, 0.2, (16, 3)), 1)  # rounding makes ties
    y = np.round(rng.normal(0.5, 0.2, (ny, 3)), 1)
    if ny == 16:
        y[:, 1] = x[:, 1]  # identical columns take rliable's 0.5 shortcut
    assert scoring.poi_point(x, y) == metrics.probability_of_improvement(x, y)
    assert scoring.poi_point(y, x) == metrics.probability_of_improvement(y, x)


def test_poi_interval_agrees_with_rliables_bootstrap():
    rng = np.random.default_rng(7)
    x, y = rng.normal(0.6, 0.2, (16, 2)), rng.normal(0.5, 0.2, (12, 2))
    point, lo, hi = scoring.poi_interval(x, y, 2000, np.random.default_rng(0))
    ref = scoring.probability_of_improvement(x, y, reps=2000, seed=0)
    assert point == ref.point
    assert abs(lo - ref.lo) < 0.03 and abs(hi - ref.hi) < 0.03
    again = scoring.poi_interval(x, y, 2000, np.random.default_rng(0))
    assert again == (point, lo, hi)


def test_task_page_shows_poi_against_the_task_baseline(env):
    rng = np.random.default_rng(3)
    base_scores, dpo_scores = random_scores(rng, 0.5), random_scores(rng, 0.6)
    add(env, "ppo_clip", base_scores, submission=submission_block("ppo_clip", baseline=True))
    add(env, "dpo", dpo_scores)
    add(env, "tdish", random_scores(rng, 0.55), family="td_loss",
        submission=submission_block("tdish", family="td_loss"))
    rows = {r["name"]: r for r in rank_rows((env["build"]() / "tasks" / "t.html").read_text())}
    expected = metrics.probability_of_improvement(dpo_scores, base_scores)
    text, value = rows["dpo"]["poi"]
    assert text.startswith(f"{expected:.3f} [") and float(value) == pytest.approx(expected)
    lo, hi = map(float, re.findall(r"[\d.]+", text)[1:3])
    assert lo <= expected <= hi
    assert rows["ppo_clip"]["poi"][0].startswith("0.500")
    assert "baseline" in rows["ppo_clip"]["rule"][0]
    assert rows["tdish"]["poi"] == (DASH, "")  # no baseline for its family


# --- staleness --------------------------------------------------------------------------------


def test_stale_records_are_listed_not_ranked(env):
    add(env, "fresh")
    add(env, "old", fp="0123456789abcdef")
    fp_gone = write_site_task(env["tasks"], "gone")
    add(env, "orphan", task="gone", fp=fp_gone)
    (env["tasks"] / "gone.yaml").unlink()  # the task was retired after scoring
    # a train record whose fingerprint is stale does not feed the train-IQM column
    rec = make_record("t", "ffffffffffffffff", "fresh", random_scores(np.random.default_rng(0),
                                                                      0.9), split="train")
    write_record(env["results"], "fresh", rec)
    site = env["build"]()
    page = (site / "tasks" / "t.html").read_text()
    rows = rank_rows(page)
    assert [r["name"] for r in rows] == ["fresh"]
    assert rows[0]["train_iqm"][0] == DASH
    stale = re.search(r'<table id="stale-table">(.*?)</table>', page, re.S).group(1)
    assert "old" in stale and "0123456789abcdef" in stale and "differs from the current" in stale
    gone = (site / "tasks" / "gone.html").read_text()
    assert 'id="rank-table"' not in gone
    assert "orphan" in gone and "gone.yaml no longer exists" in gone
    assert (site / "submissions" / "t" / "old.html").exists()  # still browsable


def test_train_split_iqm_is_shown(env):
    add(env, "r", iqm=0.4, iqm_ci=(0.35, 0.45))
    add(env, "r", random_scores(np.random.default_rng(1), 0.8), split="train", iqm=0.81,
        iqm_ci=(0.78, 0.84))
    add(env, "s", iqm=0.3, iqm_ci=(0.2, 0.35))
    rows = {r["name"]: r for r in rank_rows((env["build"]() / "tasks" / "t.html").read_text())}
    assert rows["r"]["train_iqm"] == ("0.810 [0.780, 0.840]", "0.81")
    assert rows["s"]["train_iqm"] == (DASH, "")


def test_malformed_records_are_listed_and_never_break_the_build(env):
    add(env, "good")
    folder = env["results"] / "t"
    (folder / "broken.json").write_text("{not json")
    (folder / "alien.json").write_text(json.dumps({"kind": "something else"}))
    _, rec = add(env, "weird")
    rec["runs"] = [{"env": 3, "seed": [1], "status": "ok", "score": "high",
                    "curve": {"steps": "x", "returns": [[1], {}]}}, "not a run",
                   {"env": ENVS[0][0], "seed": 0, "status": "ok", "score": 0.2,
                    "curve": {"steps": [1, 2, "3"], "returns": [None, "4", 5, 6]}}]
    rec["envs"] = ["nope", {"name": ENVS[0][0], "random": "x"}]
    rec["submission"] = {"name": "weird", "authors": "Just One", "disclosure": "none",
                         "paper": 5, "version": {"major": 1}}
    rec["provenance"] = {"created": "yesterday", "device": "gpu", "libraries": [1]}
    rec["check"] = {"checks": "none", "mirror_valid": "maybe"}
    write_record(env["results"], "weird", rec)
    _, rec = add(env, "noiqm")
    rec["aggregates"] = {"iqm": {"point": "0.9"}}
    write_record(env["results"], "noiqm", rec)
    _, rec = add(env, "empty")
    rec["runs"], rec["envs"] = [], []
    write_record(env["results"], "empty", rec)
    site = env["build"]()
    page = (site / "tasks" / "t.html").read_text()
    # weird's runs are mostly unreadable, so its stored IQM is not theirs: listed, not ranked
    assert sorted(r["name"] for r in rank_rows(page)) == ["good"]
    stale = re.search(r'<table id="stale-table">(.*?)</table>', page, re.S).group(1)
    for text in ("broken.json", "not valid JSON", "alien.json", "missing key",
                 "no IQM aggregate", "has no runs", "is not the IQM of its runs"):
        assert text in stale
    assert "Just One" in (site / "submissions" / "t" / "weird.html").read_text()


def test_a_stored_iqm_that_is_not_its_runs_iqm_is_not_ranked(env):
    # A hand-edited record (or one from a harness that dropped its failures) claims an IQM
    # its runs do not give; the site ranks by the stored interval, so it refuses to rank it.
    add(env, "honest", iqm=0.5, iqm_ci=(0.45, 0.55))
    _, rec = add(env, "boastful", iqm=0.3, iqm_ci=(0.25, 0.35))
    rec["aggregates"]["iqm"] = {"point": 0.95, "lo": 0.9, "hi": 0.99}
    write_record(env["results"], "boastful", rec)
    page = (env["build"]() / "tasks" / "t.html").read_text()
    assert [r["name"] for r in rank_rows(page)] == ["honest"]
    stale = re.search(r'<table id="stale-table">(.*?)</table>', page, re.S).group(1)
    assert "boastful" in stale and "stored IQM 0.95 is not the IQM of its runs (0.3)" in stale


@pytest.mark.parametrize("name, label", [("mean", "mean"), ("median", "median"),
                                         ("optimality_gap", "optimality gap")])
def test_every_stored_point_aggregate_must_be_its_runs(env, name, label):
    # Not only the IQM: a record that boasts a better mean (or median, or gap) than its runs
    # give is listed, not ranked, whichever aggregate the task ranks by.
    add(env, "honest")
    _, rec = add(env, "boastful")
    true = rec["aggregates"][name]["point"]
    rec["aggregates"][name]["point"] = true + 1e-6
    write_record(env["results"], "boastful", rec)
    view = model.analyse_task("t", env["results"], env["tasks"], reps=20, seed=0)
    assert [e.name for e in view.ranked] == ["honest"]
    (stale,) = view.stale
    assert stale.stale.startswith(f"the record's stored {label} ")
    assert f"is not the {label} of its runs" in stale.stale
    stored, runs = re.findall(r"[-\d.e]+(?=\)|\s+is)", stale.stale)[-2:]
    assert float(stored) == pytest.approx(true + 1e-6, abs=1e-7)
    assert float(runs) == pytest.approx(true, abs=1e-7) and stored != runs


# --- signatures -------------------------------------------------------------------------------


def _badge(page: str, name: str) -> tuple[str, str]:
    """(text, tooltip) of the verified column's badge in ``name``'s rank row."""
    row = re.search(rf'data-submission="{re.escape(name)}">(.*?)</tr>', page, re.S).group(1)
    title, text = re.findall(r'<span class="badge (?:verified|self)" title="([^"]*)">([^<]*)'
                             r'</span>', row)[-1]
    return text, html.unescape(title)


def test_verified_means_signed_by_a_trusted_key(env):
    add(env, "signed", verified=True)
    add(env, "unsigned")
    _, rec = add(env, "claims", verified=True)
    rec = {k: v for k, v in rec.items() if k != "signature"}
    rec["verified"] = True  # the old self-asserted flag counts for nothing
    write_record(env["results"], "claims", rec)
    site = env["build"]()
    page = (site / "tasks" / "t.html").read_text()
    assert sorted(r["name"] for r in rank_rows(page)) == ["claims", "signed", "unsigned"]
    assert _badge(page, "signed") == ("verified", "scored by metabench submit and signed by "
                                                  "test-machine.pub")
    assert _badge(page, "unsigned") == ("self-reported", "not vouched for: no signature")
    assert _badge(page, "claims") == ("self-reported", "not vouched for: no signature")
    sub_page = (site / "submissions" / "t" / "signed.html").read_text()
    assert "signed by test-machine.pub" in sub_page
    # Without the trusted key (another keys folder), nothing is verified.
    (env["root"] / "other-keys").mkdir()
    build_site(env["results"], env["root"] / "site2", env["tasks"], bootstrap_reps=REPS,
               keys_dir=env["root"] / "other-keys")
    page = (env["root"] / "site2" / "tasks" / "t.html").read_text()
    text, title = _badge(page, "signed")
    assert text == "self-reported" and "which leaderboard/keys does not trust" in title


def test_records_scored_under_non_default_numerics_are_told_apart(env, monkeypatch):
    """Two records of one rule that differ only in a setting that changes numerics: the
    provenance says which, and the site marks the one not scored under the defaults."""
    from metabench.harness import origin

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    default = origin.numerics()
    assert default["non_default"] == [] and default["settings"]["XLA_FLAGS"] == ""
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=1")
    flagged = origin.numerics()
    assert flagged["non_default"] == ["XLA_FLAGS"]
    assert flagged["settings"] == {**default["settings"],
                                   "XLA_FLAGS": "--xla_backend_optimization_level=1"}
    scores = random_scores(np.random.default_rng(3), 0.5)
    for name, num in (("at-defaults", default), ("with-flags", flagged)):
        _, rec = add(env, name, scores=scores)
        rec["provenance"]["numerics"] = num
        write_record(env["results"], name, rec)
    page = (env["build"]() / "tasks" / "t.html").read_text()
    rows = {r["name"]: r for r in rank_rows(page)}
    assert "non-default numerics" in rows["with-flags"]["rule"][0]
    assert "non-default numerics" not in rows["at-defaults"]["rule"][0]
    assert 'title="scored under XLA_FLAGS = --xla_backend_optimization_level=1' in page
    sub_page = (env["root"] / "site" / "submissions" / "t" / "with-flags.html").read_text()
    assert "non-default: <code>XLA_FLAGS = --xla_backend_optimization_level=1</code>" in sub_page


def test_a_record_edited_after_signing_is_not_ranked_or_not_verified(env):
    add(env, "honest", verified=True)
    # One run's score changed: its stored aggregates are no longer its runs', so it is listed
    # (not ranked), and its signature no longer matches.
    _, rec = add(env, "edited", verified=True)
    run = next(r for r in rec["runs"] if r["status"] == "ok")
    run["score"] += 0.5
    write_record(env["results"], "edited", rec)
    # The runs and every aggregate changed consistently (a record of other scores carrying
    # the first one's signature): ranked on its own numbers, but self-reported.
    _, signed = add(env, "forged", verified=True)
    _, other = add(env, "forged", random_scores(np.random.default_rng(7), 0.9))
    write_record(env["results"], "forged", {**other, "signature": signed["signature"]})
    view = model.analyse_task("t", env["results"], env["tasks"], reps=20, seed=0)
    by_name = {e.name: e for e in view.entries}
    assert [e.name for e in view.stale] == ["edited"]
    assert re.search(r"stored .* is not the .* of its runs", by_name["edited"].stale)
    for name in ("edited", "forged"):
        assert by_name[name].verdict == ("self-reported", "signature does not match the record "
                                                          "(edited after signing?)")
    assert by_name["honest"].verified and not by_name["forged"].verified
    page = (env["build"]() / "tasks" / "t.html").read_text()
    assert _badge(page, "forged") == ("self-reported", "not vouched for: signature does not "
                                                       "match the record (edited after signing?)")


def test_signature_fields_and_key_file_names_are_escaped(env):
    evil = '<img src=x onerror="alert(3)">'
    trust_test_key(env["root"] / "keys", name=f"{evil}.pub")
    (env["root"] / "keys" / "test-machine.pub").unlink()
    add(env, "signed", verified=True)
    _, rec = add(env, "hostile")
    rec["signature"] = {"algorithm": "ed25519", "key_id": HOSTILE, "public_key": HOSTILE,
                        "value": HOSTILE}
    write_record(env["results"], "hostile", rec)
    _, rec = add(env, "algorithm")
    rec["signature"] = {"algorithm": HOSTILE}
    write_record(env["results"], "algorithm", rec)
    pages = html_texts(env["build"]())
    for name, text in pages.items():
        assert "<script>alert(1)" not in text and 'onmouseover="' not in text, name
        assert "<img" not in text and 'onerror="' not in text, name
    page = pages["tasks/t.html"]
    assert _badge(page, "signed") == ("verified", f"scored by metabench submit and signed by "
                                                  f"{evil}.pub")
    assert _badge(page, "hostile")[1] == (f"not vouched for: signed by key {HOSTILE[:16]}\u2026, "
                                          "which leaderboard/keys does not trust")
    assert _badge(page, "algorithm")[1] == ("not vouched for: unsupported signature algorithm "
                                            f"{HOSTILE[:16]}\u2026")
    assert "&lt;img src=x onerror=&#34;alert(3)&#34;&gt;.pub" in pages["submissions/t/signed.html"]


def test_a_malformed_trusted_key_file_fails_the_build_naming_it(env):
    add(env, "signed", verified=True)
    (env["root"] / "keys" / "broken.pub").write_text("ed25519 not-base64\n")
    with pytest.raises(ValueError, match=r"keys/broken\.pub: the key is not valid base64"):
        env["build"]()


# --- hostile input ----------------------------------------------------------------------------


def test_every_text_field_is_escaped(env, tmp_path):
    write_site_task(env["tasks"], "t", HOSTILE)  # the task description too
    fp = model._load_spec("t", env["tasks"])[0].fingerprint
    sub = submission_block(HOSTILE, version=HOSTILE, authors=[HOSTILE], affiliation=HOSTILE,
                           family="drift", description=HOSTILE, licence=HOSTILE,
                           paper=HOSTILE, code=HOSTILE, content_hash=HOSTILE,
                           params_sha256=HOSTILE,
                           disclosure={"task": HOSTILE, "train_envs": [HOSTILE],
                                       "env_steps": None, "accelerator_hours": None,
                                       "notes": HOSTILE})
    envs = [(HOSTILE + "A", "gymnax/CartPole-v1", 20.0, 500.0),
            (HOSTILE + "B", "gymnax/Acrobot-v1", -500.0, -80.0)]
    _, rec = add(env, "evil", fp=fp, submission=sub, envs=envs, note=HOSTILE, failed=[(0, 0)])
    rec["runs"][0]["reason"] = HOSTILE
    rec["check"]["checks"][0]["detail"] = HOSTILE
    rec["provenance"]["command"] = HOSTILE
    rec["provenance"]["device"]["kind"] = HOSTILE
    write_record(env["results"], "evil", rec)
    add(env, "plain", fp=fp)
    site = env["build"]()
    pages = html_texts(site)
    assert len(pages) == 4  # index, task page, two submission pages
    for name, text in pages.items():
        assert "<script>alert(1)" not in text, name
        assert 'onmouseover="' not in text, name
    assert ESCAPED in pages["index.html"]  # the description
    task_page = pages["tasks/t.html"]
    assert task_page.count(ESCAPED) >= 5  # name, env names, plots, legend, device
    sub_page = pages[f"submissions/t/{results.slug(HOSTILE)}.html"]
    # name, version, authors, affiliation, description, licence, paper, code, hashes,
    # disclosure task/envs/notes, note, env names, reason, check detail, command, device
    assert sub_page.count(ESCAPED) >= 18
    # our own script is the only one on every page
    assert all(text.count("<script>") == 1 for text in pages.values())


def _full_record(fp) -> dict:
    """A record with every optional block a real one can carry, so that every field the site
    might render holds a string."""
    rec = make_record("t", fp, "full", np.full((3, 2), 0.5), failed=[(0, 0)],
                      submission=submission_block("full", params_sha256="d" * 64), verified=True,
                      note="a note")
    rec["rule"]["kwargs"] = {"clip": "wide", "scale": 2.0}
    rec["provenance"].update({"git_commit": "f" * 40, "git_dirty": False,
                              "libraries": {"jax": "0.10.2", "flax": "0.12"}})
    rec["batch"] = {"members": ["full", "other"], "size": 2}
    rec["merged_from"] = ["shard 1/2", "shard 2/2"]
    rec["check"]["checks"].append({"name": "output_shape", "passed": True, "detail": "(32,)"})
    for e in rec["envs"]:
        e["params"] = {"masspole": "0.3"}
        e["team_return"] = 1.0
    for r in rec["runs"]:
        r["traces"] = {"gamma": {"steps": [2048, 4096], "values": [0.99, 0.98]}}
        if r["status"] == "ok":
            r["team_return"], r["agent_returns"] = 1.0, {"agent_0": 0.5, "agent_1": 0.5}
    return rec


# What must keep its meaning for the record to be ranked (or, in the stale copy, read at all).
STRUCTURAL = {("kind",), ("task", "id"), ("task", "split"), ("task", "fingerprint"),
              ("rule", "family"), ("submission", "family"), ("status",), ("runs", "status")}
# Maps whose keys are data, not schema: their keys are replaced too.
FREE_KEYS = {("rule", "kwargs"), ("provenance", "libraries"), ("envs", "params"),
             ("runs", "traces"), ("runs", "agent_returns")}


def _hostile_copy(rec, markers: dict, keep=STRUCTURAL):
    """``rec`` with each distinct string (free-form keys included) replaced by its own
    hostile marker; a fifth of the markers begin with each of = + - @ (spreadsheet
    formulas)."""
    def marker(text):
        if text not in markers:
            i = len(markers)
            markers[text] = "=+-@"[i % 5 - 1] * (i % 5 > 0) + f'<x-{i} a="b">\''
        return markers[text]

    def walk(x, path):
        if isinstance(x, dict):
            free = path in FREE_KEYS
            return {(marker(k) if free else k): walk(v, path + ("*" if free else k,))
                    for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v, path) for v in x]
        if isinstance(x, str) and path not in keep:
            return marker(x)
        return x

    return walk(rec, ())


def test_every_string_of_a_record_is_escaped_everywhere(env):
    fp = model._load_spec("t", env["tasks"])[0].fingerprint
    markers: dict[str, str] = {}
    ranked = _hostile_copy(_full_record(fp), markers)
    write_record(env["results"], "full", ranked)
    # The same record, its task, split and fingerprint hostile too: listed as stale with the
    # reason, which quotes them.
    stale = _hostile_copy(_full_record(fp), markers, keep={("kind",), ("status",),
                                                           ("runs", "status")})
    results_path = env["results"] / "t" / "stale.json"
    results_path.write_text(json.dumps(stale))
    (env["results"] / "t" / 'bad<x-u a="b">\'.json').write_text("{")  # unreadable, listed
    add(env, "plain")
    site = env["build"]()
    pages = html_texts(site)
    ranked_page = next(v for k, v in pages.items() if k.startswith("submissions/t/")
                       and "x-" in k and "plain" not in k and "stale" not in k)
    assert "rank-table" in pages["tasks/t.html"] and 'id="stale-table"' in pages["tasks/t.html"]
    for name, text in pages.items():
        assert "<x-" not in text, (name, text[text.index("<x-") - 200:text.index("<x-") + 80])
    shown = {i for i in range(len(markers))
             if any(f"&lt;x-{i} " in t for t in pages.values())}
    # The rarely set fields do reach the pages (escaped), so the check above is not vacuous.
    for field in ("wide", "clip", "f" * 40, "gamma", "output_shape", "(32,)", "0.12", "flax",
                  "masspole", "agent_0", "gymnax/Acrobot-v1", "ab" * 32, "d" * 64,
                  "3.11.7", "Linux", "synthetic", "a note"):
        assert int(markers[field].split("x-")[1].split(" ")[0]) in shown, field
    assert ranked_page.count("&lt;x-") >= 25
    assert "bad&lt;x-u" in pages["tasks/t.html"]
    cells = [c for p in (site / "data" / "t").glob("*.csv")
             for row in csv.reader(io.StringIO(p.read_text())) for c in row]
    assert any("x-" in c for c in cells)
    for c in cells:
        if c[:1] in ("=", "+", "-", "@"):
            float(c)  # only numbers may start so; text is quoted with a leading '


def test_templates_put_values_only_in_text_and_quoted_attributes():
    """Autoescaping makes a quoted attribute value safe, not an unquoted one (a space in the
    value would start a new attribute), and ``|safe`` would switch it off: no template does
    either, so the escaping tests above cover every value a template shows."""
    folder = Path(pages.__file__).parent / "templates"
    names = sorted(p.name for p in folder.glob("*.html"))
    assert {"base.html", "index.html", "task.html", "submission.html"} <= set(names)
    for name in names:
        text = re.sub(r"\{%.*?%\}|\{#.*?#\}", "", (folder / name).read_text(), flags=re.S)
        assert "|safe" not in text.replace(" ", ""), name
        for tag in re.findall(r"<[A-Za-z][^<>]*>", text):
            assert "{{" not in re.sub(r'"[^"]*"', "", tag), (name, tag)


def test_only_http_links_become_hrefs(env):
    bad = ["javascript:alert(1)", "JavaScript:alert(1)", " javascript:alert(1)",
           "java\tscript:alert(1)", "data:text/html,<script>alert(1)</script>",
           "vbscript:msgbox(1)", "//evil.example/x", "https://ok.example/a b"]
    for i, url in enumerate(bad):
        add(env, f"bad{i}", submission=submission_block(f"bad{i}", paper=url, code=url))
    add(env, "good", submission=submission_block("good", paper="https://ok.example/paper",
                                                   code="http://ok.example/code?a=1&b=2"))
    pages = html_texts(env["build"]())
    hrefs = [h for text in pages.values() for h in re.findall(r'href="([^"]*)"', text)]
    assert not [h for h in hrefs if re.match(r"\s*[a-z]+:", h, re.I)
                and not h.startswith(("http://", "https://"))]
    assert "https://ok.example/paper" in hrefs
    assert "http://ok.example/code?a=1&amp;b=2" in re.findall(
        r'href="([^"]*)"', pages["submissions/t/good.html"])
    bad0 = pages["submissions/t/bad0.html"]
    assert "javascript:alert(1)" in bad0 and 'href="javascript' not in bad0  # shown as text


def test_hostile_names_cannot_leave_the_site(env):
    root = env["root"]
    names = ["../../../escaped", "..", "/tmp/abs", "a/../../b", ".hidden", "-rf", "x" * 300,
             "CON", "A", "a"]
    for i, name in enumerate(names):
        add(env, name, stem=f"s{i}", submission=submission_block(name))
    (env["results"] / "weird <task>..").mkdir()  # a hostile task folder name, no spec
    add(env, "r", task="weird <task>..")
    before = {p for p in root.rglob("*")}
    site = env["build"]("out/site")
    new = {p for p in root.rglob("*")} - before
    assert new and all(p == site or site in p.parents or p == site.parent for p in new)
    subs = sorted((site / "submissions" / "t").iterdir())
    assert len(subs) == len(names)  # distinct pages, "A" and "a" too
    for p in subs:
        assert p.name.endswith(".html") and not p.name.startswith((".", "-"))
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", p.name) and len(p.name) < 90
    weird = [p for p in (site / "tasks").iterdir() if p.name.startswith("weird")]
    assert len(weird) == 1 and "weird &lt;task&gt;.." in weird[0].read_text()


# --- determinism and the output folder --------------------------------------------------------


def test_build_is_deterministic_and_replaces_old_output(env):
    rng = np.random.default_rng(0)
    add(env, "ppo_clip", random_scores(rng, 0.5))
    for i in range(4):
        add(env, f"r{i}", random_scores(rng, 0.3 + 0.1 * i), failed=[(1, 0)] if i == 2 else ())
    add(env, "r1", random_scores(rng, 0.7), split="train")
    first = site_files(env["build"]("one"))
    second = site_files(env["build"]("two"))
    assert first == second
    assert len(first) > 10
    # rebuilding in place drops the pages of records that are gone
    (env["results"] / "t" / "r3.json").unlink()
    site = env["build"]("one")
    assert not (site / "submissions" / "t" / "r3.html").exists()
    assert (site / "submissions" / "t" / "r2.html").exists()
    assert not [p for p in site.parent.iterdir() if p.name.startswith(".one")]
    # a folder that is not a site is never replaced
    (env["root"] / "mine").mkdir()
    (env["root"] / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError):
        env["build"]("mine")
    assert (env["root"] / "mine" / "thesis.tex").read_text() == "precious"


def test_downloads_csv_and_raw_json(env):
    path, rec = add(env, "=cmd|calc", stem="sneaky", failed=[(2, 1)],
                    submission=submission_block("=cmd|calc"))
    _, train = add(env, "=cmd|calc", random_scores(np.random.default_rng(2), 0.7), stem="sneaky",
                   split="train", submission=submission_block("=cmd|calc"))
    site = env["build"]()
    data = sorted((site / "data" / "t").iterdir())
    slug = results.slug("=cmd|calc")
    assert [p.name for p in data] == [f"{slug}.csv", f"{slug}.json", f"{slug}.train.json"]
    assert (site / "data" / "t" / f"{slug}.json").read_bytes() == path.read_bytes()
    rows = list(csv.DictReader(io.StringIO((site / "data" / "t" / f"{slug}.csv").read_text())))
    assert list(rows[0]) == ["task", "submission", "split", "env", "seed", "status", "reason",
                             "final_return", "score"]
    assert len(rows) == len(rec["runs"]) + len(train["runs"])
    assert {r["split"] for r in rows} == {"test", "train"}
    assert all(r["submission"] == "'=cmd|calc" for r in rows)  # not a spreadsheet formula
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["reason"] == "non-finite loss at update 3"
    assert failed[0]["score"] == "" and failed[0]["env"] == ENVS[1][0]
    for r, run in zip(rows, rec["runs"]):
        assert (r["env"], int(r["seed"])) == (run["env"], run["seed"])
        if run["score"] is not None:
            assert float(r["score"]) == run["score"]
            assert float(r["final_return"]) == run["final_return"]
    page = (site / "submissions" / "t" / f"{slug}.html").read_text()
    assert f'href="../../data/t/{slug}.csv"' in page and f'href="../../data/t/{slug}.json"' in page


def test_index_lists_every_task(env):
    fp2 = write_site_task(env["tasks"], "second", "the other task")
    write_site_task(env["tasks"], "empty", "a task nobody has tried")
    for i, (name, iqm) in enumerate([("w", 0.2), ("x", 0.9), ("y", 0.5), ("z", 0.7)]):
        add(env, name, iqm=iqm, iqm_ci=(iqm - 0.01, iqm + 0.01),
            created=f"2026-10-0{i + 1}T08:00:00+00:00")
    add(env, "solo", task="second", fp=fp2, created="2026-10-09T23:30:00-02:00")
    index = (env["build"]() / "index.html").read_text()
    for task, desc in (("t", "the test task"), ("second", "the other task"),
                       ("empty", "a task nobody has tried")):
        assert f'href="tasks/{task}.html"' in index and desc in index
    row = re.search(r'href="tasks/t.html".*?</tr>', index, re.S).group(0)
    top = re.findall(r'href="submissions/t/([^"]+)\.html"', row)
    assert top == ["x", "z", "y"]  # top 3 by IQM, w left out
    assert "4 ranked / 4 total" in row
    assert "2026-10-10T01:30:00+00:00" in index  # the latest record, in UTC
    assert "0.1.0" in index and "no ranked results" in index


# --- curves and profiles ----------------------------------------------------------------------


def test_learning_curve_iqm_skips_null_points():
    rec = make_record("t", "x", "r", np.full((4, 2), 0.5), curve_points=5)
    rec["runs"][1]["curve"]["returns"][3] = None
    steps, mat = model.curve_matrix(rec, ENVS[0][0])
    assert steps.tolist() == rec["runs"][0]["curve"]["steps"]
    iqm = scoring.nan_iqm(mat)
    assert np.isnan(iqm[0])  # every run's first bucket is null
    for t in range(1, 5):
        col = mat[:, t][np.isfinite(mat[:, t])]
        assert iqm[t] == pytest.approx(scipy.stats.trim_mean(col, 0.25))
    assert np.isfinite(mat[:, 3]).sum() == 3


def test_lone_points_get_a_dot_and_markers_dot_every_point():
    """A one-point polyline draws nothing; such a point (here between two nulls) is drawn as
    a dot, and ``markers`` dots every point of a series."""
    lone = svg.Series("a", "#111", np.arange(3.0), np.array([np.nan, 1.0, np.nan]))
    line = svg.Series("b", "#222", np.arange(3.0), np.array([0.0, 1.0, 2.0]))
    page = svg.svg_lines("t", [lone, line], "x", "y")
    assert page.count("<circle") == 1 and 'fill="#111"' in page
    line.markers = True
    page = svg.svg_lines("t", [lone, line], "x", "y")
    assert page.count("<circle") == 4 and page.count('fill="#222"') == 3


def test_performance_profile_point_and_band():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.5, 0.3, (16, 2))
    taus = np.linspace(0, 1.2, 25)
    point, lo, hi = scoring.performance_profile(scores, taus, 500, np.random.default_rng(1))
    brute = np.array([np.mean([(scores[:, j] > t).mean() for j in range(2)]) for t in taus])
    np.testing.assert_allclose(point, brute)
    assert np.all(lo <= point + 1e-12) and np.all(point <= hi + 1e-12)
    assert np.all(np.diff(point) <= 0) and np.all(np.diff(hi) <= 1e-12)
    assert np.any(hi - lo > 0.1)  # a real band, not a line


# --- the acceptance budget --------------------------------------------------------------------


def test_build_20_submissions_x_3_tasks_under_15s(tmp_path):
    # The acceptance budget is 50 x 3 in 30 s; the build is linear in records, so 20 x 3 in
    # 15 s (40% of the records, half the time: room for fixed costs) guards the same rate.
    results, tasks = make_bench_set(tmp_path, n_subs=20, n_tasks=3, seeds=16, train_every=2)
    start = time.perf_counter()
    index = build_site(results, tmp_path / "site", tasks)  # default 2000 bootstrap reps
    elapsed = time.perf_counter() - start
    print(f"built 20 submissions x 3 tasks in {elapsed:.2f}s")
    site = index.parent
    assert len(list(site.glob("submissions/*/*.html"))) == 60
    assert len(list(site.glob("data/*/*.train.json"))) == 30
    for t in range(3):
        assert len(rank_rows((site / "tasks" / f"bench-{t}.html").read_text())) == 20
    assert elapsed < 15, f"building took {elapsed:.1f}s"


def test_the_site_scores_failed_runs_at_the_floor_below_every_completed_run(env):
    # Seed 0 of env 0 fails; seed 1 trained far below random (-2.5, clipped) and seed 2 a
    # little below (-0.4). The failure must not outrank either completed run.
    scores = np.array([[0.8, 0.5], [-2.5, 0.6], [-0.4, 0.7]])
    _, rec = add(env, "mixed", scores, failed=[(0, 0)])
    envs, mat = model.score_matrix(rec)
    assert envs == [e[0] for e in ENVS]
    np.testing.assert_allclose(mat[:, 0], [-1.0, -1.0, -0.4])
    np.testing.assert_allclose(mat[:, 1], [0.5, 0.6, 0.7])
    mean_score, _ = model.env_means(rec, ENVS[0][0])
    assert mean_score == pytest.approx((-1.0 - 1.0 - 0.4) / 3)
    assert rec["aggregates"]["mean"]["point"] == pytest.approx(mat.mean())
    # A failed run is floored even when its record still carries a score.
    kept = json.loads(json.dumps(rec))
    next(r for r in kept["runs"] if r["status"] != "ok")["score"] = 0.9
    np.testing.assert_allclose(model.score_matrix(kept)[1], mat)
    # The probability of improvement over the baseline uses the floored cells too: against
    # a baseline at -0.7 everywhere, env 0 wins 1 of 3 pairs (-0.4), env 1 all 3, so
    # (1/3 + 1) / 2. Dropping seed 0 would give (1/2 + 1) / 2; imputing 0, (2/3 + 1) / 2.
    add(env, "ppo_clip", np.full((3, 2), -0.7), submission=submission_block("ppo_clip",
                                                                            baseline=True))
    view = model.analyse_task("t", env["results"], env["tasks"], reps=20, seed=0)
    (mixed,) = [e for e in view.ranked if e.name == "mixed"]
    assert mixed.poi[0] == pytest.approx((1 / 3 + 1) / 2)


def test_building_the_site_from_the_committed_records_loads_no_jax(tmp_path):
    """The site reads records and task files only: a fresh interpreter running the CLI's
    build over every committed record never imports JAX, the envs or the families."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys\n"
        "from metabench import cli\n"
        f"assert cli.main(['leaderboard', 'build', '--results', {str(root / 'leaderboard' / 'results')!r}, "
        f"'--out', {str(tmp_path / 'site')!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', "
        "'optax', 'gymnax', 'brax') or m.startswith(('metabench.envs', 'metabench.families', "
        "'metabench.harness')))\n"
        "assert not heavy, heavy[:10]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "site" / "tasks" / "classic-transfer-v1-quick.html").is_file()
