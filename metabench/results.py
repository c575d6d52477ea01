"""The result record: one JSON document per (rule, task, split), written atomically.

Schema (``schema: 1``)::

    kind, schema, task {id, fingerprint, split, total_timesteps, seeds},
    rule {name, family, factory, kwargs, params_hash, note},
    status ("ok" | "partial" | "failed"),
    envs [{name, env, params, random, reference, seeds, updates, compile_s, run_s,
           env_steps_per_s, host_peak_rss_mb, device_peak_mb, mean_return, mean_score}],
    runs [{env, seed, status, reason, final_return, score, curve {steps, returns},
           traces {name: {steps, values}} (optional: families that adapt meta-parameters)}],
    aggregates {iqm|mean|median|optimality_gap: {point, lo, hi}},
    probability_of_improvement {baseline, point, lo, hi} | null,
    provenance {metabench, created, command, device, platform, python, libraries, git_commit,
                git_dirty}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

SCHEMA = 1
KIND = "metabench.result"
REQUIRED = ("kind", "schema", "task", "rule", "status", "envs", "runs", "aggregates",
            "provenance")



SLUG_MAX = 64
"""The longest slug: file names stay far below the filesystems' 255 bytes, with room for
suffixes (``.train.json``, ``.shard-1-of-4``)."""


def slug(name: str) -> str:
    """The file-name-safe form of a name (never a path), used for record files and for the
    site's pages alike: characters outside ``[A-Za-z0-9_.-]`` become ``_``, dots, dashes and
    underscores at either end go (no hidden file, no name read as an option), and a name
    that had to change (or was longer than :data:`SLUG_MAX`) is cut and gets a short hash of
    the original, so that distinct names stay distinct."""
    s = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._-") or "submission"
    if s != name or len(s) > SLUG_MAX:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        s = f"{s[:SLUG_MAX - 9]}-{digest}"
    return s


class RecordError(ValueError):
    """A result file that is not a valid record; names the file and the problem."""


def _clean(x: Any) -> Any:
    # JSON has no NaN/inf: non-finite numbers are stored as null.
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return _clean(x.item())
    return x


def as_written(data: Any) -> Any:
    """``data`` as :func:`write_json_atomic` stores it and :func:`read` gives it back (tuples
    as lists, numpy scalars as numbers, non-finite numbers as null): what a signature must
    cover, since it is checked against the file, not the object that was written."""
    return json.loads(json.dumps(_clean(data), allow_nan=False))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Writes JSON to a temporary file in the same folder, fsyncs, then renames over ``path``:
    readers see the old file or the new one, never half of one."""
    text = json.dumps(_clean(data), indent=1, sort_keys=True, allow_nan=False) + "\n"
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Writes ``data`` to a temporary file beside ``path`` (created with ``mode`` when given,
    so it is never readable more widely, even briefly), then renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def validate(record: Any, source: str = "<record>") -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"{source}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"{source}: missing key(s) {', '.join(missing)}")
    if record["kind"] != KIND:
        raise RecordError(f"{source}: kind is {record['kind']!r}, expected {KIND!r}")
    if record["schema"] != SCHEMA:
        raise RecordError(f"{source}: schema {record['schema']!r}; this metabench reads "
                          f"schema {SCHEMA}")
    return record


def read(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None
    return validate(data, str(path))


def write(path: str | os.PathLike, record: dict) -> Path:
    return write_json_atomic(path, validate(record, str(path)))
