"""Searching the space of loss graphs: functional hashes, mutation and random graphs.

These are the moves of regularised evolution over graphs (Co-Reyes et al. 2021), used by
``metabench discover evolve`` (:mod:`metabench.discover.evolution`): :func:`functional_hash`
spots a child that computes a function already trained, :func:`mutate` changes one op or
rewires one input, and :func:`random_graph` seeds a population. The language searched is
:mod:`metabench.families.td_loss.graph`.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from metabench.families.td_loss.evaluate import compile_graph
from metabench.families.td_loss.graph import (CONSTANTS, INPUTS, NOISE_OPS, OPS, Graph,
                                              GraphError, GraphTypeError, Node, S, Type,
                                              _is_input, accepts, input_node, live_nodes,
                                              node_types, typecheck)

__all__ = ["functional_hash", "mutate", "random_graph"]


# ---------------------------------------------------------------------------- functional hash

HASH_BATCH, HASH_ACTIONS, HASH_SEED, HASH_DIGITS = 64, 4, 2021, 6


@functools.lru_cache(maxsize=1)
def _hash_inputs() -> dict[str, np.ndarray]:
    # Four draws of 16 transitions, concatenated (a rule is per transition, so one call does).
    # Values are small dyadic rationals, on which float32 addition, subtraction and
    # multiplication are exact: a + b + c and c + (b + a) give bitwise equal outputs, so
    # rounding cannot split equal functions across a bucket boundary on those ops.
    rng = np.random.default_rng(HASH_SEED)
    shape = (HASH_BATCH, HASH_ACTIONS)
    q = lambda: (rng.integers(-32, 33, shape) / 8.0).astype(np.float32)  # noqa: E731
    return {
        "q_tm1": q(), "q_t": q(), "q_target_t": q(),
        "a_tm1": rng.integers(0, HASH_ACTIONS, HASH_BATCH).astype(np.int32),
        "r_t": (rng.integers(-8, 9, HASH_BATCH) / 4.0).astype(np.float32),
        "discount_t": rng.choice(np.array([0.0, 0.5, 0.75, 0.875, 0.96875], np.float32),
                                 HASH_BATCH),
    }


def functional_hash(graph: Graph) -> str:
    """sha256 of the compiled rule's outputs on fixed inputs, rounded to 6 significant digits.

    Graphs computing the same function (``a + b`` and ``b + a``, or with dead nodes) get the
    same hash, so evolution can skip re-training them, as Co-Reyes et al. 2021 do.
    Different functions get different hashes unless they agree on all 64 test transitions.
    """
    out = np.asarray(compile_graph(graph).apply({}, _hash_inputs()), np.float64) + 0.0
    text = ",".join(f"{v:.{HASH_DIGITS - 1}e}" for v in out)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------- mutation

_NULLARY_CHOICES = tuple(("const", c) for c in CONSTANTS) + tuple((o, None) for o in NOISE_OPS)
_OP_CHOICES = tuple((name, None) for name in OPS if name not in ("const", *NOISE_OPS)) \
    + _NULLARY_CHOICES


def _fill(rng: np.random.Generator, types: tuple[Type, ...], i: int, ins: tuple[Type, ...],
          keep: tuple[int, ...] = ()) -> tuple[int, ...] | None:
    """Inputs for a node at index ``i`` with input types ``ins``: keep ``keep[k]`` where its
    type fits slot ``k``, else a random earlier node of a fitting type (None if none)."""
    chosen = []
    for k, t in enumerate(ins):
        if k < len(keep) and accepts(t, types[keep[k]]):
            chosen.append(keep[k])
            continue
        pool = [j for j in range(i) if accepts(t, types[j])]
        if not pool:
            return None
        chosen.append(int(rng.choice(pool)))
    return tuple(chosen)


def _replace(graph: Graph, i: int, node: Node) -> Graph:
    return Graph(graph.nodes[:i] + (node,) + graph.nodes[i + 1:], graph.output, name=graph.name)


def _change_op(graph, types, i, rng) -> Graph | None:
    old = graph.nodes[i]
    op, value = _OP_CHOICES[rng.integers(len(_OP_CHOICES))]
    if op == old.op and value == old.value:
        return None
    ins, _ = OPS[op].signatures[rng.integers(len(OPS[op].signatures))]
    chosen = _fill(rng, types, i, ins, keep=old.inputs)
    if chosen is None:
        return None
    return _replace(graph, i, Node(op, chosen, value))


def _rewire(graph, types, i, rng) -> Graph | None:
    old = graph.nodes[i]
    if not old.inputs:
        return None
    k = int(rng.integers(len(old.inputs)))
    op = OPS[old.op]
    pool = []
    for j in range(i):
        new = old.inputs[:k] + (j,) + old.inputs[k + 1:]
        if j != old.inputs[k] and op.output_type(tuple(types[x] for x in new)) is not None:
            pool.append(new)
    if not pool:
        return None
    return _replace(graph, i, Node(old.op, pool[rng.integers(len(pool))], old.value, old.name))


def mutate(graph: Graph, rng: np.random.Generator, max_tries: int = 1000) -> Graph:
    """One mutation of regularised evolution (Co-Reyes et al. 2021): pick a node the output
    depends on, then either change its op (to any op, constant or noise whose inputs can be
    found among earlier nodes, keeping the old inputs where their types fit) or rewire one
    of its inputs to another earlier node. Retries until the result type-checks and differs
    from ``graph``. Dead nodes are kept: a later rewiring can bring them back, as in the
    paper. Raises :class:`GraphError` if ``max_tries`` attempts all fail.
    """
    types = node_types(graph)
    typecheck(graph)
    candidates = sorted(i for i in live_nodes(graph) if not _is_input(graph.nodes[i]))
    if not candidates:
        candidates = [i for i, n in enumerate(graph.nodes) if not _is_input(n)]
    if not candidates:
        raise GraphError("graph has no node to mutate (only inputs)")
    for _ in range(max_tries):
        i = candidates[rng.integers(len(candidates))]
        new = (_change_op if rng.random() < 0.5 else _rewire)(graph, types, i, rng)
        if new is None or new == graph:
            continue
        try:
            typecheck(new)
        except GraphTypeError:
            continue
        return new
    raise GraphError(f"no type-correct mutation found in {max_tries} tries")


def random_graph(rng: np.random.Generator, n_nodes: int, name: str = "") -> Graph:
    """A random type-correct graph: the six inputs, then ``n_nodes`` random nodes, the last of
    which (SCALAR) is the output. A seed population for evolution, and a fuzzing tool."""
    if n_nodes < 1:
        raise ValueError("n_nodes must be at least 1")
    nodes = [input_node(n) for n in INPUTS]
    types = [INPUTS[n] for n in INPUTS]
    while len(nodes) < len(INPUTS) + n_nodes:
        last = len(nodes) == len(INPUTS) + n_nodes - 1
        op, value = _OP_CHOICES[rng.integers(len(_OP_CHOICES))]
        ins, out = OPS[op].signatures[rng.integers(len(OPS[op].signatures))]
        if last and out is not S:
            continue
        chosen = _fill(rng, tuple(types), len(nodes), ins)
        if chosen is None:
            continue
        nodes.append(Node(op, chosen, value))
        types.append(out)
    return Graph(tuple(nodes), len(nodes) - 1, name=name)
