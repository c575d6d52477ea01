"""The ``null_<family>`` controls: every family has one, and it gives its agent no learning
signal (a zero gradient, or targets that leave the agent where it is)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metabench.families import drift, get_family, lpg, metagrad
from metabench.families.base import families

M = lpg.PRED_DIM


def test_every_family_has_exactly_one_control_named_after_it():
    for name in families():
        fam = get_family(name)
        controls = [r for r, info in fam.reference_rules.items() if info.control]
        assert controls == [f"null_{name}"], name
        assert fam.baseline not in controls
        assert "control" in fam.reference_rules[controls[0]].description


def test_null_drift_leaves_the_policy_objective_without_a_gradient():
    def x(log_ratio, advantage):
        return drift.Inputs(ratio=jnp.exp(log_ratio), log_ratio=log_ratio, advantage=advantage)

    k = jax.random.split(jax.random.PRNGKey(0), 2)
    adv = jax.random.normal(k[0], (64,))
    log_ratio = 0.3 * jax.random.normal(k[1], (64,))
    rule = drift.null_drift()

    def objective(log_ratio):
        inp = x(log_ratio, adv)
        return jnp.mean(inp.ratio * inp.advantage - rule.apply({}, inp))

    g = jax.grad(objective)(log_ratio)
    assert float(jnp.max(jnp.abs(g))) == 0.0
    # while PPO-clip's objective has one at the same inputs
    ppo = drift.ppo_clip()
    g_ppo = jax.grad(lambda lr: jnp.mean(jnp.exp(lr) * adv - ppo.apply({}, x(lr, adv))))(
        log_ratio)
    assert float(jnp.max(jnp.abs(g_ppo))) > 1e-3


def test_null_metagrad_returns_the_critics_value():
    x = metagrad.random_inputs(jax.random.PRNGKey(0))
    out = metagrad.null_metagrad().apply({}, x)
    np.testing.assert_array_equal(out.g, x.value)  # advantage g - v = 0, critic target v
    assert out.eta == {}
    moved = x._replace(reward=x.reward + 10.0)  # rewards never reach it
    np.testing.assert_array_equal(metagrad.null_metagrad().apply({}, moved).g, x.value)


def test_null_lpg_leaves_a_tabular_agent_exactly_where_it_was():
    from metabench.envs import make

    env, params = make("chain/short")
    cfg = lpg.Config(num_envs=4, rollout_len=8, lr=4.0, optimiser="sgd", network="tabular",
                     ent_coef=0.0)
    agent = lpg.make_agent(env, cfg, lpg.null_lpg(), sample_params=lambda _: params)
    state = agent.init(jax.random.PRNGKey(0))
    state, traj, _ = agent.rollout(state)
    new, _, out = agent.update(state, {}, traj)
    assert float(jnp.max(jnp.abs(out.pi_hat))) == 0.0
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                   new.params, state.params)
    assert max(jax.tree_util.tree_leaves(moved)) < 1e-6


@pytest.mark.parametrize("family", ["drift", "metagrad", "lpg"])
def test_controls_pass_the_required_checks(family):
    fam = get_family(family)
    info = fam.reference_rules[f"null_{family}"]
    rule = info.factory()
    assert fam.check(rule, rule.init(jax.random.PRNGKey(0)), info.name).passed


def test_the_control_baselines_are_submissions_marked_as_controls():
    from pathlib import Path

    from metabench import submissions

    root = Path(__file__).resolve().parents[1] / "submissions" / "baselines"
    for name in families():
        sub = submissions.load(root / f"null_{name}")
        assert sub.control and sub.metadata()["control"] is True
        assert sub.family == name
    assert not submissions.load(root / "ppo_clip").control


def test_a_baseline_is_marked_by_its_rule_not_by_its_folder(tmp_path):
    """Every shipped baseline folder is a reference rule as the project ships it; the same
    rule copied anywhere is one too, and a retuned or re-parameterised copy is not."""
    import shutil
    from pathlib import Path

    from metabench import submissions

    root = Path(__file__).resolve().parents[1] / "submissions" / "baselines"
    for folder in sorted(p for p in root.iterdir() if (p / "submission.yaml").exists()):
        assert submissions.load(folder).reference, folder.name
    copy = tmp_path / "elsewhere" / "my_ppo"
    shutil.copytree(root / "ppo_clip", copy)
    assert submissions.load(copy).reference
    text = (copy / "submission.yaml").read_text()
    (copy / "submission.yaml").write_text(text.replace("{epsilon: 0.2}", "{epsilon: 0.3}"))
    assert not submissions.load(copy).reference
    (copy / "submission.yaml").write_text(text.replace("{epsilon: 0.2}", "{epsilon: 0.2, "
                                                       "typo: 1}"))
    assert not submissions.load(copy).reference
