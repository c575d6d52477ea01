"""The seed axis sharded over several devices (jax.sharding) gives the one-device results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from metabench import harness
from tests.helpers import TINY_TASK, write_task

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, os, sys
import jax, jax.numpy as jnp
from metabench import harness
from metabench.tasks import spec
task = spec.load(sys.argv[1])
env = task.split("test")[1]   # the env with a per-seed parameter distribution
out = {"devices": jax.device_count()}
for n in ("1", "2"):
    os.environ["METABENCH_DEVICES"] = n
    rec = harness.evaluate(harness.reference_rule("ppo_clip"), task, "test", seeds=3)
    ref = harness.reference_rule("lpo")
    batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, x * 0.5]), ref.meta_params)
    pop = harness.train_population("drift", ref.rule, batch, task, env, [0, 1, 2])
    out[n] = {"runs": [(r["env"], r["seed"], r["final_return"], r["curve"]) for r in rec["runs"]],
              "population": [[p.returns_sum.tolist(), p.loss.tolist()] for p in pop]}
print("RESULT " + json.dumps(out))
"""


def test_two_devices_give_identical_results_with_padding(tmp_path):
    """3 seeds on 2 forced host devices (padded to 4) against the same process on one device:
    records and an ES-style population call agree exactly."""
    task = write_task(tmp_path, TINY_TASK.format(steps=2048))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(ROOT))
    env.pop("METABENCH_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(task)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["devices"] == 2
    assert len(out["1"]["runs"]) == 6 and out["1"]["runs"] == out["2"]["runs"]
    one, two = (np.array(out[n]["population"]) for n in ("1", "2"))
    assert one.shape == two.shape == (2, 2, 3, 16)  # candidates, (returns, loss), seeds, updates
    np.testing.assert_array_equal(one[:, 0], two[:, 0])
    # The population call's per-device shape differs more ([2, 2] vs [2, 3] agents), and XLA
    # may then group a reduction differently: losses agree to float rounding, not bitwise.
    np.testing.assert_allclose(one[:, 1], two[:, 1], rtol=1e-5)


def test_devices_env_var(monkeypatch):
    monkeypatch.setenv("METABENCH_DEVICES", "1")
    assert len(harness.devices()) == 1
    monkeypatch.setenv("METABENCH_DEVICES", "zero")
    with pytest.raises(ValueError, match="METABENCH_DEVICES must be a positive integer"):
        harness.devices()
    monkeypatch.setenv("METABENCH_DEVICES", "0")
    with pytest.raises(ValueError, match="positive integer"):
        harness.devices()
