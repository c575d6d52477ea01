"""Tests for the standalone reference EPG agent (REINFORCE) in ``metabench.minimal_epg``."""

import dataclasses
import inspect

import pytest

from metabench.families import epg
from metabench.minimal_epg import Config


def test_config_defaults_match_the_epg_family():
    """The yardstick trains what the harness trains: the family's agent defaults, and the
    reinforce rule's defaults for the loss's coefficients."""
    c = Config()
    family = epg.Config()
    shared = {f.name for f in dataclasses.fields(Config)} & {
        f.name for f in dataclasses.fields(epg.Config)}
    assert shared >= {"num_envs", "rollout_len", "epochs", "minibatches", "lr", "anneal_lr",
                      "max_grad_norm", "hidden", "activation"}
    for name in sorted(shared):
        assert tuple(getattr(c, name)) == family.hidden if name == "hidden" else (
            getattr(c, name) == getattr(family, name)), name
    rule = inspect.signature(epg.reinforce).parameters
    for name in ("gamma", "ent_coef", "vf_coef"):
        assert getattr(c, name) == rule[name].default, name
    assert c.memory_dim == epg.MEMORY_DIM
    assert family.network == "mlp"  # the only torso the minimal implementation has
    assert c.num_updates == 100_000 // (16 * 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_envs = 8  # type: ignore[misc]
