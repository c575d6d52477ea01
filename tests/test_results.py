"""Result records: atomic writes that never leave half a file, and schema validation."""

from __future__ import annotations

import json

import pytest

from metabench import results


def minimal_record(**over):
    rec = {"kind": results.KIND, "schema": results.SCHEMA, "task": {}, "rule": {},
           "status": "ok", "envs": [], "runs": [], "aggregates": {}, "provenance": {}}
    rec.update(over)
    return rec


def test_roundtrip_and_nan_becomes_null(tmp_path):
    path = tmp_path / "a" / "b.json"
    results.write(path, minimal_record(runs=[{"final_return": float("nan"), "score": 1.5}]))
    back = results.read(path)
    assert back["runs"] == [{"final_return": None, "score": 1.5}]
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    results.write(path, minimal_record(status="ok"))
    before = path.read_text()
    with pytest.raises(TypeError):
        results.write(path, minimal_record(status="ok", envs=[object()]))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_invalid_records_are_named(tmp_path):
    with pytest.raises(results.RecordError, match="missing key.*aggregates"):
        rec = minimal_record()
        del rec["aggregates"]
        results.write(tmp_path / "x.json", rec)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(results.RecordError, match="bad.json: not valid JSON"):
        results.read(bad)
    bad.write_text(json.dumps(minimal_record(schema=99)))
    with pytest.raises(results.RecordError, match="schema 99"):
        results.read(bad)


def test_slug_is_a_safe_bounded_file_name_that_keeps_names_apart():
    import hashlib

    def h(name):
        return hashlib.sha256(name.encode()).hexdigest()[:8]

    assert results.slug("ppo_clip") == "ppo_clip"  # a safe name is its own slug
    assert results.slug("a/b") == f"a_b-{h('a/b')}" != results.slug("a_b")
    assert results.slug("../x") == f"x-{h('../x')}"  # never a path, never hidden
    assert results.slug("") == f"submission-{h('')}"
    assert results.slug("-rf") == f"rf-{h('-rf')}"  # never read as a command-line option
    long = "x" * 300  # safe characters, but too long for a file name
    assert results.slug(long) == "x" * 55 + f"-{h(long)}" and len(results.slug(long)) == 64
    assert results.slug("x" * 64) == "x" * 64
