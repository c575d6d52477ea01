"""Typed computation graphs over Q-values: the search space of evolved DQN losses.

Co-Reyes et al. 2021, "Evolving Reinforcement Learning Algorithms" (ICLR), represent an RL
algorithm as a loss over Q-values written as a typed computation graph (a DAG of primitive
operations) and search that space with regularised evolution. DQN, DQNReg and DQNClipped are
graphs of this kind. This module is the language the ``td_loss`` family scores: its types,
its operations and the graphs built from them. What is done with a graph lives beside it, one
concern per module, all on these definitions:

- a graph is a :class:`Graph` of :class:`Node` s, each naming an op and earlier nodes;
- :func:`typecheck` gives every node a :class:`Type` and says which node is ill-typed;
- :func:`~metabench.families.td_loss.evaluate.compile_graph` turns a graph into an
  ``UpdateRule`` whose ``apply`` is pure JAX, and
  :func:`~metabench.families.td_loss.evaluate.interpreter_rule` is one rule for every graph
  (``metabench.families.td_loss.evaluate``);
- :func:`~metabench.families.td_loss.formula.equation` prints the loss as a readable formula
  (``metabench.families.td_loss.formula``);
- :func:`~metabench.families.td_loss.search.functional_hash` identifies graphs that compute
  the same function (the paper's functional-equivalence check, which skips re-training
  duplicates during evolution) and :func:`~metabench.families.td_loss.search.mutate` is the
  paper's mutation (change one op, or rewire one input) (``metabench.families.td_loss.search``);
- :func:`~metabench.families.td_loss.yaml_form.load_graph` /
  :func:`~metabench.families.td_loss.yaml_form.dump_graph` are the YAML form, and
  :func:`~metabench.families.td_loss.yaml_form.library` the shipped graphs in
  ``metabench/families/td_loss/library/`` (``metabench.families.td_loss.yaml_form``).

Types. ``SCALAR`` is one number per transition (shape ``[B]``), ``VECTOR`` one per action
(``[B, A]``), ``PROB`` a distribution over actions (``[B, A]``, non-negative, summing to one:
the output of ``softmax``) and ``ACTION`` an integer action per transition (``[B]``). ``PROB``
is a subtype of ``VECTOR``: every op that takes a ``VECTOR`` takes a ``PROB`` too (and returns
a ``VECTOR``: ``p + p`` is no longer a distribution), while ``kl`` and ``entropy`` take only
``PROB``. The paper's ``STATE`` type is not exposed, on purpose: in the paper a state node is
only ever consumed by a Q-network node, and the ``td_loss`` family applies the agent's online
and target networks itself and hands the rule their outputs (``q_tm1 = Q(s_t, .)``,
``q_t = Q(s_t+1, .)``, ``q_target_t = Q_target(s_t+1, .)``). Those applications are this
module's input nodes. Handing the rule an observation would let it depend on which
environment it is in, which the benchmark forbids (a rule sees only its family's contract).

Inputs (per transition, any object with these attributes, or a mapping):
``q_tm1``, ``q_t``, ``q_target_t`` (VECTOR), ``a_tm1`` (ACTION), ``r_t``, ``discount_t``
(SCALAR; ``discount_t = gamma * (1 - terminated)``). The compiled rule returns a loss of shape
``[B]`` (leading dimensions may be anything; the last axis of a VECTOR is the action axis).

Gradients. Graphs contain no ``stop_gradient``: the family differentiates the loss only with
respect to the online parameters through ``q_tm1`` and stops gradients through ``q_t`` and
``q_target_t`` itself, so a target such as ``r_t + discount_t * max(q_target_t)`` is a
constant to the agent exactly as in DQN.

Safety. Every op is finite on finite inputs of reasonable size (``|x| <= 1e12`` is tested):
``div`` and ``log`` are guarded by a small epsilon, ``exp`` clips its argument, ``kl`` and
``entropy`` clamp probabilities before the log and ``l2_distance`` has a finite gradient at
zero distance. A composition can still overflow (a product of products of huge Q-values);
such a loss trains badly, as it would in the paper, and the harness records the NaN.

Noise. ``normal_noise`` and ``uniform_noise`` draw from ``inputs.rng`` when the inputs carry
one, and otherwise from a fixed key: see
:func:`~metabench.families.td_loss.evaluate.compile_graph`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CONSTANTS", "INPUTS", "OPS", "Graph", "GraphError", "GraphTypeError", "Node", "Op",
    "Type", "accepts", "input_node", "live_nodes", "node_types", "typecheck",
]


# ----------------------------------------------------------------------------------- types


class Type(enum.Enum):
    """The type of a node's value; see the module docstring for shapes."""

    SCALAR = "SCALAR"
    VECTOR = "VECTOR"
    PROB = "PROB"
    ACTION = "ACTION"

    def __str__(self) -> str:
        return self.value


S, V, P, ACT = Type.SCALAR, Type.VECTOR, Type.PROB, Type.ACTION


def accepts(expected: Type, got: Type) -> bool:
    """Whether a slot of type ``expected`` takes a value of type ``got`` (PROB <: VECTOR)."""
    return got is expected or (expected is V and got is P)


class GraphError(ValueError):
    """A malformed graph: unknown op, bad reference, wrong arity, bad YAML."""


class GraphTypeError(GraphError):
    """A well-formed graph whose types do not fit; the message names the node."""


# ------------------------------------------------------------------------------ operations

DIV_EPS = 1e-8
"""``div(x, y)`` divides by ``y`` moved away from zero to at least this magnitude."""
LOG_EPS = 1e-8
"""``log(x) = log(|x| + LOG_EPS)``: the paper's log is of a magnitude and must not hit zero."""
EXP_CLIP = 20.0
"""``exp`` clips its argument to ``[-EXP_CLIP, EXP_CLIP]`` (exp(20) ~ 5e8) so it cannot
overflow float32; past the clip its gradient is zero."""
PROB_FLOOR = 1e-30
"""``kl`` and ``entropy`` take the log of ``max(p, PROB_FLOOR)``: softmax underflows to exactly
zero for very separated Q-values, and ``0 * log 0`` must be 0, not NaN."""
NOISE_SEED = 0
"""The key the noise nodes use when the inputs carry no ``rng``."""
CONSTANTS = (1.0, 0.5, 0.2, 0.1, 0.01)
"""The paper's constant nodes (mutation draws constants from these)."""

# Inside a compiled graph, SCALAR values are kept as [..., 1] rather than [...], so that every
# SCALAR-with-VECTOR op broadcasts over the action axis with no special cases; reductions over
# actions use keepdims, and the output's trailing axis is dropped at the end.


def _safe_div(x, y):
    # Move the denominator away from zero, keeping its sign (0 counts as positive). Both
    # branches of the where are finite, so the gradient is finite too.
    small = jnp.abs(y) < DIV_EPS
    return x / jnp.where(small, jnp.where(y < 0, -DIV_EPS, DIV_EPS), y)


def _safe_log(x):
    return jnp.log(jnp.abs(x) + LOG_EPS)


def _safe_exp(x):
    return jnp.exp(jnp.clip(x, -EXP_CLIP, EXP_CLIP))


def _plogp(p, q):
    return p * jnp.log(jnp.maximum(q, PROB_FLOOR))


def _kl(p, q):
    return jnp.sum(_plogp(p, p) - _plogp(p, q), axis=-1, keepdims=True)


def _entropy(p):
    return -jnp.sum(_plogp(p, p), axis=-1, keepdims=True)


def _l2_distance(x, y):
    # sqrt has an infinite slope at 0: use the double-where trick so that the gradient at
    # zero distance is 0 instead of NaN.
    sq = jnp.sum(jnp.square(x - y), axis=-1, keepdims=True)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _select(v, a):
    a = jnp.asarray(a).astype(jnp.int32)[..., None]
    return jnp.take_along_axis(v, a, axis=-1, mode="clip")


@dataclasses.dataclass(frozen=True)
class Op:
    """A primitive: its accepted input types, each with the output type it then has."""

    name: str
    signatures: tuple[tuple[tuple[Type, ...], Type], ...]
    """``((input types), output type)`` pairs, tried in order."""
    fn: Callable[..., Any] | None
    """The computation on the internal layout; ``None`` for const and noise (special-cased)."""
    doc: str

    @property
    def arity(self) -> int:
        return len(self.signatures[0][0])

    def output_type(self, got: tuple[Type, ...]) -> Type | None:
        """The output type for inputs of types ``got``, or ``None`` if no signature fits."""
        for ins, out in self.signatures:
            if len(ins) == len(got) and all(accepts(e, g) for e, g in zip(ins, got)):
                return out
        return None


_BINARY = (((S, S), S), ((V, V), V), ((V, S), V), ((S, V), V))
_UNARY = (((S,), S), ((V,), V))
_REDUCE = (((V,), S),)
_NULLARY = (((), S),)


def _reduce(f):
    return lambda v: f(v, axis=-1, keepdims=True)


OPS: dict[str, Op] = {op.name: op for op in (
    Op("add", _BINARY, jnp.add, "x + y"),
    Op("subtract", _BINARY, jnp.subtract, "x - y"),
    Op("multiply", _BINARY, jnp.multiply, "x * y"),
    Op("div", _BINARY, _safe_div, "x / y, with |y| raised to at least DIV_EPS (sign kept)"),
    Op("max", _BINARY, jnp.maximum, "elementwise maximum"),
    Op("min", _BINARY, jnp.minimum, "elementwise minimum"),
    Op("dot", (((V, V), S),), lambda x, y: jnp.sum(x * y, axis=-1, keepdims=True),
       "dot product over actions"),
    Op("l2_distance", (((V, V), S),), _l2_distance, "Euclidean distance over actions"),
    Op("max_list", _REDUCE, _reduce(jnp.max), "maximum over actions"),
    Op("min_list", _REDUCE, _reduce(jnp.min), "minimum over actions"),
    Op("argmax_list", (((V,), ACT),), lambda v: jnp.argmax(v, axis=-1).astype(jnp.int32),
       "action of the maximum (first on ties)"),
    Op("mean_list", _REDUCE, _reduce(jnp.mean), "mean over actions"),
    Op("variance_list", _REDUCE, _reduce(jnp.var), "variance over actions"),
    Op("select", (((V, ACT), S),), _select, "the entry of a vector at an action"),
    Op("log", _UNARY, _safe_log, "log(|x| + LOG_EPS)"),
    Op("exp", _UNARY, _safe_exp, "exp(clip(x, -EXP_CLIP, EXP_CLIP))"),
    Op("abs", _UNARY, jnp.abs, "|x|"),
    Op("square", _UNARY, jnp.square, "x * x (the paper writes multiply(x, x))"),
    Op("multiply_tenth", _UNARY, lambda x: x * 0.1, "0.1 * x"),
    Op("softmax", (((V,), P),), lambda v: jax.nn.softmax(v, axis=-1), "softmax over actions"),
    Op("kl", (((P, P), S),), _kl, "KL(p || q), probabilities floored before the log"),
    Op("entropy", (((P,), S),), _entropy, "entropy of p, probabilities floored before the log"),
    Op("const", _NULLARY, None, "a constant (the node's value)"),
    Op("normal_noise", _NULLARY, None, "a N(0, 1) draw per transition"),
    Op("uniform_noise", _NULLARY, None, "a U(0, 1) draw per transition"),
)}
NOISE_OPS = ("normal_noise", "uniform_noise")

INPUTS: dict[str, Type] = {
    "q_tm1": V, "a_tm1": ACT, "r_t": S, "discount_t": S, "q_t": V, "q_target_t": V,
}
"""The family's inputs, in the order every loaded graph starts with."""
INPUT_PREFIX = "input:"


# ----------------------------------------------------------------------------------- graphs


@dataclasses.dataclass(frozen=True)
class Node:
    """One node: ``op`` applied to earlier nodes (by index). ``op`` is a key of :data:`OPS`
    or ``"input:<name>"``; ``value`` is set exactly for ``const``. ``name`` is a label for
    messages, YAML and equations, and takes no part in equality."""

    op: str
    inputs: tuple[int, ...] = ()
    value: float | None = None
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        # Graphs are hashed (compile_graph caches on them): no lists inside.
        object.__setattr__(self, "inputs", tuple(self.inputs))


def input_node(name: str) -> Node:
    return Node(INPUT_PREFIX + name, name=name)


def _is_input(node: Node) -> bool:
    return node.op.startswith(INPUT_PREFIX)


def _label(graph_nodes, i: int) -> str:
    name = graph_nodes[i].name
    return f"'{name}'" if name else f"#{i}"


@dataclasses.dataclass(frozen=True)
class Graph:
    """A DAG in topological order: every node refers only to earlier nodes; ``output`` is the
    index of the loss node. Structure is checked here, types by :func:`typecheck`."""

    nodes: tuple[Node, ...]
    output: int
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))
        for i, node in enumerate(self.nodes):
            where = f"node {_label(self.nodes, i)} ({node.op})"
            if _is_input(node):
                if node.op[len(INPUT_PREFIX):] not in INPUTS:
                    raise GraphError(f"{where}: unknown input; inputs are {', '.join(INPUTS)}")
                arity = 0
            elif node.op in OPS:
                arity = OPS[node.op].arity
            else:
                raise GraphError(f"{where}: unknown op; ops are {', '.join(OPS)}")
            if len(node.inputs) != arity:
                raise GraphError(f"{where}: takes {arity} inputs, got {len(node.inputs)}")
            for j in node.inputs:
                if not (isinstance(j, (int, np.integer)) and 0 <= j < i):
                    raise GraphError(f"{where}: input {j!r} is not an earlier node")
            if node.op == "const":
                if not (isinstance(node.value, (int, float)) and math.isfinite(node.value)):
                    raise GraphError(f"{where}: needs a finite value, got {node.value!r}")
            elif node.value is not None:
                raise GraphError(f"{where}: only const nodes have a value")
        if not 0 <= self.output < len(self.nodes):
            raise GraphError(f"output {self.output} is not a node (the graph has "
                             f"{len(self.nodes)})")


def live_nodes(graph: Graph) -> frozenset[int]:
    """Indices of the nodes the output depends on (itself included)."""
    seen, stack = set(), [graph.output]
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(graph.nodes[i].inputs)
    return frozenset(seen)


def _fmt_types(types) -> str:
    return "(" + ", ".join(str(t) for t in types) + ")"


def node_types(graph: Graph) -> tuple[Type, ...]:
    """The type of every node, dead ones included (mutation may rewire to them later)."""
    types: list[Type] = []
    for i, node in enumerate(graph.nodes):
        if _is_input(node):
            types.append(INPUTS[node.op[len(INPUT_PREFIX):]])
            continue
        op = OPS[node.op]
        got = tuple(types[j] for j in node.inputs)
        out = op.output_type(got)
        if out is None:
            expected = ", ".join(_fmt_types(ins) for ins, _ in op.signatures)
            raise GraphTypeError(
                f"node {_label(graph.nodes, i)} ({node.op}): inputs {_fmt_types(got)} not "
                f"accepted; expected one of {expected} (PROB is accepted where VECTOR is)")
        types.append(out)
    return tuple(types)


def typecheck(graph: Graph) -> Type:
    """Type every node; the output must be SCALAR (a per-transition loss). Returns its type."""
    out = node_types(graph)[graph.output]
    if out is not S:
        node = graph.nodes[graph.output]
        raise GraphTypeError(f"output node {_label(graph.nodes, graph.output)} ({node.op}) has "
                             f"type {out}; a loss must be SCALAR")
    return out
