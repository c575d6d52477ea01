"""What every discovery method shares: checkpoints and the submission folder it writes.

Checkpoints hold any pytree as the leaves of one ``.npz``, written atomically. The tree's
structure is not stored: a run rebuilds a fresh state of the same shape and :func:`load_tree`
fills it, which keeps the file free of pickles.

A run appends one ``curve.jsonl`` row per step but checkpoints only every few steps, so a run
stopped between checkpoints leaves rows past its last checkpoint; :func:`reset_curve` rewrites
the file to the checkpoint's rows when a run (re)starts, so that a resumed run holds each step
exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from metabench.params_io import save_params
from metabench.results import write_json_atomic
from metabench.tasks.spec import TaskSpec


def save_tree(path: Path, tree: Any) -> None:
    # Leaves in flattening order; the structure comes from a freshly built tree on load.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, *[np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))])
    tmp.replace(path)


def load_tree(path: Path, like: Any) -> Any:
    with np.load(path, allow_pickle=False) as z:
        leaves = [jnp.asarray(z[f"arr_{i}"]) for i in range(len(z.files))]
    treedef = jax.tree_util.tree_structure(like)
    if treedef.num_leaves != len(leaves):
        raise ValueError(f"{path} does not match this run's state")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def reset_curve(path: Path, rows: list[dict]) -> None:
    """Rewrites ``curve.jsonl`` at ``path`` to hold exactly ``rows`` (the resumed checkpoint's
    curve, or none for a fresh run), atomically: rows a stopped run wrote after its last
    checkpoint are dropped here and written again by the resumed run, never twice."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tmp.replace(path)


class Checkpoint:
    """``checkpoint.npz`` (the state's leaves) and ``checkpoint.json`` (the config, the task
    fingerprint, how far the run got under ``counter``, its curve and anything else the
    method keeps) in a run's folder. A checkpoint is resumed only when it is from the same
    config (its length, ``length_key``, aside: a run may be extended), the same task version,
    and not past the requested length."""

    def __init__(self, out_dir: Path, config: dict, fingerprint: str, counter: str,
                 length_key: str, label: str):
        self.json, self.npz = out_dir / "checkpoint.json", out_dir / "checkpoint.npz"
        self.config, self.fingerprint = config, fingerprint
        self.counter, self.length_key, self.label = counter, length_key, label

    def resume(self, like: Any, length: int, log) -> tuple[Any, dict] | None:
        """``(state, meta)`` from a compatible checkpoint (``state`` shaped as ``like``), or
        None: no checkpoint, or one that is ignored (said in ``log``)."""
        if not (self.json.exists() and self.npz.exists()):
            return None
        meta = json.loads(self.json.read_text())

        def config(c: dict) -> dict:
            return {k: v for k, v in c.items() if k != self.length_key}

        if (config(meta["config"]) == config(self.config) and meta["task"] == self.fingerprint
                and meta[self.counter] <= length):
            state = load_tree(self.npz, like)
            log(f"resuming from {self.label} {meta[self.counter]} ({self.json})")
            return state, meta
        log(f"ignoring {self.json}: it is from another config or task version")
        return None

    def save(self, state: Any, done: int, **extra: Any) -> None:
        save_tree(self.npz, state)
        write_json_atomic(self.json, {"config": self.config, "task": self.fingerprint,
                                      self.counter: done, **extra})


def write_submission(folder: Path, *, name: str, family: str, rule: dict, description: str,
                     task: TaskSpec, summary: dict, author: str, notes: str, paper: str = "",
                     params: Any = None) -> Path:
    """A ready submission found by a discovery method: ``submission.yaml`` with ``rule`` (and
    ``params.npz`` when ``params`` is given), the disclosure filled in from ``summary``
    (task, train envs, env steps, device hours) and ``discovery.json`` (``summary``: config,
    budget, command, curve) beside it. ``notes`` opens the disclosure's notes."""
    folder.mkdir(parents=True, exist_ok=True)
    device = summary["provenance"]["device"]
    sub = {"name": name, "version": "1.0", "authors": [author], "affiliation": "",
           "family": family, "description": description, "paper": paper,
           "licence": "Apache-2.0", "rule": rule}
    if params is not None:
        sha = save_params(folder / "params.npz", jax.device_get(params))
        sub["params"] = {"file": "params.npz", "sha256": sha}
    sub["disclosure"] = {
        "task": task.id,
        "train_envs": [e.env for e in task.split("train")],
        "env_steps": int(summary["env_steps"]),
        "accelerator_hours": round(summary["wall_s"] / 3600 * device["count"], 4),
        "notes": (f"{notes} Device hours on {device['platform']} ({device['kind']}). Config, "
                  "budget, command and curve in discovery.json."),
    }
    (folder / "submission.yaml").write_text(yaml.safe_dump(sub, sort_keys=False,
                                                           allow_unicode=True))
    write_json_atomic(folder / "discovery.json", summary)
    return folder
