"""A submitted rule crosses from its sandbox to the scorer as compiled functions and data.

The sandboxed build process (:mod:`metabench.submissions.isolate`) imports the submission,
builds its rule, and records every shape its ``apply`` is called with while a task's agents
train (by tracing each env's training step abstractly). It exports ``apply`` once per
signature with :mod:`jax.export` — concrete shapes for the env, a symbolic leading batch
dimension over the meta-parameters and inputs, and the VJPs the family's training needs —
and writes the serialized functions, the meta-parameters as flat arrays and a manifest to
its scratch directory. The scoring process reads that folder with :func:`load` and trains
with an :class:`~metabench.rules.UpdateRule` whose ``apply`` calls the exported functions: it
never imports the submission.

Everything in the folder was written by a process that ran submitted code, so :func:`load`
treats it as untrusted data: sizes are bounded, the manifest is validated, every function's
argument shapes must be the recorded ones, and a function that calls into anything but the
custom calls JAX itself guarantees stable is refused.

Three facts of jax 0.10.2 shape the wrapper (:func:`_differentiable`): ``Exported.call`` has
no batching rule, so the call is wrapped in :func:`jax.custom_batching.custom_vmap`, whose
rule folds the vmapped axis into the symbolic leading dimension (so nested vmaps work); a
``custom_vmap`` function cannot be differentiated in reverse mode, so a
:func:`jax.custom_vjp` wraps it, its backward pass the exported VJP (called with the flat
primals followed by the output cotangents); and for a second derivative the forward and
backward passes must themselves be differentiable, one order lower.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

MANIFEST = "export.json"
FORMAT = 1
MAX_FUNCTIONS = 64
"""More distinct call shapes than any family's training has (each env adds one or two)."""
MAX_BYTES = 256 * 2**20
"""Bound on the folder's total size: the scorer reads it into memory."""


class Signature(NamedTuple):
    """One ``apply`` call's inputs: their tree structure and each leaf's shape and dtype
    (the meta-parameters are the same for every call)."""

    tree: str
    inputs: tuple[tuple[tuple[int, ...], str], ...]

    @staticmethod
    def of(inputs: Any) -> "Signature":
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(inputs)
        return Signature(str(treedef), tuple(
            (tuple(int(d) for d in np.shape(x)), str(np.dtype(x.dtype))) for x in leaves))

    def to_json(self) -> dict:
        return {"tree": self.tree, "leaves": [[list(s), d] for s, d in self.inputs]}

    @staticmethod
    def from_json(data: Any) -> "Signature":
        if (not isinstance(data, dict) or not isinstance(data.get("tree"), str)
                or not isinstance(data.get("leaves"), list)):
            raise ValueError("a signature must be {tree, leaves: [[shape, dtype], ...]}")
        out = []
        for item in data["leaves"]:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], list)
                    or not all(isinstance(d, int) and 0 <= d < 2**31 for d in item[0])
                    or not isinstance(item[1], str)):
                raise ValueError(f"bad [shape, dtype] pair {str(item)[:80]!r}")
            out.append((tuple(item[0]), str(np.dtype(item[1]))))
        return Signature(data["tree"], tuple(out))


_REGISTERED: set[str] = set()


def _register_outputs() -> None:
    """Lets jax.export serialize the families' Outputs NamedTuples (by a stable name), so an
    exported function returns the type the family's training reads."""
    from jax import export

    from metabench.families import base as families_base

    for name in families_base.families():
        cls = families_base.get_family(name).Outputs
        if cls is not None and name not in _REGISTERED:
            export.register_namedtuple_serialization(
                cls, serialized_name=f"metabench.{name}.Outputs")
            _REGISTERED.add(name)


# --- the sandbox side ----------------------------------------------------------------------


def call_signatures(family: str, rule, meta_params, task, split: str) -> dict:
    """``{Signature: treedef}``: every distinct input signature of ``rule.apply`` while
    ``task``'s agents of ``family`` train on the envs of ``split``, found by tracing each
    env's training step abstractly (:func:`jax.eval_shape`: nothing runs or compiles)."""
    import jax

    from metabench.families import base as families_base
    from metabench.rules import UpdateRule
    from metabench.tasks import spec

    fam = families_base.get_family(family)
    seen: dict[Signature, Any] = {}

    def recording_apply(mp, inputs):
        seen.setdefault(Signature.of(inputs), jax.tree_util.tree_structure(inputs))
        return rule.apply(mp, inputs)

    recorder = UpdateRule(rule.init, recording_apply)
    for e in task.split(split):
        env, _, sampler = spec.make_env(e)
        try:
            trainer = fam.make_train(env, spec.agent_config(task, family, e), recorder,
                                     total_timesteps=task.total_timesteps,
                                     sample_params=sampler)
            jax.eval_shape(lambda k, mp: trainer.step(trainer.init(k), mp, 0),
                           jax.random.PRNGKey(0), meta_params)
        finally:
            if getattr(env, "release", None) is not None:
                env.release()
    return seen


def platforms() -> tuple[str, ...]:
    """What to export for: the CPU, and CUDA where JAX's CUDA plugin is installed (the
    sandboxed exporter itself runs on the CPU; the scorer may run on either)."""
    import importlib.util

    cuda = any(importlib.util.find_spec(m) is not None
               for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return ("cpu", "cuda") if cuda else ("cpu",)


def _leaf_specs(leaves: Sequence[Any], batch) -> list:
    import jax

    return [jax.ShapeDtypeStruct((batch,) + tuple(np.shape(x)), np.dtype(x.dtype))
            for x in leaves]


def _inexact(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.inexact)


def _used_arguments(fn, specs: Sequence[Any]) -> list[bool]:
    """Which arguments ``fn``'s outputs depend on at all (dead-code elimination of its
    jaxpr); all of them where that private function of JAX is missing."""
    import jax

    try:
        from jax._src.interpreters import partial_eval as pe

        closed = jax.make_jaxpr(fn)(*specs)
        return list(pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))[1])
    except Exception:  # a later JAX: every argument gets its cotangent (slower, same values)
        return [True] * len(specs)


def _pair(rule, treedef, n_meta: int, in_tree, specs: Sequence[Any]):
    """``(forward, backward, grads)`` for one signature: ``forward(*meta, *inputs) -> (out,
    residuals)``, ``backward(*residuals, *cotangents of the inexact outputs) -> cotangents
    of the arguments in ``grads``: ``jax.vjp`` split at its residuals, so the scorer's
    backward pass reuses the forward pass's work as JAX's own would (the exported VJP alone
    recomputes the forward). ``grads`` are the inexact arguments the rule reads: the others
    get a symbolic zero in the scorer, so what only feeds them is compiled away as it is for
    the rule in-process (EPG's re-evaluated history, for a rule that ignores it: without
    this its training ran at half speed)."""
    import jax

    info: dict[str, Any] = {}

    def flat_apply(*args):
        mp = jax.tree_util.tree_unflatten(treedef, args[:n_meta])
        return rule.apply(mp, jax.tree_util.tree_unflatten(in_tree, args[n_meta:]))

    used = _used_arguments(flat_apply, specs)
    grads = [i for i, (spec, u) in enumerate(zip(specs, used)) if u and _inexact(spec.dtype)]

    def forward(*args):
        out, vjp_fn = jax.vjp(flat_apply, *args)
        residuals, info["residuals"] = jax.tree_util.tree_flatten(vjp_fn)
        leaves, info["out_tree"] = jax.tree_util.tree_flatten(out)
        info["outs"] = [(np.shape(x), x.dtype) for x in leaves]
        return out, residuals

    def backward(*flat):
        n = len(flat) - sum(_inexact(d) for _, d in info["outs"])
        vjp_fn = jax.tree_util.tree_unflatten(info["residuals"], flat[:n])
        given = iter(flat[n:])
        cts = [next(given) if _inexact(d) else np.zeros(shape, jax.dtypes.float0)
               for shape, d in info["outs"]]
        cotangents = vjp_fn(jax.tree_util.tree_unflatten(info["out_tree"], cts))
        return [cotangents[i] for i in grads]

    return forward, backward, info, grads


def export_rule(rule, meta_params, signatures: dict, vjp_order: int,
                platforms: Sequence[str], out: Path) -> dict:
    """Exports ``rule.apply`` once per signature (``{Signature: treedef}``, as
    :func:`call_signatures` returns) into ``out``, as a forward and a backward function
    (:func:`_pair`), each carrying ``vjp_order - 1`` VJPs of its own; writes the
    meta-parameters and the manifest, and returns the manifest."""
    import jax
    from jax import export

    if vjp_order < 1:
        raise ValueError("vjp_order must be at least 1: every family differentiates its rule")
    _register_outputs()
    out = Path(out)
    leaves, treedef = jax.tree_util.tree_flatten(meta_params)
    leaves = [np.asarray(x) for x in leaves]
    (batch,) = export.symbolic_shape("b")
    functions = []
    for k, (sig, in_tree) in enumerate(signatures.items()):
        one = _leaf_specs(leaves, 1) + [jax.ShapeDtypeStruct((1,) + s, np.dtype(d))
                                        for s, d in sig.inputs]
        forward, backward, info, grads = _pair(
            rule, treedef, len(leaves), in_tree,
            [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in one])
        specs = _leaf_specs(leaves, batch) + [
            jax.ShapeDtypeStruct((batch,) + s, np.dtype(d)) for s, d in sig.inputs]
        try:
            fwd = export.export(jax.jit(jax.vmap(forward)), platforms=tuple(platforms))(*specs)
            n_out = len(info["outs"])
            bwd_specs = list(fwd.out_avals[n_out:]) + [
                jax.ShapeDtypeStruct((batch,) + tuple(shape), d)
                for shape, d in info["outs"] if _inexact(d)]
            bwd = export.export(jax.jit(jax.vmap(backward)), platforms=tuple(platforms))(
                *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in bwd_specs])
            blobs = [e.serialize(vjp_order=vjp_order - 1) for e in (fwd, bwd)]
        except Exception as e:
            raise ValueError(f"could not export the rule for inputs {sig.to_json()}: "
                             f"{type(e).__name__}: {e}") from e
        names = [f"forward-{k}.bin", f"backward-{k}.bin"]
        for name, blob in zip(names, blobs):
            (out / name).write_bytes(blob)
        functions.append({"forward": names[0], "backward": names[1], "inputs": sig.to_json(),
                          "grads": grads})
    np.savez(out / "meta_params.npz", **{f"leaf_{i:04d}": x for i, x in enumerate(leaves)})
    manifest = {"format": FORMAT, "vjp_order": int(vjp_order), "platforms": list(platforms),
                "treedef": str(treedef), "functions": functions}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return manifest


# --- the scoring side ----------------------------------------------------------------------


class Loaded(NamedTuple):
    """What :func:`load` returns: the rule (its ``apply`` calls exported code) and its
    meta-parameters as a tuple of arrays, plus the facts a record states."""

    rule: Any
    meta_params: tuple
    params_hash: str
    vjp_order: int
    signatures: list[Signature]


def _allowed_targets() -> set[str]:
    try:  # JAX's own list of the custom calls whose ABI it keeps stable
        from jax._src.export import _export

        return set(_export._CUSTOM_CALL_TARGETS_GUARANTEED_STABLE)
    except Exception:  # a later jax moved it: allow only what no rule needs to reach out
        return {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


_CUSTOM_CALL = re.compile(r'call_target_name\s*=\s*"([^"]*)"|stablehlo\.custom_call\s*@(\w+)')
_HOST_OPS = re.compile(r"\b(stablehlo|mhlo)\.(infeed|outfeed|send|recv)\b")


def _check_module(exp, where: str, allowed: set[str]) -> None:
    """Refuses a function whose code calls a custom call outside ``allowed`` (a host
    callback, or anything a hand-made module could name)."""
    text = exp.mlir_module()
    host = _HOST_OPS.search(text)
    if host:
        raise ValueError(f"{where}: the exported function uses {host.group(0)}, which talks "
                         "to the host")
    for m in _CUSTOM_CALL.finditer(text):
        target = m.group(1) or m.group(2)
        if target not in allowed:
            raise ValueError(f"{where}: the exported function calls {target!r}, which is not "
                             "a custom call JAX guarantees stable (a callback into the host?)")


def load(folder: str | Path, family: str, backend: str) -> Loaded:
    """Reads an export folder written by :func:`export_rule` in a sandbox, validating it as
    untrusted data; raises ValueError naming what is wrong."""
    import jax

    from metabench.families import base as families_base
    from metabench.rules import UpdateRule

    _register_outputs()
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()]
    total = sum(p.stat().st_size for p in files)
    if total > MAX_BYTES:
        raise ValueError(f"the exported rule is {total / 2**20:.0f} MiB; the limit is "
                         f"{MAX_BYTES / 2**20:.0f} MiB")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"no readable {MANIFEST} from the build: {e}") from None
    fam = families_base.get_family(family)
    want_order = fam.rule_vjp_order
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST} is not an export manifest of format {FORMAT}")
    if manifest.get("vjp_order") != want_order:
        raise ValueError(f"{MANIFEST}: vjp_order {manifest.get('vjp_order')!r}, the "
                         f"{family} family needs {want_order}")
    funcs = manifest.get("functions")
    if not isinstance(funcs, list) or not 1 <= len(funcs) <= MAX_FUNCTIONS:
        raise ValueError(f"{MANIFEST}: functions must be a list of 1 to {MAX_FUNCTIONS}")
    treedef = manifest.get("treedef")
    if not isinstance(treedef, str) or len(treedef) > 100_000:
        raise ValueError(f"{MANIFEST}: treedef must be a string")
    with np.load(folder / "meta_params.npz", allow_pickle=False) as z:
        names = sorted(z.files)
        if names != [f"leaf_{i:04d}" for i in range(len(names))]:
            raise ValueError("meta_params.npz must hold leaf_0000, leaf_0001, ... only")
        meta = tuple(np.asarray(z[n]) for n in names)
    for x in meta:
        if x.dtype.kind not in "biuf":
            raise ValueError(f"meta_params.npz: a leaf of dtype {x.dtype} (numbers only)")
    allowed = _allowed_targets()
    table: dict[Signature, Any] = {}
    for f in funcs:
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str)
                                              for k in ("forward", "backward")):
            raise ValueError(f"{MANIFEST}: each function needs a forward, a backward and its "
                             "inputs")
        sig = Signature.from_json(f.get("inputs"))
        fwd = _read_function(folder, f["forward"], "forward", backend, want_order - 1, allowed)
        bwd = _read_function(folder, f["backward"], "backward", backend, want_order - 1,
                             allowed)
        want = [((None,) + tuple(np.shape(x)), str(x.dtype)) for x in meta] + [
            ((None,) + s, d) for s, d in sig.inputs]
        if _shapes(fwd.in_avals) != want:
            raise ValueError(f"{f['forward']}: its arguments are not the meta-parameters and "
                             "inputs recorded for it, each with a symbolic leading batch axis")
        outs = jax.tree_util.tree_leaves(jax.tree_util.tree_unflatten(
            fwd.out_tree, range(len(fwd.out_avals)))[0])
        n_out = len(outs)
        res = _shapes(fwd.out_avals[n_out:])
        cts = [s for s in _shapes(fwd.out_avals[:n_out]) if _inexact(s[1])]
        grads = f.get("grads")
        if (not isinstance(grads, list) or grads != sorted(set(grads))
                or not all(isinstance(i, int) and 0 <= i < len(want) and _inexact(want[i][1])
                           for i in grads)):
            raise ValueError(f"{MANIFEST}: grads must list the inexact arguments' indices")
        if (_shapes(bwd.in_avals) != res + cts
                or _shapes(bwd.out_avals) != [want[i] for i in grads]):
            raise ValueError(f"{f['backward']}: its arguments and results are not the forward "
                             "function's residuals and cotangents")
        table[sig] = _rule_call(fwd, bwd, n_out, want_order, grads)

    def init(rng):
        return meta

    def apply(mp, inputs):
        leaves = jax.tree_util.tree_leaves(inputs)
        sig = Signature.of(inputs)
        if sig not in table:
            raise ValueError(f"the rule was exported for inputs {[s.to_json() for s in table]}"
                             f"; training called it with {sig.to_json()}")
        out = table[sig](*jax.tree_util.tree_leaves(mp), *leaves)
        return out

    return Loaded(UpdateRule(init, apply), meta, _hash(treedef, meta), want_order,
                  list(table))


def _shapes(avals) -> list:
    """``[((None, *shape), dtype)]``: an aval list with its symbolic batch axis as None; a
    leading axis that is not symbolic is refused."""
    out = []
    for a in avals:
        if a.ndim == 0 or isinstance(a.shape[0], int):
            raise ValueError("an exported function's arrays must all have a symbolic leading "
                             "batch axis")
        out.append(((None,) + tuple(a.shape[1:]), str(a.dtype)))
    return out


def _read_function(folder: Path, name: str, kind: str, backend: str, order: int,
                   allowed: set[str]):
    """One exported function of the folder, with its ``order`` VJPs, checked."""
    from jax import export

    if not re.fullmatch(rf"{kind}-\d+\.bin", name):
        raise ValueError(f"{MANIFEST}: bad {kind} file name {name[:80]!r}")
    try:
        exp = export.deserialize(bytearray((folder / name).read_bytes()))
    except Exception as e:
        raise ValueError(f"{name}: not a serialized jax.export function "
                         f"({type(e).__name__})") from None
    if backend not in exp.platforms:
        raise ValueError(f"{name}: exported for {', '.join(exp.platforms)}, scoring runs on "
                         f"{backend}")
    current = exp
    for level in range(order + 1):
        _check_module(current, name, allowed)
        if level < order:
            try:
                current = current.vjp()
            except Exception as e:
                raise ValueError(f"{name}: no VJP of order {level + 1} "
                                 f"({type(e).__name__}: {e})") from None
    return exp


def _hash(treedef: str, leaves: Sequence[np.ndarray]) -> str:
    from metabench.rules import leaves_hash

    return leaves_hash(treedef, leaves)


def _batched_call(exp):
    """``exp.call`` on arguments that all have a leading batch axis, vmappable: a vmapped
    axis is folded into that leading axis (``[n, b, ...] -> [n * b, ...]``)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_batching.custom_vmap
    def call(*args):
        return exp.call(*args)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, b in zip(args, in_batched)]
        inner = args[0].shape[1]
        outs = call(*[a.reshape((axis_size * a.shape[1],) + a.shape[2:]) for a in args])
        unfold = jax.tree_util.tree_map(
            lambda o: o.reshape((axis_size, inner) + o.shape[1:]), outs)
        return unfold, jax.tree_util.tree_map(lambda _: True, outs)

    return call


def _call(exp):
    """``exp`` called on unbatched arguments (a batch of one), vmappable."""
    import jax
    import jax.numpy as jnp

    call = _batched_call(exp)

    def one(*args):
        outs = call(*[jnp.asarray(a)[None] for a in args])
        return jax.tree_util.tree_map(lambda o: o[0], outs)

    return one


def _rule_call(fwd, bwd, n_out: int, order: int, grads: Sequence[int]):
    """The rule's apply from its exported forward and backward functions: vmappable, and
    differentiable in reverse mode ``order`` times, the first through ``bwd`` with the
    forward pass's residuals (as ``jax.vjp`` would), higher ones through their exported VJPs.
    Arguments outside ``grads`` get a symbolic zero cotangent (None)."""
    import jax
    import jax.numpy as jnp

    forward = _differentiable(fwd, order - 1)
    backward = _differentiable(bwd, order - 1)
    out_inexact = [_inexact(a.dtype) for a in fwd.out_avals[:n_out]]

    @jax.custom_vjp
    def f(*args):
        return forward(*args)[0]

    def f_fwd(*args):
        args = tuple(jnp.asarray(a) for a in args)
        out, residuals = forward(*args)
        return out, (residuals, args)

    def f_bwd(saved, cts):
        residuals, args = saved
        given = [c for c, keep in zip(jax.tree_util.tree_leaves(cts), out_inexact) if keep]
        got = dict(zip(grads, backward(*residuals, *given)))
        return tuple(got.get(i) for i in range(len(args)))

    f.defvjp(f_fwd, f_bwd)
    return f


def _differentiable(exp, order: int):
    """``exp`` as a function of unbatched flat arguments, vmappable and differentiable in
    reverse mode ``order`` times (``exp`` must carry that many VJPs)."""
    import jax
    import jax.numpy as jnp

    if order == 0:
        return _call(exp)
    forward = _differentiable(exp, order - 1)
    backward = _differentiable(exp.vjp(), order - 1)
    float0 = jax.dtypes.float0

    @jax.custom_vjp
    def f(*args):
        return forward(*args)

    def fwd(*args):
        args = tuple(jnp.asarray(a) for a in args)
        return forward(*args), args

    def bwd(args, cts):
        # The exported VJP takes a real cotangent for every output (zeros where JAX has a
        # symbolic zero of an integer output) and returns float0 for integer inputs, which
        # this custom_vjp must hand back as float0 zeros of the argument's shape.
        flat_cts, _ = jax.tree_util.tree_flatten(cts)
        flat_cts = [jnp.zeros(c.shape, a.dtype) if c.dtype == float0 else c
                    for c, a in zip(flat_cts, exp.out_avals)]
        grads = backward(*args, *flat_cts)
        return tuple(np.zeros(a.shape, float0)
                     if not jnp.issubdtype(a.dtype, jnp.inexact) else g
                     for g, a in zip(grads, args))

    f.defvjp(fwd, bwd)
    return f
