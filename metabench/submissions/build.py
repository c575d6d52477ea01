"""Building a submission's rule from its folder: the reference factory, the loss graph or
``rule.py``'s entry point, with its parameters loaded and checked against the rule's
``init`` structure; and the one stacked rule that trains several submissions together.

This imports submitted code: only the isolated child processes of
:mod:`metabench.submissions.isolate` call it (and tests), so that a rule that crashes,
hangs or exhausts memory harms nothing but its own record.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Sequence

from metabench.params_io import load_params, tree_signature
from metabench.submissions.schema import SUBMISSION_FILE, Submission, SubmissionError, _inside


def build_rule(sub: Submission):
    """The submission's :class:`~metabench.harness.RuleRef`: imports the entry point, loads
    and verifies the parameters against the rule's ``init`` structure."""
    import jax

    from metabench import harness
    from metabench.families import base as families_base
    from metabench.rules import UpdateRule

    file = sub.path / SUBMISSION_FILE
    note = ""
    if sub.factory is not None:
        info = families_base.get_family(sub.family).reference_rules[sub.factory]
        rule = info.factory(**sub.kwargs)
        origin = f"{sub.family}.{info.factory.__name__}"
        default = info.default_params
    elif sub.entry.startswith("graph:"):
        from metabench.families import td_loss

        rel = sub.entry.split(":", 1)[1]
        graph = td_loss.load_graph(_inside(sub.path, rel, file, "rule.graph"))
        td_loss.typecheck(graph)
        rule, origin, default = td_loss.compile_graph(graph), sub.entry, None
        note = f"loss graph: {td_loss.equation(graph)}"
    else:
        rel, fn_name = sub.entry.split(":")
        path = _inside(sub.path, rel, file, "rule.entry")
        spec = importlib.util.spec_from_file_location(f"metabench_submission_{sub.slug}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(sub.path.resolve()))  # let rule.py import its siblings
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(sub.path.resolve()))
        if not hasattr(module, fn_name):
            raise SubmissionError(file, "rule.entry", f"{rel} to define {fn_name}()")
        rule = getattr(module, fn_name)(**sub.kwargs)
        origin, default = sub.entry, None
        if not isinstance(rule, UpdateRule):
            if isinstance(rule, tuple) and len(rule) == 2 and all(map(callable, rule)):
                rule = UpdateRule(*rule)
            else:
                raise SubmissionError(file, "rule.entry", f"{fn_name}() to return an "
                                      f"UpdateRule(init, apply), got {type(rule).__name__}")
    init_params = rule.init(jax.random.PRNGKey(0))
    if sub.params_file is not None:
        meta_params = load_params(sub.path / sub.params_file)
        want, got = tree_signature(init_params), tree_signature(meta_params)
        if want != got:
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            shape = sorted(k for k in set(want) & set(got) if want[k] != got[k])
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:5])}")
            if extra:
                parts.append(f"unexpected {', '.join(extra[:5])}")
            if shape:
                parts.append(", ".join(f"{k} has shape {got[k][0]} {got[k][1]}, expected "
                                       f"{want[k][0]} {want[k][1]}" for k in shape[:5]))
            raise SubmissionError(file, "params.file", "parameters with the structure of the "
                                  f"rule's init(); {'; '.join(parts)}")
        meta_params = jax.tree_util.tree_map(lambda a, b: jax.numpy.asarray(b, a.dtype),
                                             init_params, meta_params)
    elif default is not None:
        meta_params, note = default(rule)
    else:
        meta_params = init_params
    return harness.RuleRef(sub.name, sub.family, rule, meta_params, origin,
                           tuple(sorted(sub.kwargs.items())), note)


# --- several submissions in one compiled call ----------------------------------------------


def batch_key(sub: Submission) -> tuple | None:
    """Submissions with equal keys compute one function of their meta-parameters, so they can
    train in one compiled call with their meta-parameters stacked: those built by the same
    reference factory with the same arguments, and loss graphs of one family (run through
    the graph interpreter, as ``discover evolve`` does). A ``rule.py`` is its authors' own
    code: it is always scored alone (None)."""
    if sub.factory is not None:
        return ("factory", sub.family, sub.factory,
                json.dumps(dict(sub.kwargs), sort_keys=True, default=str))
    if sub.entry is not None and sub.entry.startswith("graph:"):
        return ("graph", sub.family)
    return None


def batched_rule(subs: Sequence[Submission]):
    """``(refs, rule, meta_batch)``: each submission's own RuleRef (for its record), and the
    one rule with the stacked meta-parameters (leading axis = submission) that trains them
    all. Raises ValueError unless all share one :func:`batch_key`."""
    import jax
    import numpy as np

    keys = {batch_key(s) for s in subs}
    if len(keys) != 1 or None in keys:
        raise ValueError("a batch needs submissions of one batch key (one reference factory "
                         f"and arguments, or loss graphs of one family); got {sorted(map(str, keys))}")
    refs = [build_rule(s) for s in subs]
    if next(iter(keys))[0] == "graph":
        from metabench.families import td_loss

        loaded = [td_loss.load_graph(_inside(s.path, s.entry.split(":", 1)[1],
                                             s.path / SUBMISSION_FILE, "rule.graph"))
                  for s in subs]
        size = max(td_loss.live_size(g) for g in loaded)
        encoded = [td_loss.encode(g, size) for g in loaded]
        return refs, td_loss.interpreter_rule(), td_loss.EncodedGraph(
            *(np.stack(a) for a in zip(*encoded)))
    return refs, refs[0].rule, jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                                      *[r.meta_params for r in refs])
