"""The sandbox for processes that import submitted code: each case runs a small payload under a
policy (through the jail, as the scoring children will) and checks that what it must not do
fails the way it should, and that what it needs (scratch, threads, JAX) still works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from metabench.submissions import sandbox
from metabench.submissions.sandbox import Limits, Policy

ROOT = Path(__file__).resolve().parents[1]

PAYLOAD = '''
import os, sys

def fails(exc, fn, *args, **kwargs):
    """The exception ``fn(*args)`` raised, which must be an ``exc``."""
    try:
        fn(*args, **kwargs)
    except exc as e:
        return e
    raise AssertionError(f"{fn.__name__}{args} did not raise {exc.__name__}")

exec(sys.argv[1])
'''


class Box:
    """A submission folder with the payload module, a scratch folder and a folder beside them
    that the sandbox must not reach."""

    def __init__(self, tmp: Path) -> None:
        self.sub, self.scratch, self.outside = tmp / "sub", tmp / "scratch", tmp / "outside"
        for d in (self.sub, self.scratch, self.outside):
            d.mkdir()
        (self.sub / "payload.py").write_text(PAYLOAD)
        self.env = {**os.environ, "PYTHONPATH": str(self.sub)}

    def policy(self, **limits: int) -> Policy:
        return Policy(str(self.scratch), reads=(str(self.sub),), limits=Limits(**limits))

    def run(self, code: str, timeout: float = 30, **limits: int) -> tuple[int | None, str]:
        cmd = sandbox.command(self.policy(**limits), "payload", [textwrap.dedent(code)])
        return sandbox.run(cmd, timeout, env=self.env)

    def ok(self, code: str, **limits: int) -> str:
        """Runs ``code``, which must exit cleanly; returns its stderr."""
        rc, err = self.run(code, **limits)
        assert rc == 0, err
        return err


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` has exited (a zombie that nobody reaped yet counts as exited)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def wait_for(path: Path, within: float = 20.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {within}s")


def test_support_here():
    s = sandbox.support()
    assert s.ok, s.reason
    assert s.landlock_abi == sandbox.landlock_abi() >= 6
    d = sandbox.describe(Policy("/tmp/x"))
    assert d["sandboxed"] and d["network"] == "none (netns + landlock tcp)"
    assert d["limits"] == {"address_space_mb": 8192, "cpu_seconds": 3600,
                           "file_size_mb": 1024, "open_files": 1024}
    json.dumps(d)


def test_applied_single_threaded_before_the_target(box):
    err = box.ok("""
        import json
        record = json.loads(os.environ["METABENCH_SANDBOX"])
        assert record["threads_at_apply"] == 1 and record["sandboxed"], record
        assert "numpy" not in sys.modules and "metabench.submissions" not in sys.modules
        assert os.environ["TMPDIR"] == os.environ["HOME"] == SCRATCH, os.environ["TMPDIR"]
        assert os.environ["XDG_CACHE_HOME"].startswith(SCRATCH)
        assert sys.argv[0].endswith("payload.py") and len(sys.argv) == 2, sys.argv
        print("ran as", __name__, file=sys.stderr)
    """.replace("SCRATCH", repr(str(box.scratch))))
    assert "ran as __main__" in err


def test_apply_refuses_a_multithreaded_process(tmp_path):
    code = f"""
import threading, time, sys
sys.path.insert(0, {str(ROOT)!r})
from metabench.submissions import sandbox
threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
try:
    sandbox.apply(sandbox.Policy({str(tmp_path)!r}), parent=0)
except sandbox.SandboxError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert "threads: apply the sandbox before importing" in out.stdout, out.stderr


def test_filesystem(box):
    secret = box.outside / "secret.txt"
    secret.write_text("secret")
    box.ok(f"""
        scratch, outside, root = {str(box.scratch)!r}, {str(box.outside)!r}, {str(ROOT)!r}
        with open(scratch + "/out.txt", "w") as f:
            f.write("fine")
        assert open(scratch + "/out.txt").read() == "fine"
        os.makedirs(scratch + "/a/b")
        os.rename(scratch + "/out.txt", scratch + "/a/b/moved.txt")
        import tempfile
        with tempfile.NamedTemporaryFile() as t:
            assert t.name.startswith(scratch), t.name
        open("/dev/null", "w").write("x")
        fails(PermissionError, open, outside + "/new.txt", "w")
        fails(PermissionError, open, root + "/sandbox-escape.txt", "w")
        fails(PermissionError, open, root + "/leaderboard/sandbox-escape.txt", "w")
        fails(PermissionError, open, root + "/metabench/sandbox-escape.py", "w")
        fails(PermissionError, open, "/tmp/sandbox-escape.txt", "w")
        fails(PermissionError, open, {str(secret)!r})
        fails(PermissionError, open, root + "/README.md")
        fails(PermissionError, os.listdir, root)
        fails(PermissionError, open, "/etc/shadow")
        for dev in ("/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/kmsg", "/dev/loop0"):
            if os.path.exists(dev):  # raw disks: as root, every file
                fails(PermissionError, open, dev, "rb")
        import metabench
        assert metabench.__file__ == root + "/metabench/__init__.py", metabench.__file__
        assert open(root + "/metabench/submissions/sandbox.py").read()
        assert open({str(box.sub / "payload.py")!r}).read()
    """)
    assert (box.scratch / "a" / "b" / "moved.txt").read_text() == "fine"
    assert not (ROOT / "sandbox-escape.txt").exists()
    assert not list(box.outside.glob("new.txt"))


def test_no_network(box):
    box.ok("""
        import socket
        for host in ("127.0.0.1", "1.1.1.1"):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.settimeout(2)
            fails(OSError, tcp.connect, (host, 80))
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            fails(OSError, udp.sendto, b"x", (host, 53))
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        fails(PermissionError, server.bind, ("127.0.0.1", 0))
    """)


def test_no_new_processes_but_threads(box):
    box.ok("""
        import subprocess, threading
        fails(PermissionError, os.fork)
        fails(PermissionError, subprocess.run, ["true"])
        fails(OSError, os.posix_spawn, "/bin/true", ["true"], {})
        got = []
        t = threading.Thread(target=got.append, args=(1,))
        t.start(); t.join()
        assert got == [1]
    """)


def test_fork_bomb_ends_without_processes(box):
    start = time.monotonic()
    rc, err = box.run("""
        import os
        while True:
            if os.fork() == 0:
                while True:
                    pass
    """, timeout=20)
    assert rc == 1 and "PermissionError" in err, err
    assert time.monotonic() - start < 10


def test_address_space_limit(box):
    box.ok("""
        fails(MemoryError, bytearray, 1 << 30)
        assert len(bytearray(16 << 20)) == 16 << 20
    """, address_space_mb=256)


def test_cpu_limit(box):
    start = time.monotonic()
    rc, err = box.run("while True: pass", timeout=30, cpu_seconds=1)
    assert rc in (-signal.SIGXCPU, -signal.SIGKILL), (rc, err)
    # a process that ignores SIGXCPU meets the hard limit (SIGKILL) a second later
    rc, err = box.run("""
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        while True: pass
    """, timeout=30, cpu_seconds=1)
    assert rc == -signal.SIGKILL, (rc, err)
    assert time.monotonic() - start < 15


def test_file_size_limit(box):
    box.ok(f"""
        f = open({str(box.scratch / "big")!r}, "wb")
        fails(OSError, f.write, b"x" * (2 << 20))
    """, file_size_mb=1)


PID_AND_HANG = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(SCRATCH + "/pid", "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(0.01)
"""


def test_timeout_kills_a_child_that_ignores_sigterm(box):
    start = time.monotonic()
    rc, _ = box.run(PID_AND_HANG.replace("SCRATCH", repr(str(box.scratch))), timeout=2)
    assert rc is None
    assert gone(int((box.scratch / "pid").read_text()), within=1)
    assert time.monotonic() - start < 10


PARENT = """
import os, sys
sys.path.insert(0, {root!r})
from metabench.submissions import sandbox
policy = sandbox.Policy({scratch!r}, reads=({sub!r},))
print(sandbox.run(sandbox.command(policy, "payload", [{code!r}]), 60, env={env!r}))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_child_dies_with_its_parent(box, tmp_path, sig):
    code = textwrap.dedent(PID_AND_HANG.replace("SCRATCH", repr(str(box.scratch))))
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(root=str(ROOT), scratch=str(box.scratch), sub=str(box.sub),
                                    code=code, env=box.env))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        child = int(wait_for(box.scratch / "pid"))
        parent.send_signal(sig)
        out, err = parent.communicate(timeout=10)
    finally:
        parent.kill()
    # the parent dies of the signal as it would have without run()'s handlers
    assert parent.returncode == -sig, (parent.returncode, out, err)
    assert gone(child) or kill(child), f"the sandboxed child {child} outlived its parent"


def kill(pid: int) -> bool:
    """Cleans up after a failed test; always False."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return False


UNSANDBOXED_PARENT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from metabench.submissions import sandbox
if {own_handler!r}:
    def handler(sig, frame):
        print("own handler", file=sys.stderr)
    signal.signal(signal.SIGTERM, handler)
cmd = [sys.executable, "-c", {code!r}]
print(sandbox.run(cmd, 60), file=sys.stderr)
assert signal.getsignal(signal.SIGTERM) is (handler if {own_handler!r} else signal.SIG_DFL)
print("returned", file=sys.stderr)
"""


@pytest.mark.parametrize("sig,own_handler", [(signal.SIGTERM, False), (signal.SIGINT, False),
                                             (signal.SIGTERM, True)])
def test_run_kills_the_group_when_its_process_is_signalled(tmp_path, sig, own_handler):
    """Without the sandbox (no death signal): run()'s handlers kill the group, restore the
    old handlers and deliver the signal to them: default ones end the parent, its own runs."""
    pid_file = tmp_path / "pid"
    code = "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" \
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)"
    script = tmp_path / "parent.py"
    script.write_text(UNSANDBOXED_PARENT.format(root=str(ROOT), code=code,
                                                own_handler=own_handler))
    parent = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        child = int(wait_for(pid_file))
        parent.send_signal(sig)
        _, err = parent.communicate(timeout=10)
    finally:
        parent.kill()
    assert gone(child) or kill(child), f"the child {child} outlived run()"
    if own_handler:
        assert parent.returncode == 0 and "own handler" in err and "(None, " in err, err
        assert "returned" in err
    else:
        assert parent.returncode == -sig, (parent.returncode, err)


def test_cannot_signal_outside(box):
    box.ok(f"""
        import signal
        assert os.getppid() == {os.getpid()}
        fails(PermissionError, os.kill, os.getppid(), 0)
        fails(PermissionError, os.kill, os.getppid(), signal.SIGCONT)
        fails(PermissionError, os.kill, 1, 0)
        os.kill(os.getpid(), 0)
    """)


def test_refuses_when_the_parent_is_not_the_expected_one(box):
    cmd = sandbox.command(box.policy(), "payload", ["print('ran', file=sys.stderr)"],
                          parent=1)
    rc, err = sandbox.run(cmd, 30, env=box.env)
    assert rc == sandbox.EXIT_REFUSED and "ran" not in err, err


def test_non_root_probe(tmp_path):
    """The unprivileged path (a user namespace first, then the network namespace): as root,
    the system Python run as nobody; otherwise support() has already taken it."""
    if os.geteuid() != 0:
        assert sandbox.support().ok
        return
    scratch = Path(tempfile.mkdtemp(prefix="metabench-test-probe-"))
    try:
        scratch.chmod(0o777)
        probe = subprocess.run(["/usr/bin/python3", "-I", "-S", sandbox.JAIL, "--probe",
                                str(scratch)], user=65534, group=65534, extra_groups=[],
                               capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(scratch)
    assert probe.returncode == 0, probe.stderr


def test_jax_under_default_limits(box):
    err = box.ok("""
        import numpy as np
        import jax
        assert float(jax.jit(lambda x: x + 1)(1.0)) == 2.0
        assert float(np.linalg.inv(np.eye(3) * 2).sum()) == 1.5
        print("threads", open("/proc/self/status").read().split("Threads:")[1].split()[0],
              file=sys.stderr)
    """)
    assert "threads" in err


def test_rights_and_layouts_of_every_abi(tmp_path):
    """The rights per ABI (13, then REFER, TRUNCATE, IOCTL_DEV), and rulesets in the layout of
    each older ABI: this kernel accepts them, so all of them are stacked in one child here."""
    counts = {abi: bin(sandbox._fs_rights(abi)).count("1") for abi in range(1, 8)}
    assert counts == {1: 13, 2: 14, 3: 15, 4: 15, 5: 16, 6: 16, 7: 16}
    assert [len(sandbox._ruleset_attr(abi, False)) for abi in (1, 3, 4, 5, 6, 7)] == \
        [8, 8, 16, 16, 24, 24]
    scratch, outside = tmp_path / "scratch", tmp_path / "outside"
    scratch.mkdir(), outside.mkdir()
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from metabench.submissions import sandbox
sandbox._prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
for abi in range(1, sandbox.landlock_abi() + 1):
    sandbox._landlock(sandbox.Policy({str(scratch)!r}), abi)
open({str(scratch / "ok")!r}, "w").write("ok")
try:
    open({str(outside / "no")!r}, "w")
except PermissionError:
    print("denied")
"""
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "denied", out.stderr
    assert (scratch / "ok").read_text() == "ok"
