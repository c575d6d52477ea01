"""Parameter files: reading and writing meta-parameter trees, their signatures, and the
parameters metabench ships for its learned reference rules.

A layer below the families and submissions: it imports neither, so a family can load its
shipped parameters and a submission its own with the same code. JAX and flax are imported
where they are used, so that reading a submission's files loads neither.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

PARAMS_DIR = Path(__file__).resolve().parent / "params"
"""Shipped meta-parameters: ``<rule>.npz`` written by a ``metabench discover`` command, with
``<rule>.discovery.json`` (its config, budget, command and curve) beside it."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_params(path: Path) -> Any:
    """A parameter tree from ``.npz`` (keys are '/'-joined paths) or flax ``.msgpack``."""
    from flax import serialization, traverse_util

    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            flat = {tuple(k.split("/")): np.asarray(z[k]) for k in z.files}
        return traverse_util.unflatten_dict(flat)
    return serialization.msgpack_restore(path.read_bytes())


def save_params(path: Path, tree: Any) -> str:
    """Writes ``tree`` as ``.npz`` (or ``.msgpack``); returns the file's sha256."""
    from flax import serialization, traverse_util

    path = Path(path)
    if path.suffix == ".npz":
        flat = traverse_util.flatten_dict(serialization.to_state_dict(tree), sep="/")
        with open(path, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
    else:
        path.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(tree)))
    return sha256(path)


def tree_signature(tree: Any) -> dict[str, tuple]:
    """``{leaf path: (shape, dtype)}``: two trees fit the same rule when these are equal, and
    the keys name what differs when they are not."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): (tuple(np.shape(x)), str(np.asarray(x).dtype))
            for p, x in flat}


def shipped_params(name: str, rule: Any, untrained: str) -> tuple[Any, str]:
    """``(meta_params, note)`` for a reference rule with learned parameters: the shipped file
    when there is one of the rule's exact structure, else ``rule.init`` and ``untrained``."""
    import jax
    import jax.numpy as jnp

    init = rule.init(jax.random.PRNGKey(0))
    path = PARAMS_DIR / f"{name}.npz"
    if not path.exists():
        return init, untrained
    shipped = load_params(path)
    if tree_signature(shipped) != tree_signature(init):
        return init, f"{untrained} (the shipped {path.name} is for another {name} size)"
    meta = json.loads(path.with_name(f"{name}.discovery.json").read_text())
    command = meta["provenance"]["command"].split(" --")[0]
    return (jax.tree_util.tree_map(jnp.asarray, shipped),
            f"meta-trained by `{command}` on {meta['task']['id']} "
            f"({meta['env_steps']:.3g} env steps; see metabench/params/{name}.discovery.json)")
