"""Session settings and fixtures; helpers live in ``helpers.py``."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Many tests compile the same programs in separate processes (the CLI's and the scoring
# children's): one XLA compilation cache for the session (inherited by the children) compiles
# each once. Set before anything imports jax; a developer's own cache dir is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="metabench-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_cache, "xla")
    atexit.register(shutil.rmtree, _cache, True)
    # Reused check reports go beside it (<cache>-checks), not to the developer's ~/.cache.
    os.environ.setdefault("METABENCH_COMPILATION_CACHE", os.path.join(_cache, "xla"))

from helpers import TINY_TASK, write_task  # noqa: E402 (after the cache is set: it imports jax)


@pytest.fixture(autouse=True, scope="session")
def _no_developer_signing_key(tmp_path_factory):
    """No test signs with the developer's own key (``~/.config/metabench``): by default there
    is no key, and a test that wants one sets ``METABENCH_KEY`` or passes ``key_path``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METABENCH_KEY", str(tmp_path_factory.mktemp("no-key") / "absent.pem"))
        yield


@pytest.fixture
def tiny_task_path(tmp_path) -> Path:
    return write_task(tmp_path, TINY_TASK.format(steps=4096))
