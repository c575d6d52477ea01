"""Typed computation graphs over Q-values: the search space of evolved DQN losses.

Co-Reyes et al. 2021, "Evolving Reinforcement Learning Algorithms" (ICLR), represent an RL
algorithm as a loss over Q-values written as a typed computation graph (a DAG of primitive
operations) and search that space with regularised evolution. DQN, DQNReg and DQNClipped are
graphs of this kind. This module is the representation the ``td_loss`` family scores:

- a graph is a :class:`Graph` of :class:`Node` s, each naming an op and earlier nodes;
- :func:`typecheck` gives every node a :class:`Type` and says which node is ill-typed;
- :func:`compile_graph` turns a graph into an ``UpdateRule`` whose ``apply`` is pure JAX;
- :func:`equation` prints the loss as a readable formula;
- :func:`functional_hash` identifies graphs that compute the same function (the paper's
  functional-equivalence check, which skips re-training duplicates during evolution);
- :func:`mutate` is the paper's mutation (change one op, or rewire one input);
- :func:`load_graph` / :func:`dump_graph` are the YAML form, and :func:`library` the shipped
  graphs in ``metabench/graph_library/``.

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
one, and otherwise from a fixed key: see :func:`compile_graph`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from metabench.rules import UpdateRule, no_params

__all__ = [
    "CONSTANTS", "INPUTS", "INTERPRETER_OPS", "OPS", "EncodedGraph", "Graph", "GraphError",
    "GraphTypeError", "Node", "Op", "Type", "accepts", "compile_graph", "dump_graph", "encode",
    "equation", "functional_hash", "input_node", "interpreter_rule", "library", "library_rule",
    "live_nodes", "load_graph", "mutate", "node_types", "random_graph", "typecheck",
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


# ------------------------------------------------------------------------------------- YAML

_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOP_KEYS = {"name", "nodes", "output"}
_NODE_KEYS = {"id", "op", "in", "value"}


def _as_float(x: Any, where: str) -> float:
    # PyYAML reads "1e-2" (no dot) as a string: accept numeric strings, reject booleans.
    if isinstance(x, bool):
        raise GraphError(f"{where}: {x!r} is not a number")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise GraphError(f"{where}: {x!r} is not a number") from None


def load_graph(source: str | os.PathLike | Mapping) -> Graph:
    """A graph from YAML text, a ``.yaml`` path or an already parsed mapping::

        name: dqn
        nodes:
          - {id: q_sa, op: select, in: [q_tm1, a_tm1]}
          - {id: delta, op: subtract, in: [q_sa, target]}   # ids must be defined before use
          - {id: reg, op: multiply, in: [0.1, q_sa]}        # a number is a const node
        output: loss

    Inputs are referred to by name and always become nodes 0-5 (in :data:`INPUTS` order), so
    that every node can be rewired to any input. A number in ``in`` adds a const node just
    before the node using it.
    """
    where = "graph"
    if isinstance(source, Mapping):
        data = source
    else:
        text = source
        if isinstance(source, os.PathLike) or (
                "\n" not in source and source.strip().endswith((".yaml", ".yml"))):
            where = str(source)
            text = Path(source).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise GraphError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise GraphError(f"{where}: expected a mapping with keys nodes, output (and name)")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise GraphError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if not isinstance(data.get("nodes"), list) or "output" not in data:
        raise GraphError(f"{where}: needs 'nodes' (a list) and 'output'")

    nodes = [input_node(n) for n in INPUTS]
    index = {n: i for i, n in enumerate(INPUTS)}
    for k, spec in enumerate(data["nodes"]):
        if not isinstance(spec, Mapping):
            raise GraphError(f"{where}: nodes[{k}] is not a mapping")
        bad = set(spec) - _NODE_KEYS
        if bad:
            raise GraphError(f"{where}: nodes[{k}]: unknown keys {sorted(bad)}; "
                             f"allowed: {sorted(_NODE_KEYS)}")
        nid = spec.get("id")
        if not isinstance(nid, str) or not _ID.match(nid):
            raise GraphError(f"{where}: nodes[{k}]: id must be an identifier, got {nid!r}")
        here = f"{where}: node '{nid}'"
        if nid in index:
            raise GraphError(f"{here}: id already defined" + (" (it is an input name)"
                                                              if nid in INPUTS else ""))
        op = spec.get("op")
        if op not in OPS:
            raise GraphError(f"{here}: unknown op {op!r}; ops are {', '.join(OPS)}")
        refs = spec.get("in", [])
        if not isinstance(refs, list):
            raise GraphError(f"{here}: 'in' must be a list")
        ins = []
        for ref in refs:
            if isinstance(ref, (int, float)) and not isinstance(ref, bool):
                nodes.append(Node("const", (), _as_float(ref, here)))
                ins.append(len(nodes) - 1)
            elif isinstance(ref, str) and ref in index:
                ins.append(index[ref])
            else:
                raise GraphError(f"{here}: input {ref!r} is not an input or an earlier node")
        value = None
        if op == "const":
            if "value" not in spec:
                raise GraphError(f"{here}: a const node needs a value")
            value = _as_float(spec["value"], here)
        elif "value" in spec:
            raise GraphError(f"{here}: only const nodes have a value")
        if len(ins) != OPS[op].arity:
            raise GraphError(f"{here} ({op}): takes {OPS[op].arity} inputs, got {len(ins)}")
        nodes.append(Node(op, tuple(ins), value, name=nid))
        index[nid] = len(nodes) - 1
    out = data["output"]
    if out not in index:
        raise GraphError(f"{where}: output {out!r} is not a node")
    name = data.get("name", "")
    try:
        return Graph(tuple(nodes), index[out], name=str(name) if name is not None else "")
    except GraphError as e:
        raise GraphError(f"{where}: {e}") from None


def _fmt_float(v: float) -> str:
    # repr round-trips exactly; PyYAML only reads exponents with a dot and a signed exponent.
    s = repr(float(v))
    if "e" in s:
        mant, exp = s.split("e")
        if "." not in mant:
            mant += ".0"
        if exp[0] not in "+-":
            exp = "+" + exp
        s = f"{mant}e{exp}"
    return s


def _plain(s: str) -> bool:
    # An identifier that YAML reads back as the same string ("null", "yes", "true" are not).
    return bool(_ID.match(s)) and yaml.safe_load(s) == s


def _inline_consts(graph: Graph) -> set[int]:
    """Unnamed const nodes that load_graph would recreate from a number written in ``in``:
    each used once, by the node right after its run, in slot order (as loading makes them)."""
    users: dict[int, list[tuple[int, int]]] = {}
    for k, node in enumerate(graph.nodes):
        for slot, j in enumerate(node.inputs):
            users.setdefault(j, []).append((k, slot))
    out = set()
    for k, node in enumerate(graph.nodes):
        j, next_slot = k - 1, len(node.inputs)
        while j >= 0:
            c = graph.nodes[j]
            use = users.get(j, [])
            if not (c.op == "const" and c.name is None and j != graph.output and len(use) == 1
                    and use[0][0] == k and use[0][1] < next_slot):
                break
            out.add(j)
            next_slot = use[0][1]
            j -= 1
    return out


def dump_graph(graph: Graph) -> str:
    """The YAML form; ``load_graph(dump_graph(g)) == g`` (names included)."""
    # Input nodes are implicit in the YAML form; a graph holding them anywhere other than as
    # nodes 0-5 would come back reordered, so only that layout is dumped.
    if tuple(n.op for n in graph.nodes[:len(INPUTS)]) != tuple(INPUT_PREFIX + n for n in INPUTS) \
            or any(_is_input(n) for n in graph.nodes[len(INPUTS):]):
        raise GraphError("dump_graph needs the inputs as nodes 0-5 in INPUTS order "
                         "(as load_graph and random_graph make them)")
    used = set(INPUTS) | {n.name for n in graph.nodes if n.name}
    ids: list[str] = list(INPUTS)
    seen = set(INPUTS)
    for i, node in enumerate(graph.nodes[len(INPUTS):], start=len(INPUTS)):
        nid = node.name
        if not nid or not _plain(nid) or nid in seen:
            k = i
            while f"n{k}" in used or f"n{k}" in seen:
                k += 1
            nid = f"n{k}"
        seen.add(nid)
        ids.append(nid)
    # An identifier is plain YAML; anything else is quoted (JSON strings are YAML strings).
    name = graph.name if _plain(graph.name) else json.dumps(graph.name)
    inline = _inline_consts(graph)
    lines = [f"name: {name}", "nodes:"]
    for i, node in enumerate(graph.nodes[len(INPUTS):], start=len(INPUTS)):
        if i in inline:
            continue
        parts = [f"id: {ids[i]}", f"op: {node.op}"]
        if node.inputs:
            refs = (_fmt_float(graph.nodes[j].value) if j in inline else ids[j]
                    for j in node.inputs)
            parts.append("in: [" + ", ".join(refs) + "]")
        if node.value is not None:
            parts.append(f"value: {_fmt_float(node.value)}")
        lines.append("  - {" + ", ".join(parts) + "}")
    lines.append(f"output: {ids[graph.output]}")
    return "\n".join(lines) + "\n"


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


# --------------------------------------------------------------------------------- equation
# The live DAG is rebuilt as hash-consed expressions (each distinct expression gets one id),
# simplified by a few local rules as it is built. Hash-consing keeps this linear in the graph
# size even when sharing would make the inlined formula exponentially long, and makes
# "x - x" a comparison of two ids.

_INFIX = {"add": ("+", 1), "subtract": ("-", 1), "multiply": ("*", 2), "div": ("/", 2)}
_FUNC = {"max": "max", "min": "min", "max_list": "max", "min_list": "min",
         "argmax_list": "argmax", "mean_list": "mean", "variance_list": "var", "dot": "dot",
         "l2_distance": "l2", "select": "select", "log": "log", "exp": "exp", "abs": "abs",
         "softmax": "softmax", "kl": "kl", "entropy": "entropy"}
EQUATION_MAX_INLINE = 400
"""Above this many characters, :func:`equation` names shared subexpressions instead."""


# A constant here may stand for a constant *vector* (``q_t - q_t`` folds to 0), and these ops
# results on a constant vector depend on the number of actions (softmax(0) = 1/A), so they
# are never folded.
_NO_FOLD = frozenset({"dot", "l2_distance", "softmax", "entropy", "kl", "argmax_list"})


class _Exprs:
    """Interned expressions: ``(op, args, value)`` with ``op`` an op name, ``"const"``,
    ``"var"`` (value = name), ``"neg"`` (display only) or a noise op (value = rank)."""

    def __init__(self):
        self.items: list[tuple[str, tuple[int, ...], Any]] = []
        self.ids: dict[tuple, int] = {}

    def raw(self, op, args=(), value=None) -> int:
        key = (op, args, value)
        if key not in self.ids:
            self.ids[key] = len(self.items)
            self.items.append(key)
        return self.ids[key]

    def const(self, v: float) -> int:
        return self.raw("const", (), float(v) + 0.0)  # + 0.0 turns -0.0 into 0.0

    def cval(self, e: int) -> float | None:
        op, _, value = self.items[e]
        return value if op == "const" else None

    def is_c(self, e: int, v: float) -> bool:
        return self.cval(e) == v

    def mk(self, op: str, args: tuple[int, ...] = (), value=None) -> int:
        """Build ``op(args)``, simplified: constant folding and a handful of identities."""
        cv = [self.cval(a) for a in args]
        if args and all(c is not None for c in cv):
            if op == "neg":
                return self.const(-cv[0])
            if OPS.get(op) is not None and OPS[op].fn is not None and op not in _NO_FOLD:
                # Fold with the op itself in float32, so the shown value is what runs.
                x = OPS[op].fn(*(jnp.full((1,), c, jnp.float32) for c in cv))
                return self.const(float(x[0]))
        a = args[0] if args else None
        b = args[1] if len(args) > 1 else None
        sub = self.items[a][0] if a is not None else None
        if op == "multiply_tenth":
            return self.mk("multiply", (self.const(0.1), a))
        if op == "add":
            if self.is_c(a, 0.0):
                return b
            if self.is_c(b, 0.0):
                return a
            if cv[1] is not None and cv[1] < 0:
                return self.mk("subtract", (a, self.const(-cv[1])))
            if a == b:
                return self.mk("multiply", (self.const(2.0), a))
        elif op == "subtract":
            if self.is_c(b, 0.0):
                return a
            if a == b:
                return self.const(0.0)
            if self.is_c(a, 0.0):
                return self.mk("neg", (b,))
            if cv[1] is not None and cv[1] < 0:
                return self.mk("add", (a, self.const(-cv[1])))
        elif op == "multiply":
            if cv[1] is not None and cv[0] is None:  # constants first: "0.1 * x"
                return self.mk("multiply", (b, a))
            if self.is_c(a, 1.0):
                return b
            if self.is_c(a, 0.0):
                return self.const(0.0)
            if self.is_c(a, -1.0):
                return self.mk("neg", (b,))
            if a == b:
                return self.mk("square", (a,))
            bop, bargs, _ = self.items[b]
            if cv[0] is not None and bop == "multiply" and self.cval(bargs[0]) is not None:
                return self.mk("multiply", (self.mk("multiply", (a, bargs[0])), bargs[1]))
        elif op == "div":
            if self.is_c(b, 1.0):
                return a
            if self.is_c(a, 0.0):
                return self.const(0.0)
        elif op in ("max", "min") and a == b:
            return a
        elif op == "abs":
            if sub in ("abs", "square", "exp"):
                return a
            if sub == "neg":
                return self.mk("abs", self.items[a][1])
        elif op == "square" and sub == "neg":
            return self.mk("square", self.items[a][1])
        elif op == "neg" and sub == "neg":
            return self.items[a][1][0]
        return self.raw(op, tuple(args), value)


def _fmt_num(v: float) -> str:
    return f"{v:.6g}"


def _prec(ex: _Exprs, e: int, names: Mapping[int, str]) -> int:
    if e in names:
        return 5
    op, _, value = ex.items[e]
    if op == "const":
        return 5 if value >= 0 else 3
    if op in _INFIX:
        return _INFIX[op][1]
    return {"neg": 3, "square": 4}.get(op, 5)


def _render(ex: _Exprs, e: int, names: Mapping[int, str], top: bool = True) -> str:
    if not top and e in names:
        return names[e]
    op, args, value = ex.items[e]

    def sub(child: int, paren: bool) -> str:
        s = _render(ex, child, names, top=False)
        return f"({s})" if paren else s

    if op == "const":
        return _fmt_num(value)
    if op == "var":
        return value
    if op in NOISE_OPS:
        return f"{op.split('_')[0]}_{value}"
    if op in _INFIX:
        sym, p = _INFIX[op]
        left = sub(args[0], _prec(ex, args[0], names) < p)
        pr = _prec(ex, args[1], names)
        right = sub(args[1], pr < p or (pr == p and op in ("subtract", "div")))
        return f"{left} {sym} {right}"
    if op == "neg":
        return "-" + sub(args[0], _prec(ex, args[0], names) < 3)
    if op == "square":
        return sub(args[0], _prec(ex, args[0], names) < 5) + "^2"
    return f"{_FUNC[op]}(" + ", ".join(sub(a, False) for a in args) + ")"


def _build_exprs(graph: Graph) -> tuple[_Exprs, int, dict[int, str]]:
    ex = _Exprs()
    of: dict[int, int] = {}
    hint: dict[int, str] = {}  # expression -> the name of a graph node computing it
    order = sorted(live_nodes(graph))
    rank = {i: k for k, i in enumerate(i for i in order if graph.nodes[i].op in NOISE_OPS)}
    for i in order:
        node = graph.nodes[i]
        if _is_input(node):
            of[i] = ex.raw("var", (), node.op[len(INPUT_PREFIX):])
        elif node.op == "const":
            of[i] = ex.const(node.value)
        elif node.op in NOISE_OPS:
            of[i] = ex.raw(node.op, (), rank[i])
        else:
            of[i] = ex.mk(node.op, tuple(of[j] for j in node.inputs))
        if node.name and not _is_input(node):
            hint.setdefault(of[i], node.name)
    return ex, of[graph.output], hint


def equation(graph: Graph, max_inline: int = EQUATION_MAX_INLINE) -> str:
    """The loss as a readable formula, e.g. for DQN
    ``(select(q_tm1, a_tm1) - (r_t + discount_t * max(q_target_t)))^2``.

    Dead nodes are dropped, constants folded and trivial identities removed (``x * 1``,
    ``x + 0``, ``x - x``, ``0.1 * (0.5 * x)``, ``abs(x^2)`` ...): a readable form, not a
    computer-algebra normal form. ``max(v)``/``min(v)`` of one argument reduce over actions,
    ``max(x, y)`` is elementwise; ``normal_k``/``uniform_k`` are the noise nodes. When the
    inlined formula would exceed ``max_inline`` characters, subexpressions used more than
    once are named (by their node's id where it has one) and defined after ``where``.
    """
    typecheck(graph)
    ex, root, hint = _build_exprs(graph)

    # Post-order over the distinct expressions, with how often each is used and (memoised)
    # roughly how long its inlined rendering is.
    post, parents, size, stack, seen = [], {}, {}, [(root, False)], set()
    while stack:
        e, done = stack.pop()
        if done:
            op, args, value = ex.items[e]
            own = len(str(value)) if op in ("var", "const") else 8
            size[e] = own + sum(size[a] + 2 for a in args)
            post.append(e)
            continue
        if e in seen:
            continue
        seen.add(e)
        stack.append((e, True))
        for a in ex.items[e][1]:
            parents[a] = parents.get(a, 0) + 1
            stack.append((a, False))
    if size[root] <= max_inline:
        return _render(ex, root, {})
    names: dict[int, str] = {}
    taken = set(INPUTS)
    for e in post:
        op = ex.items[e][0]
        if e != root and parents.get(e, 0) > 1 and op not in ("var", "const", *NOISE_OPS):
            name = hint.get(e)
            if not name or name in taken:
                name = next(f"t{k}" for k in range(1, len(post) + 2) if f"t{k}" not in taken)
            taken.add(name)
            names[e] = name
    defs = [f"{names[e]} = {_render(ex, e, names)}" for e in post if e in names]
    return _render(ex, root, names) + ("  where " + "; ".join(defs) if defs else "")


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


# ----------------------------------------------------------------------------------- library

LIBRARY_DIR = Path(__file__).with_name("graph_library")


@functools.lru_cache(maxsize=1)
def _library() -> tuple[tuple[str, Graph], ...]:
    out = []
    for path in sorted(LIBRARY_DIR.glob("*.yaml")):
        graph = load_graph(path)
        if graph.name != path.stem:
            raise GraphError(f"{path}: name {graph.name!r} differs from the file name")
        typecheck(graph)
        out.append((path.stem, graph))
    return tuple(out)


def library() -> dict[str, Graph]:
    """The shipped graphs (``metabench/graph_library/*.yaml``) by name: dqn, dqn_reg,
    dqn_clipped (DQNReg and DQNClipped are the losses Co-Reyes et al. 2021 evolved)."""
    return dict(_library())


def library_rule(name: str) -> UpdateRule:
    """The compiled rule of a library graph."""
    graphs = library()
    if name not in graphs:
        raise KeyError(f"no library graph {name!r}; available: {', '.join(graphs)}")
    return compile_graph(graphs[name])


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
                         "graphs.encode(graph, max_nodes)")

    return UpdateRule(init=init, apply=apply)
