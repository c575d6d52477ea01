"""The YAML form of a loss graph, and the library of shipped graphs.

A submission writes its ``td_loss`` rule as a graph in YAML (``rule.graph``), evolution
writes the graphs it finds the same way, and ``metabench/families/td_loss/library/*.yaml``
holds DQN, DQNReg and DQNClipped: :func:`load_graph` reads that form (checking structure as it
goes, naming the node at fault), :func:`dump_graph` writes it back exactly, and
:func:`library` / :func:`library_rule` are the shipped graphs and their compiled rules. The
language itself is :mod:`metabench.families.td_loss.graph`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from metabench.families.td_loss.evaluate import compile_graph
from metabench.families.td_loss.graph import (INPUT_PREFIX, INPUTS, OPS, Graph, GraphError,
                                              Node, _is_input, input_node, typecheck)
from metabench.rules import UpdateRule

__all__ = ["LIBRARY_DIR", "dump_graph", "library", "library_rule", "load_graph"]


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


# ----------------------------------------------------------------------------------- library

LIBRARY_DIR = Path(__file__).with_name("library")


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
    """The shipped graphs (``metabench/families/td_loss/library/*.yaml``) by name: dqn, dqn_reg,
    dqn_clipped (DQNReg and DQNClipped are the losses Co-Reyes et al. 2021 evolved)."""
    return dict(_library())


def library_rule(name: str) -> UpdateRule:
    """The compiled rule of a library graph."""
    graphs = library()
    if name not in graphs:
        raise KeyError(f"no library graph {name!r}; available: {', '.join(graphs)}")
    return compile_graph(graphs[name])
