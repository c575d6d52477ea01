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

NUMERICS_DEFAULTS: dict[str, object] = {
    "XLA_FLAGS": "",
    "jax_enable_x64": False,
    "jax_default_matmul_precision": None,
    "jax_threefry_partitionable": True,
    "jax_default_prng_impl": "threefry2x32",
    "jax_numpy_dtype_promotion": "standard",
}
"""The settings that change a run's numbers, at the values every committed record was
scored under (JAX's own defaults, no XLA flags). ``XLA_FLAGS`` counts whatever it holds:
``--xla_backend_optimization_level=1`` alone moved the quick task's IQM from 0.757 to
0.738, and metabench cannot tell which flags are harmless."""


def numerics() -> dict:
    """This process's numerics-relevant settings and which of them are not the defaults
    (:data:`NUMERICS_DEFAULTS`): two records of one rule that disagree say why."""
    settings: dict[str, object] = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "").strip()}
    for name in NUMERICS_DEFAULTS:
        if name != "XLA_FLAGS":
            value = getattr(jax.config, name, None)
            settings[name] = getattr(value, "value", value)  # enums as their names
    changed = sorted(k for k, v in settings.items() if v != NUMERICS_DEFAULTS[k])
    return {"settings": settings, "non_default": changed}


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
        "numerics": numerics(),
    }
