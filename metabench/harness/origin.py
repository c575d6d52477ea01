"""Where a record came from: the code's version and git commit, the libraries, the machine.

Every record, and every discovery summary, carries this block (``provenance``), so that a
score can be traced to the code and the machine that produced it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

import jax

from metabench import __version__

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "gymnax", "rliable", "numpy")


def provenance(command: str | None = None) -> dict:
    dev = jax.devices()[0]
    libs = {}
    for lib in LIBRARIES:
        try:
            libs[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            libs[lib] = None
    commit, dirty = None, None
    try:
        # The package folder, metabench/ (this module is metabench/harness/origin.py): its
        # code is what a record's scores depend on, and the repository root is above it.
        here = os.path.dirname(os.path.dirname(__file__))
        out = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"],
                             capture_output=True, text=True, cwd=here, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
            # Uncommitted changes to the code or the task specs mean the commit alone does not
            # reproduce the result (result files being rewritten do not count).
            root = os.path.dirname(here)
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", here,
                 os.path.join(root, "pyproject.toml")],
                capture_output=True, text=True, cwd=here, timeout=5)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "metabench": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "device": {"platform": dev.platform, "kind": dev.device_kind,
                   "count": jax.device_count()},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "libraries": libs,
        "git_commit": commit,
        "git_dirty": dirty,
    }
