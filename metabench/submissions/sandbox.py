"""A sandbox for the processes that import submitted Python: Landlock, seccomp, rlimits, netns.

A submission's ``rule.py`` is arbitrary code, and importing it is the only way to build the
rule; so the child process that does it is confined before it imports anything of the
submission's (or anything heavy: see below):

- the filesystem (Landlock): read and execute the Python environment, system libraries and
  the paths the policy names; write only the policy's scratch directory (and ``/dev/null``),
- the network: a fresh, empty network namespace, and on Landlock ABI >= 4 no TCP bind or
  connect either,
- processes: a seccomp filter makes ``fork``, ``vfork`` and ``clone`` without
  ``CLONE_THREAD`` fail with EPERM (threads, which XLA needs, stay allowed); on ABI >= 6 the
  process cannot signal anything outside its own sandbox, its parent included,
- resources: rlimits on address space, CPU time, file size and open files; no core dumps,
- lifetime: it dies with its parent (``PR_SET_PDEATHSIG``), and :func:`run` kills its whole
  process group at a timeout, on an exception or on SIGINT/SIGTERM to the parent.

The child is started as ``python -P sandbox.py POLICY_JSON -- module args...`` (see
:func:`command`): running this file as a script, not ``-m metabench.submissions...``, keeps
``metabench/submissions/__init__.py`` (which imports numpy) from running before the policy is
applied. That matters because ``unshare(CLONE_NEWUSER)`` fails in a multithreaded process, and
numpy's BLAS starts threads on import; :func:`apply` checks that the process is still
single-threaded. This module therefore imports only the standard library.

Callers ask :func:`support` first and refuse (unless told to run unsandboxed) where this
kernel cannot sandbox; :func:`describe` is what a record says was applied.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import importlib.util
import json
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

JAIL = str(Path(__file__).resolve())
"""The script a sandboxed child runs (this file), by path: see the module's docstring."""

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``metabench`` package the child must import: the same tree as its parent's."""

EXIT_REFUSED = 125
"""The jail's exit code when the policy could not be applied (nothing of the target ran)."""

ENV_RECORD = "METABENCH_SANDBOX"
"""Environment variable in which the jail leaves the JSON record of what it applied."""

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of a sandboxed process (rlimits; core dumps are always off)."""

    address_space_mb: int = 8192
    """RLIMIT_AS: virtual memory. XLA and glibc reserve far more than they touch (a thread's
    stack, a malloc arena per thread): ``import jax`` plus a jitted gradient on CPU peaks at
    1.45 GiB of address space with 17 threads on a 2-core machine (at 1 GiB XLA aborts with
    ``std::bad_alloc``), and more cores mean more threads and arenas; 8 GiB leaves room for
    that and for a training run's arrays. Beyond it Python allocations raise MemoryError and
    XLA's abort the process, instead of the machine swapping. (Not for GPUs: CUDA reserves
    more address space than this, and Landlock here allows no GPU device files.)"""

    cpu_seconds: int = 3600
    """RLIMIT_CPU: CPU time of all threads together. At the soft limit the kernel sends
    SIGXCPU (which kills), one second later SIGKILL (for a process that handles SIGXCPU).
    A backstop for the wall-clock timeout of :func:`run`, which is the limit callers tune."""

    file_size_mb: int = 1024
    """RLIMIT_FSIZE: the largest file the process may write (Python ignores SIGXFSZ, so a
    write past it fails with EFBIG instead of killing the process)."""

    open_files: int = 1024
    """RLIMIT_NOFILE: open file descriptors; JAX opens a few dozen shared libraries."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a sandboxed process may touch."""

    scratch: str
    """The only writable directory (created if missing); TMPDIR, HOME and XDG_CACHE_HOME point
    there, so libraries that cache or spill write where they may."""

    reads: tuple[str, ...] = ()
    """Extra readable (and executable) paths: the submission's folder, its output folder's
    inputs. The Python environment, system libraries and the ``metabench`` package directory
    are always readable; the repository around the package (its records) is not."""

    limits: Limits = Limits()
    """Resource limits."""

    network: bool = False
    """Whether the process may use the network; without it it gets an empty network namespace
    and (Landlock ABI >= 4) no TCP bind/connect."""

    def to_dict(self) -> dict[str, Any]:
        return {"scratch": self.scratch, "reads": list(self.reads),
                "limits": dataclasses.asdict(self.limits), "network": self.network}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        return cls(scratch=str(d["scratch"]), reads=tuple(str(p) for p in d.get("reads", ())),
                   limits=Limits(**d.get("limits", {})), network=bool(d.get("network", False)))


class Support(NamedTuple):
    """Whether this machine can sandbox, and if not why."""

    ok: bool
    reason: str
    landlock_abi: int


class SandboxError(RuntimeError):
    """The policy could not be applied; nothing should run unconfined in its place."""


# --- libc through ctypes ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _fail(what: str) -> SandboxError:
    e = ctypes.get_errno()
    return SandboxError(f"{what}: {os.strerror(e)} (errno {e})")


def _syscall(nr: int, *args: int | ctypes.Array | None) -> int:
    """A raw syscall; integers go as longs (the syscall ABI's width), buffers as pointers."""
    conv = [a if isinstance(a, ctypes.Array) else ctypes.c_long(a or 0) for a in args]
    return _libc().syscall(ctypes.c_long(nr), *conv)


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _libc().prctl(option, arg2, arg3, 0, 0)


PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# --- Landlock (include/uapi/linux/landlock.h) ---------------------------------------------

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
"""Every filesystem right an ABI knows (ABI 1: 13 rights; 2 adds REFER, 3 TRUNCATE, 5
IOCTL_DEV); handling a right the kernel does not know is EINVAL."""

FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
"""The rights a rule on a non-directory may carry (others are EINVAL there)."""

READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
WRITE_RIGHTS_EXCLUDED = FS_MAKE_CHAR | FS_MAKE_BLOCK  # device nodes: never, even in scratch

SYSTEM_READS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/proc", "/sys",
                "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
"""System paths readable by every sandboxed process. Not all of ``/dev`` (as root that
would include raw disks, i.e. every file), and not all of ``/etc`` (``/etc/shadow``): only
what the loader, the C library and Python look up (see :data:`ETC_READS`). ``/proc`` is
safe to read whole: Landlock applies to where a ``/proc/PID/root/...`` link resolves, and
another process's memory or environment needs ptrace access, which Landlock denies."""

ETC_READS = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group",
             "nsswitch.conf", "host.conf", "hosts", "gai.conf", "protocols", "services",
             "mime.types", "os-release", "ssl", "ca-certificates", "timezone")


def landlock_abi() -> int:
    """The running kernel's Landlock ABI version, 0 when it has none or it is disabled."""
    if sys.platform != "linux":
        return 0
    abi = _syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(abi), 0)


def _fs_rights(abi: int) -> int:
    return FS_RIGHTS_BY_ABI[max(k for k in FS_RIGHTS_BY_ABI if k <= abi)]


def _ruleset_attr(abi: int, network: bool) -> bytes:
    """``struct landlock_ruleset_attr``, as long as this ABI knows it: handled_access_fs
    (ABI 1), handled_access_net (ABI 4), scoped (ABI 6), each a u64."""
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 and not network else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    fields = 3 if abi >= 6 else 2 if abi >= 4 else 1
    return struct.pack("<QQQ", _fs_rights(abi), net, scoped)[: 8 * fields]


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    """Allows ``rights`` beneath ``path`` (masked to file rights when it is not a directory);
    a path that does not exist is skipped, since there is nothing there to allow."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            rights &= FILE_RIGHTS
        if not rights:
            return  # an empty rule is ENOMSG, and would allow nothing anyway
        # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd
        attr = ctypes.create_string_buffer(struct.pack("<Qi", rights, fd), 12)
        if _syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, attr, 0) < 0:
            raise _fail(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _project_root() -> Path | None:
    """The source tree around the ``metabench`` package when it is one (an editable install
    or a checkout on PYTHONPATH), which must stay unreadable: it holds the records."""
    parent = PACKAGE_DIR.parent
    markers = (".git", "pyproject.toml", "setup.py", "leaderboard")
    return parent if any((parent / m).exists() for m in markers) else None


def read_paths(policy: Policy) -> list[str]:
    """Every path the sandboxed process may read and execute, in this process's view: the
    Python environment (prefixes and existing ``sys.path`` entries, except the working
    directory and anything that contains the project's source tree), the ``metabench``
    package, system paths, and the policy's ``reads``."""
    root = _project_root()
    cwd = Path.cwd().resolve()
    env = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]
    paths = []
    for p in env:
        if not p or not os.path.exists(p):
            continue
        rp = Path(p).resolve()
        if rp == cwd or (root is not None and _is_within(root, rp)):
            continue  # an ancestor of the repository would expose all of it
        paths.append(str(rp))
    paths += [str(PACKAGE_DIR), *SYSTEM_READS, *(f"/etc/{e}" for e in ETC_READS)]
    paths += [str(Path(p).resolve()) for p in policy.reads]
    return list(dict.fromkeys(paths))


def _landlock(policy: Policy, abi: int) -> None:
    """Restricts this process (and what it may exec) to the policy's filesystem and TCP."""
    attr = _ruleset_attr(abi, policy.network)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, buf, len(attr), 0)
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    try:
        handled = _fs_rights(abi)
        for path in read_paths(policy):
            _add_path_rule(ruleset, path, READ_RIGHTS & handled)
        _add_path_rule(ruleset, str(Path(policy.scratch).resolve()),
                       handled & ~WRITE_RIGHTS_EXCLUDED)
        _add_path_rule(ruleset, "/dev/null", (FS_WRITE_FILE | FS_TRUNCATE) & handled)
        if _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) < 0:
            raise _fail("landlock_restrict_self")
    finally:
        os.close(ruleset)


# --- seccomp: no new processes ------------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
CLONE_SYSCALLS = {  # (fork, vfork, clone, clone3); aarch64 has no fork or vfork syscall
    "x86_64": (57, 58, 56, 435),
    "aarch64": (None, None, 220, 435),
}
X32_SYSCALL_BIT = 0x40000000
CLONE_THREAD = 0x00010000

BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K = 0x05 | 0x10, 0x05 | 0x30, 0x05 | 0x40
BPF_RET_K = 0x06
RET_KILL_PROCESS, RET_ALLOW, RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
SECCOMP_MODE_FILTER = 2
DATA_NR, DATA_ARCH, DATA_ARG0 = 0, 4, 16  # offsets in struct seccomp_data (little-endian)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _no_processes_filter(machine: str) -> list[tuple[int, int, int, int]]:
    """The BPF program: on another architecture (i386 compat calls on x86_64 included) kill
    the process, since syscall numbers would mean something else; fork and vfork fail with
    EPERM; clone3 with ENOSYS, so glibc falls back to clone for threads (its flags are behind
    a pointer, which seccomp cannot read); clone fails unless it makes a thread."""
    fork, vfork, clone, clone3 = CLONE_SYSCALLS[machine]
    eperm, enosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    prog = [(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
            (BPF_JEQ_K, 1, 0, AUDIT_ARCH[machine]),
            (BPF_RET_K, 0, 0, RET_KILL_PROCESS),
            (BPF_LD_W_ABS, 0, 0, DATA_NR)]
    if machine == "x86_64":  # x32 calls share the x86_64 arch value: a second clone number
        prog += [(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT), (BPF_RET_K, 0, 0, eperm)]
    prog += [(BPF_JEQ_K, 0, 1, clone3), (BPF_RET_K, 0, 0, enosys)]
    for nr in (fork, vfork):
        if nr is not None:
            prog += [(BPF_JEQ_K, 0, 1, nr), (BPF_RET_K, 0, 0, eperm)]
    prog += [(BPF_JEQ_K, 1, 0, clone), (BPF_RET_K, 0, 0, RET_ALLOW),
             (BPF_LD_W_ABS, 0, 0, DATA_ARG0),  # clone's flags, the low word of args[0]
             (BPF_JSET_K, 0, 1, CLONE_THREAD), (BPF_RET_K, 0, 0, RET_ALLOW),
             (BPF_RET_K, 0, 0, eperm)]
    return prog


def _seccomp() -> None:
    """Installs the no-new-processes filter (no_new_privs must be set already)."""
    machine = platform.machine()
    if machine not in CLONE_SYSCALLS:
        raise SandboxError(f"seccomp filter: unknown architecture {machine}")
    prog = _no_processes_filter(machine)
    filters = (_SockFilter * len(prog))(*(_SockFilter(*ins) for ins in prog))
    fprog = _SockFprog(len(prog), filters)
    if _libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise _fail("prctl(PR_SET_SECCOMP)")


# --- the other parts of applying a policy -------------------------------------------------

def _threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


def _isolate_network() -> None:
    """Moves this process into a new, empty network namespace (only a loopback that is down).
    Root may do that directly; anyone else creates a user namespace first, mapping their own
    ids, which the kernel allows only while the process is single-threaded."""
    libc = _libc()
    if os.geteuid() == 0 and libc.unshare(CLONE_NEWNET) == 0:
        return
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise _fail("unshare(CLONE_NEWUSER | CLONE_NEWNET)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def die_with_parent(parent: int, every: float = 1.0) -> None:
    """:func:`_die_with_parent` for children that are not sandboxed (the scoring process):
    no process of metabench's outlives the one that started it. A watchdog thread also
    checks the parent every ``every`` seconds: a belt to the death signal's braces (an
    orphaned scoring child was once seen after its parent's SIGKILL, cause not found)."""
    _die_with_parent(parent)

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(EXIT_REFUSED)

    threading.Thread(target=watch, name="metabench-parent-watch", daemon=True).start()


def _die_with_parent(parent: int) -> None:
    """Asks for SIGKILL when the parent dies, then checks it has not died already (the
    request would then never fire). Set after the user namespace: a change of credentials
    clears it."""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise _fail("prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(EXIT_REFUSED)


def _set_limits(limits: Limits) -> None:
    import resource  # POSIX only: importing this module must work anywhere (support() says no)

    # CPU: the hard limit a second later is SIGKILL, for a process that handles SIGXCPU
    for res, soft, hard in (
            (resource.RLIMIT_AS, limits.address_space_mb * MB, limits.address_space_mb * MB),
            (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1),
            (resource.RLIMIT_FSIZE, limits.file_size_mb * MB, limits.file_size_mb * MB),
            (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
            (resource.RLIMIT_CORE, 0, 0)):
        old_soft, old_hard = resource.getrlimit(res)
        if old_hard != resource.RLIM_INFINITY:  # never above what we were given
            hard = min(hard, old_hard)
            soft = min(soft, hard)
        resource.setrlimit(res, (soft, hard))


def environ(policy: Policy, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with TMPDIR, HOME and XDG_CACHE_HOME in
    the scratch directory, where the sandboxed process may write."""
    env = dict(os.environ if base is None else base)
    scratch = str(Path(policy.scratch).resolve())
    env.update(TMPDIR=scratch, HOME=scratch, XDG_CACHE_HOME=os.path.join(scratch, ".cache"))
    return env


def apply(policy: Policy, parent: int) -> dict[str, Any]:
    """Confines this process, for good, to ``policy``; ``parent`` is the pid expected to be
    its parent (this process exits when it is not, or when it dies). Must run while the
    process is single-threaded, i.e. before numpy or JAX is imported: a user namespace cannot
    be entered otherwise, and Landlock and seccomp would confine only the calling thread
    (threads started later inherit both). Returns the record of
    what was applied (:func:`describe` plus the thread count at the time)."""
    if sys.platform != "linux":
        raise SandboxError(f"no sandbox on {sys.platform}: it needs Linux (Landlock)")
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError("the kernel has no Landlock (or it is disabled)")
    threads = _threads()
    if threads != 1:
        raise SandboxError(f"the process has {threads} threads: apply the sandbox before "
                           "importing anything that starts threads (numpy, JAX)")
    os.makedirs(policy.scratch, exist_ok=True)
    if not policy.network:
        _isolate_network()
    _die_with_parent(parent)
    os.environ.update(environ(policy, {}))
    _set_limits(policy.limits)
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")
    _landlock(policy, abi)
    _seccomp()
    return {**describe(policy, abi), "threads_at_apply": threads}


# --- what callers use ---------------------------------------------------------------------

def _probe(scratch: str) -> None:
    """The throwaway child of :func:`support`: applies a policy and reports."""
    try:
        apply(Policy(scratch=scratch), parent=os.getppid())
    except (SandboxError, OSError) as e:
        print(e, file=sys.stderr)
        os._exit(1)
    os._exit(0)


@functools.lru_cache(maxsize=None)
def support() -> Support:
    """Whether this machine can sandbox: Linux on x86_64 or aarch64, Landlock, and a policy
    that actually applies (network namespace included) in a throwaway child. Cached."""
    if sys.platform != "linux":
        return Support(False, f"sandboxing needs Linux, not {sys.platform}", 0)
    if platform.machine() not in CLONE_SYSCALLS:
        return Support(False, f"no seccomp filter for {platform.machine()}", 0)
    abi = landlock_abi()
    if abi < 1:
        return Support(False, "the kernel has no Landlock (or it is disabled)", 0)
    try:
        with tempfile.TemporaryDirectory(prefix="metabench-probe-") as tmp:
            probe = subprocess.run([sys.executable, "-I", "-S", JAIL, "--probe", tmp],
                                   timeout=30, stdin=subprocess.DEVNULL, capture_output=True,
                                   text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Support(False, f"the sandbox probe did not run: {e}", abi)
    if probe.returncode != 0:
        why = probe.stderr.strip().splitlines()[-1:] or [f"exit code {probe.returncode}"]
        return Support(False, f"the sandbox could not be applied: {why[0]}", abi)
    return Support(True, f"Linux, Landlock ABI {abi}, network namespaces", abi)


def describe(policy: Policy, abi: int | None = None) -> dict[str, Any]:
    """What sandboxing ``policy`` means on this machine, for a record (JSON-serialisable)."""
    abi = support().landlock_abi if abi is None else abi
    if abi < 1:
        return {"sandboxed": False, "reason": support().reason}
    net = "allowed" if policy.network else (
        "none (netns + landlock tcp)" if abi >= 4 else "none (netns)")
    return {"sandboxed": True, "landlock_abi": abi, "network": net,
            "write": [str(Path(policy.scratch).resolve())],
            "read": sorted(str(Path(p).resolve()) for p in policy.reads),
            "processes": "none (seccomp: fork, vfork, non-thread clone)",
            "signals": "own sandbox only (landlock scope)" if abi >= 6 else "unrestricted",
            "limits": dataclasses.asdict(policy.limits)}


def command(policy: Policy, module: str, args: Sequence[str] = (), *,
            parent: int | None = None) -> list[str]:
    """The argv that runs ``python -m module args...`` under ``policy``, to be started by
    ``parent`` (default: this process) through :func:`run`. ``-P`` keeps this file's
    directory off ``sys.path``, where its siblings would shadow top-level names."""
    spec = {**policy.to_dict(), "parent": os.getpid() if parent is None else parent}
    return [sys.executable, "-P", JAIL, json.dumps(spec), "--", module, *map(str, args)]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Signalled(BaseException):
    def __init__(self, sig: int) -> None:
        super().__init__(sig)
        self.sig = sig


class _GroupKiller:
    """While installed (main thread only), SIGINT or SIGTERM to this process kills the child's
    process group and unwinds :func:`run`, which then restores the old handlers and delivers
    the signal again, so this process still dies or stops as it would have. A signal this
    process ignored is left alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.pending: int | None = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _GroupKiller:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                old = signal.getsignal(sig)
                if old not in (signal.SIG_IGN, None):
                    self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig: int, frame: Any) -> None:
        self.pending = sig
        if self.proc is not None:  # else started() sees it once Popen returns
            _kill_group(self.proc)
            raise _Signalled(sig)

    def started(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        if self.pending is not None:
            _kill_group(proc)
            raise _Signalled(self.pending)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)


def run(cmd: Sequence[str], timeout: float, *, env: dict[str, str] | None = None,
        capture: bool = True) -> tuple[int | None, str]:
    """Runs ``cmd`` (e.g. :func:`command`) in a session and process group of its own; returns
    (its exit code, or None when it was killed at ``timeout``; the tail of its stderr). The
    whole group is killed with SIGKILL (a child that ignores SIGTERM must not survive) at the
    timeout, on any exception here and on SIGINT/SIGTERM to this process, which is then
    delivered again once the child is gone. With ``capture=False`` stderr goes to ours.

    The sandboxed child's death signal fires when the *thread* that started it ends, so call
    this from a thread that outlives the child (it blocks until then anyway), and from the
    process that built ``cmd`` (:func:`command` records it as the expected parent)."""
    killer = _GroupKiller()
    with tempfile.TemporaryFile("w+b") as err:
        try:
            with killer:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL,
                                        stderr=err if capture else None, env=env,
                                        start_new_session=True)
                try:
                    killer.started(proc)
                    code: int | None = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    code = None
                finally:
                    _kill_group(proc)  # at a timeout, and stragglers of an unsandboxed run
                    proc.wait()
        except _Signalled as s:
            if killer.proc is not None:
                killer.proc.wait()  # reap it, had the signal come while waiting for that
            signal.raise_signal(s.sig)  # the old handler is back: die, stop or raise as before
            code = None
        err.seek(0)
        text = err.read().decode(errors="replace")
    return code, text[-4000:]


# --- the jail: this file run as a script --------------------------------------------------

class _PinnedPackage:
    """A meta-path finder for the top-level ``metabench`` package only, at the directory this
    file is in: the repository around it is unreadable in the sandbox (so the path finder,
    which lists a ``sys.path`` entry, could not find the package there), and the child must
    import the same tree as its parent did."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != PACKAGE_DIR.name:
            return None
        return importlib.util.spec_from_file_location(
            fullname, PACKAGE_DIR / "__init__.py", submodule_search_locations=[str(PACKAGE_DIR)])


def _split_argv(argv: Sequence[str]) -> tuple[dict[str, Any], str, list[str]]:
    if len(argv) < 3 or argv[1] != "--":
        raise SandboxError("usage: sandbox.py POLICY_JSON -- module [args...]")
    return json.loads(argv[0]), argv[2], list(argv[3:])


def main(argv: Sequence[str]) -> None:
    """The jail: applies the policy, then runs the module as ``__main__``."""
    import runpy  # stdlib, and only here: it is the jail's alone

    if len(argv) == 2 and argv[0] == "--probe":
        _probe(argv[1])
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]
    try:
        spec, module, args = _split_argv(argv)
        record = apply(Policy.from_dict(spec), parent=int(spec["parent"]))
    except (SandboxError, OSError, ValueError, KeyError, TypeError) as e:
        print(f"sandbox: refused: {e}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    os.environ[ENV_RECORD] = json.dumps(record)
    sys.meta_path.insert(0, _PinnedPackage())
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
