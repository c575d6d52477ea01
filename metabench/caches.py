"""Where metabench keeps what it may reuse between runs: one setting for the persistent
compilation cache and the reused check reports beside it (``$METABENCH_COMPILATION_CACHE``:
``0``/``off`` turns both off, a path puts the compiled programs there)."""

from __future__ import annotations

import os

CACHE_ENV = "METABENCH_COMPILATION_CACHE"


def compilation_cache_dir() -> str | None:
    """The compiled programs' folder: ``$METABENCH_COMPILATION_CACHE`` when it is a path,
    else ``$XDG_CACHE_HOME/metabench/xla`` (``~/.cache/metabench/xla``); None when off."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    if setting and setting.lower() not in ("1", "on", "true", "yes"):
        return os.path.expanduser(setting)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "metabench", "xla")
