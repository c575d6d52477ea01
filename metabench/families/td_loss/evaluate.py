"""From a loss graph to a JAX loss: the compiled rule of one graph, and the interpreter.

:func:`compile_graph` traces one pure-JAX function per graph, the rule a submitted graph is
scored with. :func:`interpreter_rule` is one rule for every graph, the graph handed to it as
an :class:`EncodedGraph` of arrays, so that a search compiles its training call once for a
whole population (see the comment above :data:`INTERPRETER_OPS`). Both evaluate a graph the
same way, value and gradient; the language they evaluate is
:mod:`metabench.families.td_loss.graph`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metabench.families.td_loss.graph import (ACT, INPUT_PREFIX, INPUTS, NOISE_OPS,
                                              NOISE_SEED, OPS, Graph, GraphError, S, V,
                                              _is_input, _select, live_nodes, typecheck)
from metabench.rules import UpdateRule, no_params

__all__ = ["INTERPRETER_OPS", "EncodedGraph", "compile_graph", "encode", "interpreter_rule",
           "live_size"]


# -------------------------------------------------------------------------------- compiling


def _get(inputs: Any, name: str, default: Any = ...):
    if isinstance(inputs, Mapping):
        return inputs[name] if default is ... else inputs.get(name, default)
    return getattr(inputs, name) if default is ... else getattr(inputs, name, default)


@functools.lru_cache(maxsize=4096)
def compile_graph(graph: Graph) -> UpdateRule:
    """The graph as a rule with no meta-parameters: ``apply({}, inputs) -> loss [B]``.

    ``apply`` is pure JAX (jittable, differentiable in ``q_tm1``) and evaluates only the
    nodes the output depends on. Noise nodes draw from ``inputs.rng`` when the inputs carry
    one; otherwise from the fixed key ``PRNGKey(NOISE_SEED)``, so that without an ``rng``
    each noise node is the same draw on every call (for a given batch shape): a fixed
    per-position perturbation rather than fresh noise. Each noise node folds its rank among
    the live noise nodes into the key, so that dead nodes do not change the draws.

    Equal graphs get the very same ``UpdateRule`` (cached), so a harness that caches
    compiled training calls per rule compiles a re-submitted graph once.
    """
    typecheck(graph)
    order = tuple(sorted(live_nodes(graph)))
    noise_rank = {i: k for k, i in enumerate(i for i in order if graph.nodes[i].op in NOISE_OPS)}

    def apply(meta_params, inputs):
        del meta_params  # a graph rule has none
        batch = jnp.shape(_get(inputs, "r_t"))
        q = jnp.asarray(_get(inputs, "q_tm1"))
        dtype = q.dtype if jnp.issubdtype(q.dtype, jnp.floating) else jnp.float32
        rng = _get(inputs, "rng", None)
        key = jax.random.PRNGKey(NOISE_SEED) if rng is None else rng
        values = {}
        for i in order:
            node = graph.nodes[i]
            if _is_input(node):
                name = node.op[len(INPUT_PREFIX):]
                x = jnp.asarray(_get(inputs, name))
                if INPUTS[name] is S:
                    x = x.astype(dtype)[..., None]
                elif INPUTS[name] is V:
                    x = x.astype(dtype)
                values[i] = x
            elif node.op == "const":
                values[i] = jnp.full(batch + (1,), node.value, dtype)
            elif node.op in NOISE_OPS:
                k = jax.random.fold_in(key, noise_rank[i])
                draw = jax.random.normal if node.op == "normal_noise" else jax.random.uniform
                values[i] = draw(k, batch + (1,), dtype)
            else:
                values[i] = OPS[node.op].fn(*(values[j] for j in node.inputs))
        return jnp.broadcast_to(values[graph.output], batch + (1,))[..., 0]

    return UpdateRule(init=no_params, apply=apply)


# ------------------------------------------------------------------------------ interpreter
# compile_graph traces one JAX function per graph: inside a training loop that is a fresh XLA
# compile (seconds to tens of seconds) per candidate, which dominates a search. The
# interpreter below is one rule for *every* graph of up to ``max_nodes`` live nodes: the graph
# is an encoded table passed as meta-parameters, so one compiled training call serves a whole
# search, and a population can be vmapped through it (then lax.switch evaluates every op and
# selects, which is cheap next to the Q-network).
#
# Layout: every value is ``[..., A]``. SCALAR and ACTION values are broadcast over the action
# axis (all columns equal), so binary ops need no type dispatch; reductions broadcast their
# result back. Slots 0-5 hold the inputs in INPUTS order, then the live nodes in topological
# order; unused slots hold a zero constant; the output is the first column of its slot.

_PAD_OP = "const"
INTERPRETER_OPS: tuple[str, ...] = tuple(OPS)
"""Op codes of :class:`EncodedGraph` (the index into this tuple)."""


class EncodedGraph(NamedTuple):
    """A graph as arrays (the interpreter rule's meta-parameters); slot ``k`` computes
    ``INTERPRETER_OPS[op[k]](slot args[k, 0], slot args[k, 1])``."""

    op: jax.Array
    """``[S]`` int32 op codes (slots of the inputs hold 0 and are never evaluated)."""
    args: jax.Array
    """``[S, 2]`` int32 argument slots (unused arguments point at slot 0)."""
    value: jax.Array
    """``[S]`` float32 constants (0 where the op is not ``const``)."""
    noise: jax.Array
    """``[S]`` int32 rank among the live noise nodes (folded into the noise key)."""
    output: jax.Array
    """``[]`` int32 the output slot."""


def live_size(graph: Graph) -> int:
    """Live non-input nodes of ``graph``: the smallest ``max_nodes`` :func:`encode` takes."""
    return sum(not _is_input(graph.nodes[i]) for i in live_nodes(graph))


def encode(graph: Graph, max_nodes: int) -> EncodedGraph:
    """The live part of ``graph`` as an :class:`EncodedGraph` of ``len(INPUTS) + max_nodes``
    slots; :func:`interpreter_rule` evaluates it exactly as :func:`compile_graph` does."""
    typecheck(graph)
    live = sorted(live_nodes(graph))
    body = [i for i in live if not _is_input(graph.nodes[i])]
    if len(body) > max_nodes:
        raise GraphError(f"graph {graph.name or ''!s} has {len(body)} live nodes; the "
                         f"interpreter holds {max_nodes}")
    n_in = len(INPUTS)
    slot = {i: list(INPUTS).index(graph.nodes[i].op[len(INPUT_PREFIX):])
            for i in live if _is_input(graph.nodes[i])}
    size = n_in + max_nodes
    op = np.full(size, INTERPRETER_OPS.index(_PAD_OP), np.int32)
    args = np.zeros((size, 2), np.int32)
    value = np.zeros(size, np.float32)
    noise = np.zeros(size, np.int32)
    rank = 0
    for k, i in enumerate(body, start=n_in):
        node = graph.nodes[i]
        slot[i] = k
        op[k] = INTERPRETER_OPS.index(node.op)
        args[k, :len(node.inputs)] = [slot[j] for j in node.inputs]
        if node.op == "const":
            value[k] = node.value
        if node.op in NOISE_OPS:
            noise[k], rank = rank, rank + 1
    return EncodedGraph(op, args, value, noise, np.int32(slot[graph.output]))


def _bcast(fn):
    # A reduction over actions, broadcast back to [..., A].
    return lambda x, y, v, k: jnp.broadcast_to(fn(x), x.shape)


def _interpreter_branches():
    def binary(f):
        return lambda x, y, v, k: f(x, y)

    def unary(f):
        return lambda x, y, v, k: f(x)

    out = []
    for name in INTERPRETER_OPS:
        op = OPS[name]
        if name in ("dot", "l2_distance", "kl"):
            f = op.fn
            out.append(lambda x, y, v, k, f=f: jnp.broadcast_to(f(x, y), x.shape))
        elif name == "select":
            out.append(lambda x, y, v, k: jnp.broadcast_to(_select(x, y[..., 0]), x.shape))
        elif name == "argmax_list":
            out.append(lambda x, y, v, k: jnp.broadcast_to(
                jnp.argmax(x, axis=-1, keepdims=True).astype(x.dtype), x.shape))
        elif name in ("max_list", "min_list", "mean_list", "variance_list", "entropy"):
            out.append(_bcast(op.fn))
        elif name == "const":
            out.append(lambda x, y, v, k: jnp.full_like(x, v))
        elif name in NOISE_OPS:
            draw = jax.random.normal if name == "normal_noise" else jax.random.uniform
            out.append(lambda x, y, v, k, draw=draw: jnp.broadcast_to(
                draw(k, x.shape[:-1] + (1,), x.dtype), x.shape))
        elif op.arity == 2:
            out.append(binary(op.fn))
        else:
            out.append(unary(op.fn))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def interpreter_rule() -> UpdateRule:
    """One rule for every graph: ``apply(encode(graph, n), inputs)`` equals
    ``compile_graph(graph).apply({}, inputs)``. Its ``init`` is not meaningful (a graph rule
    has no learned parameters); the search hands it encoded graphs."""
    branches = _interpreter_branches()

    def apply(enc: EncodedGraph, inputs):
        enc = EncodedGraph(*(jnp.asarray(a) for a in enc))
        q = jnp.asarray(_get(inputs, "q_tm1"))
        dtype = q.dtype if jnp.issubdtype(q.dtype, jnp.floating) else jnp.float32
        shape = q.shape
        rng = _get(inputs, "rng", None)
        key = jax.random.PRNGKey(NOISE_SEED) if rng is None else rng
        first = []
        for name, t in INPUTS.items():
            x = jnp.asarray(_get(inputs, name)).astype(dtype)
            first.append(jnp.broadcast_to(x[..., None], shape) if t in (S, ACT) else x)
        size = enc.op.shape[-1]
        values = jnp.concatenate([jnp.stack(first), jnp.zeros((size - len(first),) + shape,
                                                              dtype)])

        def body(k, values):
            x = values[enc.args[k, 0]]
            y = values[enc.args[k, 1]]
            out = jax.lax.switch(enc.op[k], branches, x, y, enc.value[k].astype(dtype),
                                 jax.random.fold_in(key, enc.noise[k]))
            return values.at[k].set(out)

        values = jax.lax.fori_loop(len(first), size, body, values)
        return values[enc.output][..., 0]

    def init(rng):
        raise GraphError("the interpreter rule has no initial parameters: pass "
                         "encode(graph, max_nodes)")

    return UpdateRule(init=init, apply=apply)
