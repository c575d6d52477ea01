"""Shared fixtures: small task specs written to a temporary folder."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

# Many tests compile the same programs in separate processes (the CLI's and the scoring
# children's): one XLA compilation cache for the session (inherited by the children) compiles
# each once. Set before anything imports jax; a developer's own cache dir is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="metabench-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

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
scoring: {{bootstrap_reps: 200, baselines: {{drift: ppo_clip}}}}
"""


def write_task(folder: Path, text: str, name: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tiny_task_path(tmp_path) -> Path:
    return write_task(tmp_path, TINY_TASK.format(steps=4096))
