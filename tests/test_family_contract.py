"""One contract for every family's reference rules (as optax tests every contributed
optimiser with one shared test): each rule passes its family's required checks and trains a
fresh agent through the harness for a few updates with finite metrics. A family added to the
registry, or a rule added to a family, is covered without writing a test for it."""

from __future__ import annotations

import numpy as np
import pytest

from metabench import harness
from metabench.families import base as families_base
from metabench.tasks import spec

from helpers import CARTPOLE_SPLITS, write_task

# Every family on CartPole at the smallest settings that still make a few real updates
# (td_loss: learning starts after 64 steps and updates every step after that).
CONTRACT_TASK = """
id: contract
total_timesteps: 2048
""" + CARTPOLE_SPLITS + """agents:
  drift: {num_envs: 4, rollout_len: 32, epochs: 1, minibatches: 1, hidden: [16, 16]}
  td_loss: {num_envs: 4, buffer_size: 512, batch_size: 32, learning_starts: 64,
            eps_decay_steps: 512, target_update_period: 64, hidden: [16, 16]}
  metagrad: {num_envs: 4, rollout_len: 16, hidden: [16, 16]}
  epg: {num_envs: 4, rollout_len: 16, buffer_len: 32, hidden: [16, 16]}
  lpg: {num_envs: 4, rollout_len: 16, network: mlp, hidden: [16, 16]}
budget: {seeds: 1, max_seconds_per_env: 600}
scoring: {baselines: {drift: ppo_clip, td_loss: dqn, metagrad: a2c_fixed, epg: reinforce,
                      lpg: actor_critic}}
"""

RULES = sorted((fam, rule) for fam in families_base.families()
               for rule in families_base.get_family(fam).reference_rules)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return spec.load(write_task(tmp_path_factory.mktemp("contract"), CONTRACT_TASK,
                                "contract"), calibration={})


def test_the_contract_covers_every_family():
    assert {f for f, _ in RULES} == set(families_base.families())
    assert len(RULES) >= 20


@pytest.mark.parametrize("family,rule", RULES, ids=[f"{f}/{r}" for f, r in RULES])
def test_reference_rule_passes_its_checks_and_trains(task, family, rule):
    ref = harness.reference_rule(rule)
    assert ref.family == family
    report = families_base.get_family(family).check(ref.rule, ref.meta_params, rule)
    assert report.passed, report.format()
    run = harness.train_env(ref, task, task.test[0], [0])
    assert run.failure is None, run.failure
    assert run.num_updates >= 4 and run.returns_sum.shape == (1, run.num_updates)
    assert np.all(np.isfinite(run.returns_sum)) and np.all(np.isfinite(run.loss))
    assert run.episodes.sum() > 0  # CartPole episodes end: the agent acted in the env


def test_every_family_refuses_a_budget_below_one_update():
    assert families_base.update_count(100, 4, 8) == (32, 3)
    with pytest.raises(ValueError, match=r"total_timesteps \(10\) is smaller than one update "
                                         r"\(32 = num_envs x rollout_len\)"):
        families_base.update_count(10, 4, 8)
    with pytest.raises(ValueError, match=r"\(4 env steps\)"):
        families_base.update_count(2, 4)
