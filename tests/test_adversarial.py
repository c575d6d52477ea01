"""Submissions that try to cheat or harm, through the real `check` and `submit` paths on this
machine's kernel (no --unsandboxed): each gets a clear error or its true score, and every
other file is byte-identical afterwards. The sandbox's own limits are tested one by one in
test_sandbox.py; a rule that hangs while traced or while running, NaNs, wrong shapes, bad
parameter files and HTML in text fields are in test_submission.py; hand-edited records in
test_signing.py and test_leaderboard.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metabench import submissions
from metabench.submissions import isolate, sandbox
from test_submission import ONE_ENV_TASK, snapshot, write_sub, yaml_for

# No skip where the kernel cannot sandbox: this suite must pass on the CI machine's kernel
# (tests/test_sandbox.py::test_support_here says why when it cannot).

VALID_RULE = '''
from metabench import UpdateRule

def make_rule():
    return UpdateRule(lambda rng: {}, lambda p, x: x.ratio - 1.0 - x.log_ratio)
'''


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """What a submission must not touch: a results folder with records, a secret file, and a
    listening loopback server (a connection to it is counted)."""
    root = tmp_path_factory.mktemp("victim")
    records = root / "results" / "one"
    records.mkdir(parents=True)
    for name in ("ppo_clip", "dqn"):
        (records / f"{name}.json").write_text(json.dumps({"rule": name, "iqm": 0.5}))
    (root / "secret.txt").write_text("the scorer's secret")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield root, server
    server.close()


def _connections(server: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


LOUD = {
    # What each attempt raises inside the sandbox, as the check reports it.
    "writes_a_record": ("open({records!r} + '/ppo_clip.json', 'w').write('{{}}')",
                        "PermissionError"),
    "writes_tmp": ("open('/tmp/metabench-adversarial-marker', 'w').write('x')",
                   "PermissionError"),
    "reads_a_secret": ("raise ValueError(open({secret!r}).read())", "PermissionError"),
    "reads_the_environment": ("import os\nraise ValueError(os.environ.get("
                              "'METABENCH_TEST_TOKEN', 'no token here'))", "no token here"),
    "connects": ("import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
                 "PermissionError|Network is unreachable"),  # Landlock's TCP rule | netns
    "forks": ("import os\nwhile True:\n    os.fork()", "PermissionError"),
    "allocates_20_gib": ("bytearray(20 * 2**30)", "MemoryError"),
}


@pytest.mark.parametrize("case", sorted(LOUD))
def test_each_harm_at_import_is_refused_with_the_reason(case, victim, tmp_path):
    root, server = victim
    before = snapshot(root)
    attempt, reason = LOUD[case]
    code = attempt.format(records=str(root / "results" / "one"), secret=str(root / "secret.txt"),
                          port=server.getsockname()[1]) + "\n" + VALID_RULE
    folder = write_sub(tmp_path / case, yaml_for(name=case), {"rule.py": code})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METABENCH_TEST_TOKEN", "the scorer's secret")
        res = submissions.check(folder, timeout=60)
    assert not res.ok and any(r in res.message for r in reason.split("|")), res.message
    assert "the scorer's secret" not in res.message
    assert res.sandbox["sandboxed"] is True
    assert snapshot(root) == before and _connections(server) == 0
    assert not Path("/tmp/metabench-adversarial-marker").exists()


QUIET = '''
import os, socket, glob
# Every harm at once, each failure swallowed, then a valid rule: the check passes and
# nothing outside the sandbox changed.
for path in glob.glob({records!r} + "/*.json") + ["/tmp/metabench-adversarial-quiet"]:
    try:
        open(path, "w").write("{{}}")
    except OSError:
        pass
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
except OSError:
    pass
for _ in range(100):
    try:
        if os.fork() == 0:
            os._exit(0)
    except OSError:
        break
try:
    os.kill(os.getppid(), 15)
except OSError:
    pass
'''


def test_a_rule_that_tries_every_harm_quietly_changes_nothing(victim, tmp_path):
    root, server = victim
    before = snapshot(root)
    code = QUIET.format(records=str(root / "results" / "one"),
                        port=server.getsockname()[1]) + VALID_RULE
    folder = write_sub(tmp_path / "quiet", yaml_for(name="quiet"), {"rule.py": code})
    res = submissions.check(folder, timeout=60)
    assert res.ok, res.message
    assert snapshot(root) == before and _connections(server) == 0
    assert not Path("/tmp/metabench-adversarial-quiet").exists()


PATCHER = '''
import metabench.harness as harness
import metabench.harness.records as records

_real = records.env_part

def _cheat(run, window):
    part = _real(run, window)
    for r in part["runs"]:
        r["final_return"], r["score"] = 1e6, 1e6
    return part

records.env_part = harness.env_part = _cheat
''' + VALID_RULE


def test_a_rule_that_patches_metabench_gets_its_true_score(tmp_path):
    """The measured hole: a rule.py that, at import, wrapped the harness so that every run
    reported a return of 1e6 got IQM 1,000,000. The scorer no longer imports it."""
    (tmp_path / "one.yaml").write_text(ONE_ENV_TASK)
    folder = write_sub(tmp_path / "patcher", yaml_for(name="patcher"), {"rule.py": PATCHER})
    res = submissions.submit(folder, str(tmp_path / "one.yaml"),
                             results_dir=tmp_path / "results", log=print)
    assert res.ok and res.record["status"] == "ok", res.message
    finals = [r["final_return"] for r in res.record["runs"]]
    assert all(0 < f <= 500 for f in finals), finals  # CartPole's returns, not 1e6
    assert res.record["aggregates"]["iqm"]["point"] < 1.5
    assert res.record["sandbox"]["sandboxed"] is True


def _alive(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (zombies excluded)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes()
                    and ") Z " not in (proc / "stat").read_text()):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


HANGS_WHEN_RUN = '''
import jax
from metabench import UpdateRule

def apply(p, x):
    start = 0 if x.ratio.shape[0] == 32 else 1  # training's minibatches, not the check's
    never = jax.lax.while_loop(lambda c: c[0] < 1, lambda c: (c[0], c[1] + 1.0), (start, 0.0))
    return x.ratio - 1 - x.log_ratio + 0.0 * never[1]

def make_rule():
    return UpdateRule(lambda r: {}, apply)
'''


def _killed_parent(marker: str, call: str, child_tag: bytes) -> None:
    """Runs ``call`` in a parent process, waits for its child (whose command line, NUL-
    separated as /proc gives it, holds ``child_tag``: the marker is in every path, so the tag
    names the child's own arguments), then SIGKILLs the parent: no handler of metabench's
    runs, only the child's death signal can act."""
    parent = subprocess.Popen([sys.executable, "-c", f"from metabench import submissions; {call}"])
    deadline = time.monotonic() + 120
    while not [p for p in _alive(marker) if p != parent.pid and child_tag in
               Path(f"/proc/{p}/cmdline").read_bytes()]:
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()


@pytest.mark.parametrize("how", ["timeout", "checker_killed", "scorer_killed"])
def test_no_process_outlives_its_limit_or_its_parent(how, tmp_path):
    """A rule that ignores SIGTERM and loops at import, killed at the check's limit or with
    its parent; and a scoring child (the rule's export hangs) whose parent is killed."""
    marker = f"adversarial-loop-{how}-{os.getpid()}"
    code = ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "while True:\n    pass\n")
    if how == "scorer_killed":
        code = HANGS_WHEN_RUN
    folder = write_sub(tmp_path / marker, yaml_for(name="loop"), {"rule.py": code})
    if how == "timeout":
        res = submissions.check(folder, timeout=8)
        assert not res.ok and "did not finish within 8s" in res.message, res.message
    elif how == "checker_killed":
        _killed_parent(marker, f"submissions.check({str(folder)!r}, timeout=600)",
                       b"metabench.submissions\x00_check")
    else:
        (tmp_path / "one.yaml").write_text(ONE_ENV_TASK)
        _killed_parent(marker, f"submissions.submit({str(folder)!r}, "
                       f"{str(tmp_path / 'one.yaml')!r}, "
                       f"results_dir=__import__('pathlib').Path({str(tmp_path / 'r')!r}))",
                       b"metabench.submissions\x00_score")
    deadline = time.monotonic() + 10
    while _alive(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(marker) == []
    assert not (tmp_path / "r").exists()


def test_without_a_sandbox_metabench_refuses_unless_told(tmp_path, monkeypatch):
    folder = write_sub(tmp_path / "kl", yaml_for(), {"rule.py": VALID_RULE})
    monkeypatch.setattr(sandbox, "support",
                        lambda: sandbox.Support(False, "no Landlock on this kernel", 0))
    res = submissions.check(folder, timeout=60)
    assert not res.ok and "cannot sandbox submitted code (no Landlock on this kernel)" in \
        res.message and "--unsandboxed" in res.message
    res = submissions.check(folder, timeout=60, unsandboxed=True)
    assert res.ok, res.message
    assert res.sandbox["sandboxed"] is False and "--unsandboxed" in res.sandbox["reason"]
    assert isolate.build_policy(tmp_path, [], True)[0] is None
    # A reference factory is metabench's own code: checked without the sandbox it lacks.
    policy, info = isolate.build_policy(tmp_path, [], False, own_code=True)
    assert policy is None and "no submitted Python" in info["reason"]
