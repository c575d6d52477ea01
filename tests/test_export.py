"""A rule crosses to the scorer as exported functions (jax.export): per family, training with
the export of the family's baseline gives the same scores as training with the rule itself;
the wrapper vmaps, nests and differentiates as the families need; and the loader refuses
what a tampering build could leave behind."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import write_task
from metabench import harness
from metabench.families import base as families_base
from metabench.rules import UpdateRule
from metabench.submissions import export
from metabench.tasks import spec
from test_family_contract import CONTRACT_TASK

BASELINES = sorted((f, families_base.get_family(f).baseline) for f in families_base.families())


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return spec.load(write_task(tmp_path_factory.mktemp("export"), CONTRACT_TASK, "contract"),
                     calibration={})


def _exported(ref, task, folder):
    fam = families_base.get_family(ref.family)
    sigs = export.call_signatures(ref.family, ref.rule, ref.meta_params, task, "test")
    export.export_rule(ref.rule, ref.meta_params, sigs, fam.rule_vjp_order, ["cpu"], folder)
    loaded = export.load(folder, ref.family, "cpu")
    return loaded, harness.RuleRef(ref.name, ref.family, loaded.rule, loaded.meta_params,
                                   ref.factory, ref.kwargs, ref.note)


@pytest.mark.parametrize("family,rule", BASELINES, ids=[f for f, _ in BASELINES])
def test_an_exported_rule_scores_as_the_rule_itself(task, tmp_path, family, rule):
    ref = harness.reference_rule(rule)
    loaded, eref = _exported(ref, task, tmp_path)
    assert loaded.vjp_order == (2 if family == "metagrad" else 1)
    assert loaded.params_hash == harness.rule_block(ref)["params_hash"]
    env = task.test[0]
    a = harness.train_env(ref, task, env, [0, 1])
    b = harness.train_env(eref, task, env, [0, 1])
    assert a.failure is None and b.failure is None, b.failure
    part_a, part_b = (harness.env_part(r, task.scoring.window) for r in (a, b))
    # The record's runs (returns, scores, episodes) are identical; the per-update losses
    # agree to float32 rounding (XLA fuses the inlined exported call a little differently).
    assert [r["score"] for r in part_a["runs"]] == [r["score"] for r in part_b["runs"]]
    assert np.array_equal(a.returns_sum, b.returns_sum)
    assert np.array_equal(a.episodes, b.episodes)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-4, atol=1e-5)


def _toy():
    def apply(mp, x):
        a, n = x
        return {"y": jnp.tanh(mp["w"] * a) * (n + 1), "s": jnp.sum(mp["w"] * a ** 2)}

    return UpdateRule(lambda rng: {"w": jnp.float32(0.7)}, apply)


def test_the_wrapper_vmaps_nests_and_differentiates_twice(tmp_path):
    rule = _toy()
    mp = rule.init(None)
    x = (jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32), jnp.arange(5, dtype=jnp.int32))
    sigs = {export.Signature.of(x): jax.tree_util.tree_structure(x)}
    export.export_rule(rule, mp, sigs, 2, ["cpu"], tmp_path)
    (tmp_path / "meta_params.npz").unlink()  # the scorer's meta-parameters are its own
    np.savez(tmp_path / "meta_params.npz", leaf_0000=np.float32(0.7))
    exp_apply = export.load(tmp_path, "metagrad", "cpu").rule.apply

    def both(fn, w):
        return fn((w,), x) if fn is exp_apply else fn({"w": w}, x)

    def loss(fn, w, a):
        out = fn((w,), (a, x[1])) if fn is exp_apply else fn({"w": w}, (a, x[1]))
        return jnp.sum(out["y"]) + out["s"]

    ws = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], jnp.float32)
    nested = [jax.vmap(jax.vmap(lambda w, f=f: both(f, w)["s"]))(ws)
              for f in (rule.apply, exp_apply)]
    np.testing.assert_allclose(nested[0], nested[1], rtol=1e-6)
    grads = [jax.grad(lambda a, f=f: loss(f, 0.7, a))(x[0]) for f in (rule.apply, exp_apply)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)
    second = [jax.jit(jax.vmap(jax.grad(lambda w, f=f: jnp.sum(
        jax.grad(lambda a: loss(f, w, a))(x[0]) ** 2))))(jnp.array([0.3, 0.7]))
        for f in (rule.apply, exp_apply)]
    np.testing.assert_allclose(second[0], second[1], rtol=1e-5)
    with pytest.raises(ValueError, match="exported for inputs"):
        exp_apply((jnp.float32(0.7),), (x[0][:3], x[1][:3]))


def test_the_loader_refuses_what_a_tampering_build_leaves(task, tmp_path):
    ref = harness.reference_rule("ppo_clip")
    folder = tmp_path / "e"
    folder.mkdir()
    _exported(ref, task, folder)
    manifest = json.loads((folder / "export.json").read_text())

    def refused(match, edit):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        for p in folder.iterdir():
            (bad / p.name).write_bytes(p.read_bytes())
        edit(bad)
        with pytest.raises(ValueError, match=match):
            export.load(bad, "drift", "cpu")

    def set_manifest(**kw):
        return lambda d: (d / "export.json").write_text(json.dumps({**manifest, **kw}))

    refused("vjp_order 0, the drift family needs 1", set_manifest(vjp_order=0))
    refused("bad forward file name", set_manifest(functions=[
        {**manifest["functions"][0], "forward": "../../etc/passwd"}]))
    refused("grads must list the inexact arguments", set_manifest(functions=[
        {**manifest["functions"][0], "grads": [99]}]))
    refused("not a serialized jax.export function",
            lambda d: (d / "forward-0.bin").write_bytes(b"not flatbuffers"))
    refused("leaf_0000, leaf_0001, ... only",
            lambda d: np.savez(d / "meta_params.npz", other=np.zeros(2)))
    refused("not the meta-parameters and inputs", set_manifest(functions=[
        {**manifest["functions"][0], "inputs": {"tree": "x", "leaves": [[[3], "float32"]]}}]))
    # A hand-made module (the build's code could write any bytes) that calls a custom call
    # outside JAX's stable list, or talks to the host, is refused.
    class Module:
        def __init__(self, text):
            self.text = text

        def mlir_module(self):
            return self.text

    allowed = export._allowed_targets()
    with pytest.raises(ValueError, match="not a custom call JAX guarantees stable"):
        export._check_module(Module('%0 = stablehlo.custom_call @evil_target(%arg0)'),
                             "evil.bin", allowed)
    with pytest.raises(ValueError, match="talks to the host"):
        export._check_module(Module('%1 = "stablehlo.outfeed"(%0, %t)'), "evil.bin", allowed)
    export._check_module(Module('%0 = stablehlo.custom_call @Sharding(%arg0)'), "ok", allowed)


def test_bench_export_row_trains_both_paths_alike():
    from metabench import bench

    row = bench.export_row("gymnax/CartPole-v1", 4096, "ppo", repeats=1)
    assert row["rule"] == "ppo_clip" and row["same_returns"] is True
    assert row["in_process_steps_per_s"] > 0 and row["exported_steps_per_s"] > 0
    assert "ppo_clip" in bench.format_export_table([row])
