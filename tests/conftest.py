"""Shared fixtures: small task specs written to a temporary folder."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

TINY_TASK = """
id: tiny
description: a tiny CartPole task for tests
total_timesteps: {steps}
seed: 0
train:
  - env: gymnax/CartPole-v1
    normalise: {{random: 22.0, reference: 500.0}}
test:
  - env: gymnax/CartPole-v1
    normalise: {{random: 22.0, reference: 500.0}}
  - env: gymnax/CartPole-v1
    name: CartPole-long-pole
    params: {{length: {{uniform: [0.5, 1.0]}}}}
    normalise: {{random: 22.0, reference: 500.0}}
agents:
  drift: {{num_envs: 4, rollout_len: 32, epochs: 2, minibatches: 2}}
budget: {{seeds: 2, max_seconds_per_env: 600}}
scoring: {{bootstrap_reps: 200}}
"""


def write_task(folder: Path, text: str, name: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tiny_task_path(tmp_path) -> Path:
    return write_task(tmp_path, TINY_TASK.format(steps=4096))
