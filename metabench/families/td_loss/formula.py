"""A loss graph as a readable formula: :func:`equation`.

Records, the evolution log and a submission's check print a graph's loss this way, e.g. DQN as
``(select(q_tm1, a_tm1) - (r_t + discount_t * max(q_target_t)))^2``. The language printed is
:mod:`metabench.families.td_loss.graph`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from metabench.families.td_loss.graph import (INPUT_PREFIX, INPUTS, NOISE_OPS, OPS, Graph,
                                              _is_input, live_nodes, typecheck)

__all__ = ["EQUATION_MAX_INLINE", "equation"]


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
