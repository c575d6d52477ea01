"""Submissions: every bad-input class gets a clear message and leaves results intact;
scoring failures become failed records; resubmission, staleness, shards and merge."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import CARTPOLE_SPLITS, trust_test_key
from metabench import params_io, results, signing, submissions
from metabench.tasks import spec
from metabench.submissions import isolate, orchestrate
from metabench.families import drift

ONE_ENV_TASK = """
id: one
total_timesteps: 2048
""" + CARTPOLE_SPLITS + """  - env: gymnax/CartPole-v1
    name: CartPole-heavy-pole
    params: {masspole: 0.3}
    normalise: {random: 22.0, reference: 500.0}
agents:
  drift: {num_envs: 4, rollout_len: 32, epochs: 1, minibatches: 4}
  td_loss: {}
budget: {seeds: 2, max_seconds_per_env: 600}
scoring: {bootstrap_reps: 200, baselines: {drift: ppo_clip, td_loss: dqn}}
"""
# Two families: a record carries its own family's fingerprint, which differs from the
# whole-spec one, so retuning one family's agent leaves the other family's records current.

KL_RULE = '''
import jax.numpy as jnp
from metabench import UpdateRule

def make_rule(scale=1.0):
    def apply(meta_params, x):
        return scale * (x.ratio - 1.0 - x.log_ratio)
    return UpdateRule(lambda rng: {}, apply)
'''


def write_sub(folder: Path, yaml_text: str, files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "submission.yaml").write_text(textwrap.dedent(yaml_text))
    for name, text in (files or {}).items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def yaml_for(name="kl-drift", rule="rule:\n  entry: rule.py:make_rule\n", extra=""):
    return (f"name: {name}\nversion: '1'\nauthors: [A. Researcher]\nfamily: drift\n"
            f"description: the KL-like drift r - 1 - log r\nlicence: MIT\n{rule}"
            f"disclosure: {{task: null, train_envs: [], env_steps: 0, accelerator_hours: 0}}\n"
            f"{extra}")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def task_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "one.yaml").write_text(ONE_ENV_TASK)
    return d / "one.yaml"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, task_path):
    """The KL drift, scored once: (results dir, submission folder, result)."""
    root = tmp_path_factory.mktemp("scored")
    folder = write_sub(root / "kl", yaml_for(), {"rule.py": KL_RULE})
    # The scoring machine's key, found where `metabench submit` looks by default.
    signing.init_key(root / "machine" / "key.pem")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METABENCH_KEY", str(root / "machine" / "key.pem"))
        res = submissions.submit(folder, str(task_path), results_dir=root / "results",
                                 log=print)
    assert res.ok, res.message
    return root / "results", folder, res


def test_external_rule_folder_becomes_a_record(scored, task_path):
    results_dir, folder, res = scored
    rec = results.read(results_dir / "one" / "kl-drift.json")
    machine = trust_test_key(results_dir.parent / "keys",
                             signing.load_private_key(results_dir.parent / "machine" / "key.pem"))
    verdict = signing.verify(rec, signing.trusted_keys(machine.parent))
    assert rec["status"] == "ok" and verdict.verified, verdict.reason
    assert "verified" not in rec and res.record == rec
    assert rec["submission"]["name"] == "kl-drift" and rec["submission"]["authors"] == [
        "A. Researcher"]
    assert rec["submission"]["content_hash"] == submissions.load(folder).content_hash
    assert rec["check"]["passed"] and rec["check"]["mirror_valid"] is True
    assert len(rec["runs"]) == 4 and all(r["status"] == "ok" for r in rec["runs"])
    task = spec.load(task_path)
    assert rec["task"]["fingerprint"] == task.fingerprint("drift") != task.fingerprint()
    assert rec["rule"]["factory"] == "rule.py:make_rule"
    # The phases of its time to a score, which `metabench bench --time-to-score` reports.
    assert set(rec["timing"]) == {"check_s", "start_s", "import_s", "compile_s", "train_s"}
    assert all(v >= 0 for v in rec["timing"].values())
    assert sum(rec["timing"].values()) <= rec["wall_clock_s"] + rec["timing"]["check_s"] + 1
    assert rec["provenance"]["numerics"]["non_default"] == []


def _checked(monkeypatch):
    """Replaces the child-process check with a pass: the checks are tested on their own."""
    monkeypatch.setattr(orchestrate, "check", lambda f, **kw: submissions.CheckResult(
        True, "", {"passed": True}, submissions.load(f)))


def _dead_scoring(monkeypatch):
    """Scoring that 'dies' at once: the record is written (every run failed) without
    training, which is all the staleness tests need."""
    dead = isolate._Cell({}, None, None, None, "", 1.0)
    monkeypatch.setattr(orchestrate, "_score_alone", lambda p, command, backend, address, log:
                        [(set(range(len(p.per_env))), dead)])


def test_resubmitting_unchanged_content_is_a_no_op_unless_forced(scored, task_path,
                                                                  monkeypatch):
    results_dir, folder, _ = scored
    _checked(monkeypatch)
    before = snapshot(results_dir)
    again = submissions.submit(folder, str(task_path), results_dir=results_dir, log=print)
    assert again.ok and "unchanged" in again.message and "--force" in again.message
    assert snapshot(results_dir) == before


def test_retuning_a_family_moves_only_its_stale_record_aside(scored, tmp_path, monkeypatch):
    """Through ``submit``: retuning td_loss leaves the drift record current (no stale/);
    retuning drift moves the old record to stale/<stem>.<old fingerprint>.json with its runs
    as they were, and writes a fresh one; an unreadable record is moved aside as it is."""
    import shutil

    results_dir, folder, res = scored
    copy = tmp_path / "results"
    shutil.copytree(results_dir, copy)
    record = copy / "one" / "kl-drift.json"
    old_bytes, old_fp = record.read_bytes(), res.record["task"]["fingerprint"]
    _checked(monkeypatch)
    _dead_scoring(monkeypatch)
    logged = []

    def submit_with(text):
        path = tmp_path / "one.yaml"
        path.write_text(text)
        return submissions.submit(folder, str(path), results_dir=copy, log=logged.append)

    again = submit_with(ONE_ENV_TASK.replace("td_loss: {}", "td_loss: {lr: 1.0e-3}"))
    assert again.ok and "unchanged" in again.message, again.message
    assert record.read_bytes() == old_bytes and not (copy / "one" / "stale").exists()

    retuned = ONE_ENV_TASK.replace("minibatches: 4}", "minibatches: 2}")
    new_fp = spec.load(write_task_text(tmp_path / "probe", retuned)).fingerprint("drift")
    assert new_fp != old_fp
    moved = submit_with(retuned)
    assert moved.ok and moved.path == record, moved.message
    stale = copy / "one" / "stale" / f"kl-drift.{old_fp}.json"
    assert sorted(p.name for p in stale.parent.iterdir()) == [stale.name]
    old = results.read(stale)
    assert json.dumps(old["runs"], sort_keys=True) == json.dumps(res.record["runs"],
                                                                 sort_keys=True)
    assert old["stale"]["reason"] == f"task fingerprint changed from {old_fp} to {new_fp}"
    assert results.read(record)["task"]["fingerprint"] == new_fp
    assert any(f"moved stale record (fingerprint {old_fp})" in m for m in logged)

    record.write_text("{ not json")
    again = submit_with(retuned)
    assert again.ok and results.read(record)["task"]["fingerprint"] == new_fp
    assert (copy / "one" / "stale" / "kl-drift.unreadable.json").read_text() == "{ not json"

    # A second move to the same name keeps both: a second unreadable record, and the task
    # tuned back and forth (the old fingerprint's record is moved aside twice).
    record.write_text("{ still not json")
    assert submit_with(retuned).ok
    assert (copy / "one" / "stale" / "kl-drift.unreadable.json").read_text() == "{ not json"
    assert (copy / "one" / "stale" / "kl-drift.unreadable.2.json").read_text() == \
        "{ still not json"
    assert submit_with(ONE_ENV_TASK).ok and submit_with(retuned).ok
    assert submit_with(ONE_ENV_TASK).ok and submit_with(retuned).ok
    names = sorted(p.name for p in stale.parent.iterdir())
    assert names == sorted([stale.name, f"kl-drift.{old_fp}.2.json", f"kl-drift.{old_fp}.3.json",
                            f"kl-drift.{new_fp}.json", f"kl-drift.{new_fp}.2.json",
                            "kl-drift.unreadable.json", "kl-drift.unreadable.2.json"]), names
    assert results.read(stale.parent / f"kl-drift.{old_fp}.2.json")["task"]["fingerprint"] \
        == old_fp


def write_task_text(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "one.yaml").write_text(text)
    return folder / "one.yaml"


def test_shards_merge_to_the_unsharded_record(scored, tmp_path, task_path):
    results_dir, folder, res = scored
    shard_dir = tmp_path / "results"
    paths = []
    for i in (1, 2):
        r = submissions.submit(folder, str(task_path), results_dir=shard_dir, shard=(i, 2),
                              log=print)
        assert r.ok and "shards" in str(r.path), r.message
        paths.append(r.path)
    assert sorted(len(results.read(p)["runs"]) for p in paths) == [2, 2]
    # The merged record is a new document: signed by the merging machine's key, whatever
    # signed the shards.
    merger = signing.init_key(tmp_path / "merger.pem")
    merged = submissions.merge(paths, results_dir=shard_dir, task=task_path,
                               key_path=tmp_path / "merger.pem")
    assert merged.ok, merged.message
    trusted = signing.trusted_keys(trust_test_key(tmp_path / "keys", merger).parent)
    assert signing.verify(results.read(merged.path), trusted).verified
    full = res.record
    assert merged.record["runs"] == full["runs"]  # runs carry no timings: equal as they are
    assert merged.record["aggregates"] == full["aggregates"]
    incomplete = submissions.merge(paths[:1], results_dir=shard_dir, task=task_path)
    assert not incomplete.ok and "expected shards 1..2" in incomplete.message


def test_ray_backend_gives_the_in_process_record(scored, tmp_path, task_path, monkeypatch):
    """A local Ray instance on loopback scores each env as its own task; the merged record
    equals the in-process one in everything but timings and provenance."""
    import ray  # part of the test install (the `ray` extra)

    results_dir, folder, res = scored
    # Ray workers import metabench from this checkout, like the child processes do.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    try:
        via_ray = submissions.submit(folder, str(task_path), results_dir=tmp_path / "results",
                                    backend="ray", log=print)
    finally:
        ray.shutdown()
    assert via_ray.ok, via_ray.message
    rec, full = via_ray.record, res.record
    assert rec["runs"] == full["runs"] and rec["aggregates"] == full["aggregates"]
    assert [e["name"] for e in rec["envs"]] == [e["name"] for e in full["envs"]]
    assert rec["rule"] == full["rule"] and rec["status"] == "ok"
    with pytest.raises(ValueError, match="backend must be 'local' or 'ray'"):
        submissions.submit(folder, str(task_path), results_dir=tmp_path / "r2", backend="dask")


def test_shard_cells_cover_everything_once():
    cells = [submissions.shard_seeds(3, 4, (i, 3)) for i in (1, 2, 3)]
    for env in range(3):
        got = sorted(s for c in cells for s in c[env])
        assert got == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="I/N"):
        submissions.parse_shard("3/2")


BAD_RULES = {
    "import_error": ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
    "syntax_error": ("def make_rule(:\n", "SyntaxError"),
    "apply_raises": ("from metabench import UpdateRule\n"
                     "def make_rule():\n"
                     "    def apply(p, x):\n"
                     "        raise RuntimeError('drift exploded')\n"
                     "    return UpdateRule(lambda r: {}, apply)\n", "drift exploded"),
    "nan_output": ("import jax.numpy as jnp\nfrom metabench import UpdateRule\n"
                   "def make_rule():\n"
                   "    return UpdateRule(lambda r: {}, lambda p, x: x.ratio * jnp.nan)\n",
                   "[FAIL] finite"),
    "wrong_shape": ("import jax.numpy as jnp\nfrom metabench import UpdateRule\n"
                    "def make_rule():\n"
                    "    return UpdateRule(lambda r: {}, lambda p, x: jnp.sum(x.ratio))\n",
                    "[FAIL] output_shape"),
    "not_a_rule": ("def make_rule():\n    return 42\n", "UpdateRule(init, apply)"),
    "never_returns": ("from metabench import UpdateRule\n"
                      "def make_rule():\n"
                      "    def apply(p, x):\n"
                      "        while True:\n"
                      "            pass\n"
                      "    return UpdateRule(lambda r: {}, apply)\n", "did not finish within"),
}


SUBMITTED = ("import_error", "nan_output")


@pytest.mark.parametrize("case", sorted(BAD_RULES))
def test_bad_rules_are_refused_with_a_clear_message_and_results_intact(case, scored, tmp_path,
                                                                        task_path):
    results_dir, _, _ = scored
    code, expected = BAD_RULES[case]
    folder = write_sub(tmp_path / case, yaml_for(name=case), {"rule.py": code})
    before = snapshot(results_dir)
    if case == "never_returns":
        # 12 s covers importing and checking a rule; the one that never returns is killed.
        check = submissions.check(folder, timeout=12)
        assert not check.ok and expected in check.message, check.message
        return
    if case in SUBMITTED:
        # The whole path, child process included, for one rule the child reports as an
        # error and one whose conformance report fails.
        res = submissions.submit(folder, str(task_path), results_dir=results_dir, log=print)
        assert not res.ok and expected in res.message, res.message
        assert snapshot(results_dir) == before
        return
    # The rest: what the check's child computes, in this process (one child each saved).
    out = tmp_path / "check.json"
    assert isolate._child_check(json.dumps({"folder": str(folder), "out": str(out)})) == 0
    got = json.loads(out.read_text())
    message = got.get("error") or got["text"]
    assert expected in message and (got.get("error") or not got["report"]["passed"]), got


def test_bad_folders_are_refused_with_file_key_and_expectation(tmp_path, scored, task_path):
    results_dir, _, _ = scored
    before = snapshot(results_dir)
    (tmp_path / "secret.npz").write_bytes(b"x")
    cases = {
        "malformed": ("name: [unclosed", "<yaml>"),
        "unknown_family": (yaml_for().replace("family: drift", "family: dqn"), "family"),
        "unknown_key": (yaml_for(extra="homepage: x\n"), "homepage"),
        "missing_field": (yaml_for().replace("licence: MIT\n", ""), "licence"),
        "traversal_params": (yaml_for(extra="params: {file: ../secret.npz, sha256: "
                                      + "0" * 64 + "}\n"), "params.file"),
        "traversal_entry": (yaml_for(rule="rule:\n  entry: ../rule.py:make_rule\n"),
                            "rule.entry"),
        "absolute_entry": (yaml_for(rule="rule:\n  entry: /etc/passwd.py:make_rule\n"),
                           "rule.entry"),
        "missing_params": (yaml_for(extra="params: {file: p.npz, sha256: " + "0" * 64 + "}\n"),
                           "params.file"),
        "unknown_factory": (yaml_for(rule="rule:\n  factory: ppo_clipped\n"), "rule.factory"),
        "both_entry_kinds": (yaml_for(rule="rule:\n  factory: dpo\n  entry: rule.py:make_rule\n"),
                             "rule"),
    }
    for case, (text, key) in cases.items():
        folder = write_sub(tmp_path / case, text, {"rule.py": KL_RULE})
        with pytest.raises(submissions.SubmissionError) as e:
            submissions.load(folder)
        assert e.value.key == key and str(folder / "submission.yaml") in str(e.value), case
        res = submissions.submit(folder, str(task_path), results_dir=results_dir, log=print)
        assert not res.ok and key in res.message
    assert snapshot(results_dir) == before


def _lpo_folder(tmp_path, params, sha=None):
    folder = tmp_path / "lpo"
    folder.mkdir(parents=True, exist_ok=True)
    digest = params_io.save_params(folder / "params.npz", params)
    write_sub(folder, yaml_for(name="lpo-x", rule="rule:\n  factory: lpo\n",
                               extra=f"params: {{file: params.npz, sha256: {sha or digest}}}\n"))
    return folder


def test_parameters_are_hashed_and_must_match_the_rule_structure(tmp_path):
    rule = drift.lpo()
    good = jax.tree_util.tree_map(lambda x: x + 0.01, rule.init(jax.random.PRNGKey(0)))
    folder = _lpo_folder(tmp_path, good)
    sub = submissions.load(folder)
    ref = submissions.build_rule(sub)
    # Same tree (an empty or partial tree would make a leaf-wise zip vacuous), same values.
    assert jax.tree_util.tree_structure(ref.meta_params) == jax.tree_util.tree_structure(good)
    got = jax.tree_util.tree_leaves(ref.meta_params)
    want = jax.tree_util.tree_leaves(good)
    assert len(got) == len(want) > 0 and ref.note == ""
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a wrong hash is named with the right one
    bad_hash = _lpo_folder(tmp_path / "h", good, sha="a" * 64)
    with pytest.raises(submissions.SubmissionError,
                       match="params.sha256.*the sha256 of params.npz"):
        submissions.load(bad_hash)
    # a tree that is not the rule's init structure fails the check with the path named
    wrong = {"params": {"Dense_0": {"kernel": np.zeros((8, 64), np.float32)}}}
    res = submissions.check(_lpo_folder(tmp_path / "w", wrong), timeout=120)
    assert not res.ok and "params.file" in res.message and "Dense_1" in res.message
    assert "shape (8, 64) float32, expected (8, 128) float32" in res.message


def test_html_in_text_fields_is_loaded_verbatim(tmp_path):
    evil = "<script>alert(1)</script>"
    text = (f"name: '{evil}'\nversion: '{evil}'\nauthors: ['{evil}']\naffiliation: '{evil}'\n"
            f"family: drift\ndescription: '{evil}'\nlicence: '{evil}'\npaper: 'javascript:x'\n"
            f"code: '{evil}'\nrule: {{factory: dpo}}\n"
            f"disclosure: {{task: null, train_envs: ['{evil}'], notes: '{evil}'}}\n")
    sub = submissions.load(write_sub(tmp_path / "evil", text))
    assert sub.name == evil and sub.disclosure.notes == evil
    assert "/" not in sub.slug and "<" not in sub.slug and ".." not in sub.slug
    assert results.slug(evil) != results.slug("_script_alert_1___script_")


SCORING_FAILURES = {
    # Training's minibatches (32) differ from the check's inputs. What fails while the rule
    # is traced for training now fails in the sandboxed check, which exports the rule for the
    # task: a clear refusal, no record. What fails while the exported code runs is a failed
    # record with the reason.
    "raises_when_traced_for_training": (
        "def apply(p, x):\n"
        "    if x.ratio.shape[0] == 32:\n"
        "        raise ValueError('not with batches of 32')\n"
        "    return x.ratio - 1 - x.log_ratio\n", "not with batches of 32", "refused"),
    "oom_when_traced_for_training": (
        "import numpy as np\n"
        "def apply(p, x):\n"
        "    if x.ratio.shape[0] == 32:\n"
        "        np.ones(1 << 44)\n"
        "    return x.ratio - 1 - x.log_ratio\n", "MemoryError", "refused"),
    "hangs_in_training": (
        "import jax\n"
        "def apply(p, x):\n"
        "    start = 0 if x.ratio.shape[0] == 32 else 1\n"
        "    never = jax.lax.while_loop(lambda c: c[0] < 1, lambda c: (c[0], c[1] + 1.0),\n"
        "                               (start, 0.0))\n"
        "    return x.ratio - 1 - x.log_ratio + 0.0 * never[1]\n", "did not finish within",
        "record"),
}


@pytest.mark.parametrize("case", sorted(SCORING_FAILURES))
def test_failures_while_scoring_become_failed_records(case, tmp_path, task_path):
    body, reason, outcome = SCORING_FAILURES[case]
    code = ("from metabench import UpdateRule\n" + body +
            "def make_rule():\n    return UpdateRule(lambda r: {}, apply)\n")
    folder = write_sub(tmp_path / case, yaml_for(name=case), {"rule.py": code})
    res = submissions.submit(folder, str(task_path), results_dir=tmp_path / "results",
                             timeout=25 if case == "hangs_in_training" else None, log=print)
    if outcome == "refused":
        assert not res.ok and reason in res.message and res.record is None, res.message
        assert not (tmp_path / "results").exists()
        return
    assert res.ok and res.record["status"] == "failed", res.message
    assert all(r["status"] == "failed" and reason in r["reason"] for r in res.record["runs"])
    assert res.record["aggregates"]["mean"]["point"] == -1.0  # failures score the floor
    assert json.loads(res.path.read_text())["runs"][0]["reason"]


def test_submitted_folder_becomes_a_ranked_row_on_the_site(scored, task_path, tmp_path):
    from metabench.site.build import build

    results_dir, _, _ = scored
    index = build(results_dir, tmp_path / "site", tasks_dir=task_path.parent)
    page = (index.parent / "tasks" / "one.html").read_text()
    table = page[page.index('id="rank-table"'):]
    assert 'data-submission="kl-drift"' in table


GRAPH_YAML = """
name: reg-0.2
nodes:
  - {id: q_sa, op: select, in: [q_tm1, a_tm1]}
  - {id: next_v, op: max_list, in: [q_target_t]}
  - {id: disc_v, op: multiply, in: [discount_t, next_v]}
  - {id: target, op: add, in: [r_t, disc_v]}
  - {id: delta, op: subtract, in: [q_sa, target]}
  - {id: delta_sq, op: square, in: [delta]}
  - {id: reg, op: multiply, in: [0.2, q_sa]}
  - {id: loss, op: add, in: [delta_sq, reg]}
output: loss
"""


def test_a_loss_graph_is_a_submission_without_python(tmp_path):
    text = yaml_for(name="reg-graph", rule="rule:\n  graph: loss.yaml\n").replace(
        "family: drift", "family: td_loss")
    folder = write_sub(tmp_path / "g", text, {"loss.yaml": GRAPH_YAML})
    res = submissions.check(folder, timeout=120)
    assert res.ok, res.message
    assert "select(q_tm1, a_tm1)" in res.message  # the equation is shown as the rule's note
    ill = GRAPH_YAML.replace("in: [q_sa, target]", "in: [q_tm1, a_tm1]")
    bad = write_sub(tmp_path / "bad", text, {"loss.yaml": ill})
    res = submissions.check(bad, timeout=120)
    assert not res.ok and "'delta'" in res.message and "subtract" in res.message
    drift_graph = write_sub(tmp_path / "d", yaml_for(rule="rule:\n  graph: loss.yaml\n"),
                            {"loss.yaml": GRAPH_YAML})
    with pytest.raises(submissions.SubmissionError, match="rule.graph"):
        submissions.load(drift_graph)


@pytest.fixture(scope="module")
def small_task_path(tmp_path_factory):
    """ONE_ENV_TASK with its one plain test env (half the compiles)."""
    path = tmp_path_factory.mktemp("small") / "small.yaml"
    text = ONE_ENV_TASK.replace("id: one", "id: small")
    path.write_text(text[:text.index("  - env: gymnax/CartPole-v1\n    name: CartPole-heavy")]
                    + text[text.index("agents:"):])
    return path


def test_batch_scores_one_factorys_submissions_in_one_call(tmp_path, small_task_path,
                                                           monkeypatch):
    """Two LPO submissions (shipped and halved parameters) train together, each getting its
    own record; each member's runs are its rule's runs trained alone."""
    from metabench import harness

    ref = harness.reference_rule("lpo")
    half = jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, ref.meta_params)
    lpo = "rule:\n  factory: lpo\n"
    a = write_sub(tmp_path / "a", yaml_for("lpo-a", lpo))
    b = tmp_path / "b"
    b.mkdir()
    digest = params_io.save_params(b / "params.npz", half)
    write_sub(b, yaml_for("lpo-b", lpo, f"params: {{file: params.npz, sha256: {digest}}}\n"))
    assert submissions.batch_key(submissions.load(a)) == submissions.batch_key(submissions.load(b))
    # The checks are tested on their own; here they would only add two child processes.
    monkeypatch.setattr(orchestrate, "check", lambda f, **kw: submissions.CheckResult(
        True, "", {"passed": True}, submissions.load(f)))
    out = submissions.submit_many([a, b], str(small_task_path), batch=True,
                                 results_dir=tmp_path / "results", log=print)
    assert [r.ok for r in out] == [True] * 2, [r.message for r in out]
    ra, rb = (r.record for r in out)
    assert ra["batch"]["members"] == ["lpo-a", "lpo-b"] and rb["batch"] == ra["batch"]
    assert ra["status"] == rb["status"] == "ok" and len(ra["runs"]) == 2
    assert ra["rule"]["params_hash"] != rb["rule"]["params_hash"]
    assert results.read(tmp_path / "results" / "small" / "lpo-b.json")["batch"]["size"] == 2
    task = spec.load(small_task_path)
    for rec, mp in ((ra, ref.meta_params), (rb, half)):
        alone = harness.evaluate(harness.RuleRef("x", "drift", ref.rule, mp), task)
        # Same seeds, same rule: the same runs (bit-identical on the 2-core CPU; vmapping over
        # submissions is allowed to regroup a reduction, hence a tolerance).
        np.testing.assert_allclose([r["final_return"] for r in rec["runs"]],
                                   [r["final_return"] for r in alone["runs"]], rtol=1e-5)


def test_batch_groups_by_key_and_rescores_members_alone_if_it_dies(tmp_path, task_path,
                                                                     monkeypatch):
    lpo = "rule:\n  factory: lpo\n"
    folders = [write_sub(tmp_path / n, yaml_for(n, lpo)) for n in ("p", "q")]
    folders.append(write_sub(tmp_path / "kl", yaml_for(), {"rule.py": KL_RULE}))
    assert submissions.batch_key(submissions.load(folders[2])) is None  # own code: alone
    with pytest.raises(ValueError, match="one batch key"):
        submissions.batched_rule([submissions.load(f) for f in folders])
    # No child processes here: the check passes, the batch dies, scoring alone is recorded.
    monkeypatch.setattr(orchestrate, "check", lambda f, **kw: submissions.CheckResult(
        True, "", {"passed": True}, submissions.load(f)))
    dead = isolate._Cell({}, None, None, None, "", 1.0)
    batches = []
    monkeypatch.setattr(orchestrate, "_score_batch", lambda group, command: (
        batches.append([p.sub.name for p in group]) or [dead] * len(group)))
    alone = []

    def score_alone(p, command, backend, address, log):
        alone.append(p.sub.name)
        return [(set(range(len(p.per_env))), dead)]

    monkeypatch.setattr(orchestrate, "_score_alone", score_alone)
    logged = []
    out = submissions.submit_many(folders, str(task_path), batch=True,
                                 results_dir=tmp_path / "results", log=logged.append)
    assert batches == [["p", "q"]] and alone == ["p", "q", "kl-drift"]
    assert any("scoring each member alone" in m and "wall-clock limit" in m for m in logged)
    # Scored alone (here: killed again), each gets its own failed record and no batch block.
    assert [r.record["submission"]["name"] for r in out] == ["p", "q", "kl-drift"]
    for r in out:
        assert r.record["status"] == "failed" and "batch" not in r.record
        assert all("wall-clock limit" in run["reason"] for run in r.record["runs"])


def test_loss_graph_submissions_batch_through_the_graph_interpreter(tmp_path):
    from metabench.families import td_loss

    text = yaml_for(name="reg-graph", rule="rule:\n  graph: loss.yaml\n").replace(
        "family: drift", "family: td_loss")
    dqn = td_loss.dump_graph(td_loss.library()["dqn"])
    subs = [submissions.load(write_sub(tmp_path / n, text.replace("reg-graph", n),
                                      {"loss.yaml": g}))
            for n, g in (("reg", GRAPH_YAML), ("dqn", dqn))]
    assert submissions.batch_key(subs[0]) == submissions.batch_key(subs[1]) == ("graph", "td_loss")
    refs, rule, batch = submissions.batched_rule(subs)
    # Padded to the larger graph (DQNReg: 8 ops and its inline constant), one row each.
    assert batch.op.shape == (2, len(td_loss.INPUTS) + 9)
    x = td_loss.random_inputs(jax.random.PRNGKey(0), 16, 3)
    for k, ref in enumerate(refs):
        one = jax.tree_util.tree_map(lambda a: a[k], batch)
        np.testing.assert_allclose(rule.apply(one, x), ref.rule.apply(ref.meta_params, x),
                                   rtol=1e-6)


def test_batch_cannot_go_to_ray(tmp_path, task_path, capsys):
    from metabench.cli import main

    folder = write_sub(tmp_path / "a", yaml_for("lpo-a", "rule:\n  factory: lpo\n"))
    assert main(["submit", str(folder), "--task", str(task_path), "--batch", "--backend", "ray",
                 "--results", str(tmp_path / "r")]) == 2
    assert "--batch" in capsys.readouterr().err and not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="backend='local'"):
        submissions.submit_many([folder], str(task_path), batch=True, backend="ray")
