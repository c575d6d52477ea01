"""Checkpoints of search state: any pytree as the leaves of one ``.npz``, written atomically.

The tree's structure is not stored: a run rebuilds a fresh state of the same shape and
:func:`load_tree` fills it, which keeps the file free of pickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
