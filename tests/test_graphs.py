"""Typed computation graphs (the graph language of metabench.families.td_loss): library
formulas, YAML, types, compilation, equations, functional hashes and mutation."""

from __future__ import annotations

import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench.families import td_loss as G
from metabench.families.td_loss.graph import DIV_EPS, LOG_EPS
from metabench.rules import UpdateRule


class Inputs(NamedTuple):
    """The td_loss family's per-transition inputs (same fields, defined here on purpose:
    a graph rule must accept any object with these attributes)."""

    q_tm1: jax.Array
    a_tm1: jax.Array
    r_t: jax.Array
    discount_t: jax.Array
    q_t: jax.Array
    q_target_t: jax.Array


def random_inputs(seed: int, b: int = 32, a: int = 5, scale: float = 3.0) -> Inputs:
    rng = np.random.default_rng(seed)
    f = lambda *s: (scale * rng.normal(size=s)).astype(np.float32)  # noqa: E731
    return Inputs(q_tm1=f(b, a), a_tm1=rng.integers(0, a, b).astype(np.int32), r_t=f(b),
                  discount_t=(0.99 * (rng.random(b) > 0.2)).astype(np.float32),
                  q_t=f(b, a), q_target_t=f(b, a))


def numpy_library(x: Inputs) -> dict[str, np.ndarray]:
    x = Inputs(*(np.asarray(v, np.float64) for v in x))
    q = x.q_tm1[np.arange(len(x.a_tm1)), x.a_tm1.astype(int)]
    m = x.q_target_t.max(axis=1)
    y = x.r_t + x.discount_t * m
    d = q - y
    return {"dqn": d ** 2, "dqn_reg": d ** 2 + 0.1 * q,
            "dqn_clipped": np.maximum(q, d ** 2 + y) + np.maximum(q - y, x.discount_t * m ** 2)}


def g(text: str) -> G.Graph:
    return G.load_graph(text)


# --------------------------------------------------------------------------------- library


def test_library_has_the_three_rules_and_they_match_numpy():
    lib = G.library()
    assert set(lib) == {"dqn", "dqn_reg", "dqn_clipped"}
    for seed in range(3):
        x = random_inputs(seed)
        want = numpy_library(x)
        for name in lib:
            rule = G.library_rule(name)
            assert isinstance(rule, UpdateRule) and rule.init(jax.random.PRNGKey(0)) == {}
            got = np.asarray(rule.apply({}, x))
            assert got.shape == (32,)
            np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_library_on_a_hand_computed_example():
    # Q = q_tm1[0, 1] = 2; Y = 1 + 0.5 * max(3, 4) = 3; delta = -1.
    x = Inputs(q_tm1=np.array([[1.0, 2.0]], np.float32), a_tm1=np.array([1]),
               r_t=np.array([1.0], np.float32), discount_t=np.array([0.5], np.float32),
               q_t=np.array([[9.0, -9.0]], np.float32),
               q_target_t=np.array([[3.0, 4.0]], np.float32))
    assert float(G.library_rule("dqn").apply({}, x)[0]) == pytest.approx(1.0)
    assert float(G.library_rule("dqn_reg").apply({}, x)[0]) == pytest.approx(1.2)
    # max(2, 1 + 3) + max(-1, 0.5 * 16) = 4 + 8
    assert float(G.library_rule("dqn_clipped").apply({}, x)[0]) == pytest.approx(12.0)


def test_library_rule_unknown_name():
    with pytest.raises(KeyError, match="dqn_reg"):
        G.library_rule("nope")


def test_inputs_may_be_any_object_or_mapping_with_leading_dims():
    x = random_inputs(0)
    want = np.asarray(G.library_rule("dqn").apply({}, x))
    ns = types.SimpleNamespace(**x._asdict(), extra="ignored")
    np.testing.assert_array_equal(G.library_rule("dqn").apply({}, ns), want)
    np.testing.assert_array_equal(G.library_rule("dqn").apply({}, x._asdict()), want)
    tb = Inputs(*(np.reshape(v, (4, 8) + np.shape(v)[1:]) for v in x))
    got = G.library_rule("dqn").apply({}, tb)
    assert got.shape == (4, 8)
    np.testing.assert_allclose(np.ravel(got), want, rtol=1e-6)


# -------------------------------------------------------------------------------------- YAML


def test_yaml_round_trip_keeps_structure_and_names():
    for name, graph in G.library().items():
        text = G.dump_graph(graph)
        back = G.load_graph(text)
        assert back == graph and back.name == name
        assert [n.name for n in back.nodes] == [n.name for n in graph.nodes]
        assert G.dump_graph(back) == text


def test_yaml_inline_constants_and_generated_ids_round_trip():
    graph = g("""
        name: odd
        nodes:
          - {id: a, op: multiply, in: [0.25, r_t]}
          - {id: tiny, op: const, value: 1e-7}
          - {id: b, op: add, in: [a, tiny]}
          - {id: "null_", op: normal_noise}
          - {id: c, op: add, in: [b, null_]}
        output: c
    """)
    assert graph.nodes[len(G.INPUTS)] == G.Node("const", (), 0.25)
    assert graph.nodes[len(G.INPUTS) + 2].value == pytest.approx(1e-7)
    unnamed = G.Graph(tuple(n if n.op.startswith("input:") else G.Node(n.op, n.inputs, n.value)
                            for n in graph.nodes), graph.output, name="no names")
    for gr in (graph, unnamed):
        assert G.load_graph(G.dump_graph(gr)) == gr
    assert G.load_graph(G.dump_graph(unnamed)).name == "no names"


def test_load_graph_from_path(tmp_path):
    path = tmp_path / "loss.yaml"
    path.write_text(G.dump_graph(G.library()["dqn_reg"]))
    assert G.load_graph(path) == G.library()["dqn_reg"]
    assert G.load_graph(str(path)) == G.library()["dqn_reg"]


@pytest.mark.parametrize("text, message", [
    ("nodes: [{id: x, op: frobnicate, in: [r_t]}]\noutput: x", "node 'x': unknown op"),
    ("nodes: [{id: x, op: abs, in: [later]}]\noutput: x", "'later' is not an input or an earlier"),
    ("nodes: [{id: r_t, op: abs, in: [r_t]}]\noutput: r_t", "input name"),
    ("nodes: [{id: x, op: abs, in: [r_t, r_t]}]\noutput: x", "takes 1 inputs, got 2"),
    ("nodes: [{id: x, op: abs, in: [r_t], colour: red}]\noutput: x", "unknown keys ['colour']"),
    ("nodes: [{id: x, op: const}]\noutput: x", "needs a value"),
    ("nodes: [{id: x, op: abs, in: [r_t]}]\noutput: y", "output 'y' is not a node"),
    ("nodes: [{id: x, op: abs, in: [r_t]}]\noutput: x\nextra: 1", "unknown keys ['extra']"),
])
def test_load_graph_errors_name_the_problem(text, message):
    with pytest.raises(G.GraphError) as err:
        G.load_graph(text)
    assert message in str(err.value)


def test_graph_rejects_forward_references():
    nodes = (G.input_node("r_t"), G.Node("abs", (2,)), G.Node("abs", (0,)))
    with pytest.raises(G.GraphError, match="not an earlier node"):
        G.Graph(nodes, 2)


# ------------------------------------------------------------------------------------ types


def test_typecheck_names_the_offending_node():
    bad = g("""
        nodes:
          - {id: delta, op: subtract, in: [q_tm1, a_tm1]}
          - {id: loss, op: mean_list, in: [delta]}
        output: loss
    """)
    with pytest.raises(G.GraphTypeError) as err:
        G.typecheck(bad)
    msg = str(err.value)
    assert "node 'delta' (subtract): inputs (VECTOR, ACTION) not accepted" in msg
    assert "(SCALAR, SCALAR), (VECTOR, VECTOR), (VECTOR, SCALAR)" in msg
    with pytest.raises(G.GraphTypeError, match="'delta'"):
        G.compile_graph(bad)


def test_typecheck_output_must_be_scalar_and_prob_rules():
    with pytest.raises(G.GraphTypeError, match=r"output node 'p' \(softmax\) has type PROB"):
        G.typecheck(g("nodes: [{id: p, op: softmax, in: [q_t]}]\noutput: p"))
    with pytest.raises(G.GraphTypeError, match=r"node 'k' \(kl\): inputs \(VECTOR, VECTOR\)"):
        G.typecheck(g("nodes: [{id: k, op: kl, in: [q_t, q_tm1]}]\noutput: k"))
    # PROB is a VECTOR: reductions and select take it; kl and entropy need it.
    ok = g("""
        nodes:
          - {id: p, op: softmax, in: [q_tm1]}
          - {id: pa, op: select, in: [p, a_tm1]}
          - {id: h, op: entropy, in: [p]}
          - {id: s, op: add, in: [pa, h]}
        output: s
    """)
    assert G.typecheck(ok) is G.Type.SCALAR
    assert G.node_types(ok)[-4:] == (G.Type.PROB, G.Type.SCALAR, G.Type.SCALAR, G.Type.SCALAR)


def test_scalar_vector_broadcasting_types():
    graph = g("""
        nodes:
          - {id: v, op: subtract, in: [q_t, r_t]}
          - {id: w, op: multiply, in: [discount_t, v]}
          - {id: m, op: mean_list, in: [w]}
        output: m
    """)
    assert G.node_types(graph)[-3:] == (G.Type.VECTOR, G.Type.VECTOR, G.Type.SCALAR)
    x = random_inputs(1)
    want = np.mean(x.discount_t[:, None] * (x.q_t - x.r_t[:, None]), axis=1)
    np.testing.assert_allclose(G.compile_graph(graph).apply({}, x), want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- compiling


def test_compiled_rules_jit_and_differentiate():
    x = random_inputs(2, b=16, a=3)
    for name in G.library():
        rule = G.library_rule(name)
        np.testing.assert_allclose(jax.jit(rule.apply)({}, x), rule.apply({}, x), rtol=1e-6)
    rule = G.library_rule("dqn")
    grad = jax.grad(lambda q: jnp.mean(rule.apply({}, x._replace(q_tm1=q))))(x.q_tm1)
    q = x.q_tm1[np.arange(16), x.a_tm1]
    delta = q - (x.r_t + x.discount_t * x.q_target_t.max(1))
    want = np.zeros_like(x.q_tm1)
    want[np.arange(16), x.a_tm1] = 2 * delta / 16
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def _op_nodes():
    """Per (op, signature): YAML node lines applying the op to inputs of the needed types and
    reducing the result to a SCALAR, and the id of that SCALAR."""
    sources = {G.Type.SCALAR: ["r_t", "discount_t"], G.Type.VECTOR: ["q_tm1", "q_t"],
               G.Type.PROB: ["p1", "p2"], G.Type.ACTION: ["a_tm1", "a_tm1"]}
    k = 0
    for name, op in G.OPS.items():
        for ins, out in op.signatures:
            k += 1
            args = [sources[t][n % 2] for n, t in enumerate(ins)]
            value = ", value: 0.5" if name == "const" else ""
            lines = [f"  - {{id: x{k}, op: {name}, in: [{', '.join(args)}]{value}}}"]
            if out in (G.Type.VECTOR, G.Type.PROB):
                lines.append(f"  - {{id: y{k}, op: mean_list, in: [x{k}]}}")
            elif out is G.Type.ACTION:
                lines.append(f"  - {{id: y{k}, op: select, in: [q_tm1, x{k}]}}")
            else:
                lines.append(f"  - {{id: y{k}, op: abs, in: [x{k}]}}")
            yield f"{name}{tuple(str(t) for t in ins)}", lines, f"y{k}"


def _graph_of(parts) -> G.Graph:
    """One graph: every part's SCALAR added up, plus select(q_tm1, a_tm1) so that the
    gradient always reaches q_tm1. A non-finite value or gradient of any part makes the sum's
    value or gradient non-finite (inf and nan are contagious under addition)."""
    lines = ["  - {id: p1, op: softmax, in: [q_tm1]}", "  - {id: p2, op: softmax, in: [q_t]}",
             "  - {id: acc0, op: select, in: [q_tm1, a_tm1]}"]
    for n, (_, part, out) in enumerate(parts, start=1):
        lines += part + [f"  - {{id: acc{n}, op: add, in: [acc{n - 1}, {out}]}}"]
    return g("nodes:\n" + "\n".join(lines) + f"\noutput: acc{len(parts)}")


def extreme_inputs() -> Inputs:
    """Zeros, tiny and huge values of both signs, whole rows of each and mixed rows, in one
    batch (a rule is per transition, so one call covers them all)."""
    rng = np.random.default_rng(7)
    mags = np.array([0.0, 1e-12, 1e-6, 1.0, 1e6, 1e12], np.float32)
    a = 4
    pick = lambda *s: (rng.choice(mags, s) * rng.choice([-1, 1], s)).astype(np.float32)  # noqa
    parts = []
    for mag in (0.0, 1e-12, 1e12, -1e12, None):
        f = (lambda *s: np.full(s, mag, np.float32)) if mag is not None else pick  # noqa
        b = 8 if mag is not None else 40
        parts.append(Inputs(q_tm1=f(b, a), a_tm1=rng.integers(0, a, b).astype(np.int32),
                            r_t=f(b), discount_t=f(b), q_t=f(b, a), q_target_t=f(b, a)))
    return Inputs(*(np.concatenate(vs) for vs in zip(*parts)))


def _bad_rows(graph: G.Graph, x: Inputs, jit: bool = True) -> np.ndarray:
    rule = G.compile_graph(graph)

    def f(q):
        out, vjp = jax.vjp(lambda q: rule.apply({}, x._replace(q_tm1=q)), q)
        return out, vjp(jnp.ones_like(out) / out.shape[0])[0]

    out, grad = (jax.jit(f) if jit else f)(x.q_tm1)
    assert out.shape == (x.r_t.shape[0],)
    return ~np.isfinite(out) | ~np.all(np.isfinite(grad), axis=1)


def test_every_op_is_finite_with_finite_gradient_on_extreme_inputs():
    x = extreme_inputs()
    parts = list(_op_nodes())
    assert {label.split("(")[0] for label, _, _ in parts} == set(G.OPS)
    # All ops in one jitted graph (one compile, not ~50); on failure, find the culprit.
    if _bad_rows(_graph_of(parts), x).any():
        culprits = [label for label, *rest in parts
                    if _bad_rows(_graph_of([(label, *rest)]), x, jit=False).any()]
        pytest.fail(f"non-finite value or gradient on extreme inputs: {culprits}")


def test_safe_ops_values():
    x = Inputs(q_tm1=np.zeros((1, 2), np.float32), a_tm1=np.zeros(1, np.int32),
               r_t=np.array([3.0], np.float32), discount_t=np.array([0.0], np.float32),
               q_t=np.zeros((1, 2), np.float32), q_target_t=np.zeros((1, 2), np.float32))

    def run(op, *ins):
        graph = g(f"nodes: [{{id: y, op: {op}, in: [{', '.join(ins)}]}}]\noutput: y")
        return float(G.compile_graph(graph).apply({}, x)[0])

    assert run("div", "r_t", "discount_t") == pytest.approx(3.0 / DIV_EPS)
    assert run("log", "discount_t") == pytest.approx(np.log(LOG_EPS))
    assert run("exp", "r_t") == pytest.approx(np.exp(3.0))
    assert run("l2_distance", "q_t", "q_tm1") == 0.0
    h = g("nodes: [{id: p, op: softmax, in: [q_t]}, {id: h, op: entropy, in: [p]}]\noutput: h")
    assert float(G.compile_graph(h).apply({}, x)[0]) == pytest.approx(np.log(2.0))


def test_noise_is_fixed_without_rng_and_follows_rng_when_given():
    graph = g("""
        nodes:
          - {id: n, op: normal_noise}
          - {id: u, op: uniform_noise}
          - {id: s, op: add, in: [n, u]}
        output: s
    """)
    only_u = g("nodes: [{id: u, op: uniform_noise}]\noutput: u")
    x = random_inputs(3, b=2000)
    rule = G.compile_graph(graph)
    first, again = np.asarray(rule.apply({}, x)), np.asarray(rule.apply({}, x))
    np.testing.assert_array_equal(first, again)
    assert first.shape == (2000,)
    assert abs(first.mean() - 0.5) < 0.1 and 0.9 < first.std() < 1.2  # N(0,1) + U(0,1)
    u = np.asarray(G.compile_graph(only_u).apply({}, x))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.05
    with_rng = types.SimpleNamespace(**x._asdict(), rng=jax.random.PRNGKey(5))
    other = np.asarray(rule.apply({}, with_rng))
    assert not np.allclose(other, first)
    as_dict = {**x._asdict(), "rng": jax.random.PRNGKey(5)}
    np.testing.assert_allclose(jax.jit(rule.apply)({}, as_dict), other, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- equation


def test_library_equations_are_readable():
    eq = {name: G.equation(graph) for name, graph in G.library().items()}
    target = "r_t + discount_t * max(q_target_t)"
    assert eq["dqn"] == f"(select(q_tm1, a_tm1) - ({target}))^2"
    assert eq["dqn_reg"] == f"(select(q_tm1, a_tm1) - ({target}))^2 + 0.1 * select(q_tm1, a_tm1)"
    clipped = eq["dqn_clipped"]
    assert clipped.startswith(f"max(select(q_tm1, a_tm1), (select(q_tm1, a_tm1) - ({target}))^2")
    assert f"max(select(q_tm1, a_tm1) - ({target}), discount_t * max(q_target_t)^2)" in clipped
    assert "where" not in clipped and len(clipped) < 300


def test_equation_simplifies_and_drops_dead_nodes():
    graph = g("""
        nodes:
          - {id: dead, op: exp, in: [q_t]}
          - {id: q, op: select, in: [q_tm1, a_tm1]}
          - {id: a, op: multiply, in: [q, 1.0]}
          - {id: b, op: add, in: [a, 0.0]}
          - {id: zero, op: subtract, in: [r_t, r_t]}
          - {id: c, op: add, in: [b, zero]}
          - {id: half, op: multiply, in: [0.5, c]}
          - {id: d, op: multiply_tenth, in: [half]}
          - {id: k, op: add, in: [0.5, 0.2]}
          - {id: e, op: multiply, in: [discount_t, k]}
          - {id: f, op: subtract, in: [d, e]}
          - {id: sq, op: multiply, in: [f, f]}
          - {id: loss, op: abs, in: [sq]}
        output: loss
    """)
    assert G.equation(graph) == "(0.05 * select(q_tm1, a_tm1) - 0.7 * discount_t)^2"


def test_equation_names_shared_subexpressions_of_large_graphs():
    # Each node uses the previous one twice: inlined, the formula would double per node.
    lines = ["  - {id: x0, op: select, in: [q_tm1, a_tm1]}"]
    for k in range(1, 31):
        lines.append(f"  - {{id: l{k}, op: log, in: [x{k - 1}]}}")
        lines.append(f"  - {{id: x{k}, op: max, in: [x{k - 1}, l{k}]}}")
    graph = g("nodes:\n" + "\n".join(lines) + "\noutput: x30")
    eq = G.equation(graph)
    assert "where" in eq and len(eq) < 5000
    assert "x29 = max(x28, log(x28))" in eq and eq.startswith("max(x29, log(x29))")


# -------------------------------------------------------------------------- functional hash


def test_functional_hash_identifies_equal_functions():
    ab = g("nodes: [{id: q, op: select, in: [q_tm1, a_tm1]}, {id: s, op: add, in: [q, r_t]}]"
           "\noutput: s")
    ba = g("nodes: [{id: q, op: select, in: [q_tm1, a_tm1]}, {id: s, op: add, in: [r_t, q]}]"
           "\noutput: s")
    assert ab != ba and G.functional_hash(ab) == G.functional_hash(ba)
    # Re-association: (q + r) + d * m and q + (r + d * m) compute the same function.
    assoc = g("""
        nodes:
          - {id: q, op: select, in: [q_tm1, a_tm1]}
          - {id: m, op: max_list, in: [q_target_t]}
          - {id: dm, op: multiply, in: [discount_t, m]}
          - {id: y, op: add, in: [r_t, dm]}
          - {id: qy, op: add, in: [q, y]}
          - {id: qr, op: add, in: [q, r_t]}
          - {id: qr_dm, op: add, in: [qr, dm]}
        output: qy
    """)
    assoc2 = G.Graph(assoc.nodes, len(assoc.nodes) - 1)
    assert G.functional_hash(assoc) == G.functional_hash(assoc2)

    lib = G.library()
    dqn = lib["dqn"]
    with_dead = G.Graph(dqn.nodes[:-1] + (G.Node("exp", (4,)), dqn.nodes[-1]), dqn.output + 1)
    assert with_dead != dqn and G.functional_hash(with_dead) == G.functional_hash(dqn)
    hashes = {G.functional_hash(gr) for gr in lib.values()}
    assert len(hashes) == 3
    assert G.functional_hash(dqn) == G.functional_hash(G.load_graph(G.dump_graph(dqn)))


# --------------------------------------------------------------------------------- mutation


def test_mutations_are_type_correct_and_usually_change_the_function():
    rng = np.random.default_rng(0)
    dqn = G.library()["dqn"]
    base = G.functional_hash(dqn)
    changed, op_changes, rewires = 0, 0, 0
    x = random_inputs(4)
    for _ in range(200):
        child = G.mutate(dqn, rng)
        assert G.typecheck(child) is G.Type.SCALAR and child != dqn
        assert len(child.nodes) == len(dqn.nodes)
        diff = [i for i, (a, b) in enumerate(zip(dqn.nodes, child.nodes)) if a != b]
        assert len(diff) == 1  # one node changed
        i = diff[0]
        if child.nodes[i].op != dqn.nodes[i].op or child.nodes[i].value != dqn.nodes[i].value:
            op_changes += 1
        else:
            rewires += 1
        changed += G.functional_hash(child) != base
    assert changed >= 150, changed
    assert op_changes >= 40 and rewires >= 40
    # A chain of mutations stays type-correct, finite and round-trips through YAML.
    graph = dqn
    for step in range(200):
        graph = G.mutate(graph, rng)
        G.typecheck(graph)
        if step % 20 == 0:
            assert np.all(np.isfinite(G.compile_graph(graph).apply({}, x)))
            assert G.load_graph(G.dump_graph(graph)) == graph
            assert isinstance(G.equation(graph), str)


def test_random_graphs_are_type_correct():
    rng = np.random.default_rng(1)
    x = random_inputs(5)
    for _ in range(25):
        graph = G.random_graph(rng, int(rng.integers(1, 15)))
        assert G.typecheck(graph) is G.Type.SCALAR
        assert np.all(np.isfinite(G.compile_graph(graph).apply({}, x)))
        assert G.load_graph(G.dump_graph(graph)) == graph
        G.equation(graph)
        G.mutate(graph, rng)


def test_equation_does_not_fold_ops_that_depend_on_the_action_count():
    # q_t - q_t is a constant *vector*: softmax of it is 1/A, not 1, and argmax of it is an
    # action, so neither may be folded into a number.
    g = G.load_graph("""
nodes:
  - {id: z, op: subtract, in: [q_t, q_t]}
  - {id: p, op: softmax, in: [z]}
  - {id: h, op: entropy, in: [p]}
  - {id: a, op: argmax_list, in: [z]}
  - {id: s, op: select, in: [q_tm1, a]}
  - {id: loss, op: add, in: [h, s]}
output: loss
""")
    eq = G.equation(g)
    assert "entropy(softmax(0))" in eq and "argmax(0)" in eq, eq
