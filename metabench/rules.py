"""The update-rule abstraction every family shares.

An :class:`UpdateRule` is two pure functions, modelled on optax's ``GradientTransformation``:
``init(rng) -> meta_params`` and ``apply(meta_params, inputs) -> outputs``. Meta-parameters are
always an argument, never a closure, so one compiled train function serves a population of
rules (vmap), a meta-gradient (grad) and closed-form rules alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from metabench.types import PRNGKey, PyTree


class UpdateRule(NamedTuple):
    """``init(rng) -> meta_params``; ``apply(meta_params, inputs) -> outputs``."""

    init: Callable[[PRNGKey], PyTree]
    apply: Callable[[PyTree, Any], Any]


def no_params(_: PRNGKey) -> PyTree:
    """``init`` of a closed-form rule: it has no meta-parameters."""
    return {}


@dataclasses.dataclass(frozen=True)
class RuleInfo:
    """A reference rule as the CLI and the leaderboard see it."""

    name: str
    """Registry name, e.g. ``ppo_clip``."""
    family: str
    """The family whose slot the rule fills."""
    factory: Callable[..., UpdateRule]
    """Builds the rule from keyword arguments (``drift.ppo_clip(epsilon=0.2)``)."""
    description: str
    """One line for ``metabench list rules``."""
    citation: str = ""
    """Where the rule comes from."""
    default_params: Callable[[UpdateRule], tuple[PyTree, str]] | None = None
    """``rule -> (meta_params, note)`` for rules whose parameters are learned; the note says
    where they came from (a shipped file, or an honest "untrained initialisation")."""
    control: bool = False
    """A control, not a contender: the rule gives the agent no learning signal, so its score
    is what a task awards an agent that cannot learn. Every family has one
    (``null_<family>``); the leaderboard lists controls below every contender."""


def params_hash(meta_params: PyTree) -> str:
    """sha256 over the tree structure, dtypes, shapes and bytes of every leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(meta_params)
    return leaves_hash(str(treedef), leaves)


def leaves_hash(treedef: str, leaves) -> str:
    """:func:`params_hash` of a tree given as its structure's text and its leaves (how an
    exported rule's meta-parameters reach the scorer)."""
    h = hashlib.sha256()
    h.update(treedef.encode())
    for leaf in leaves:
        arr = np.asarray(leaf)
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def tree_structure(meta_params: PyTree) -> tuple:
    """Hashable structure (treedef, shapes, dtypes): rules sharing it share a compiled call."""
    leaves, treedef = jax.tree_util.tree_flatten(meta_params)
    return (str(treedef), tuple((np.shape(x), str(np.asarray(x).dtype)) for x in leaves))
