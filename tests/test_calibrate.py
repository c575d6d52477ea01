"""`metabench calibrate`: random-policy returns measured into the lock file the specs read."""

from __future__ import annotations

import yaml

from metabench.tasks import calibrate, spec

from helpers import TINY_TASK, write_task


def test_calibrate_writes_the_lock_and_specs_read_it(tmp_path):
    text = TINY_TASK.format(steps=4096).replace("{random: 22.0, reference: 500.0}",
                                                "{random: calibrated, reference: 500.0}")
    path = write_task(tmp_path, text)
    task = spec.load(path)
    assert all(e.normalise.random is None for e in task.test)
    calibrate.calibrate(task, tasks_dir=tmp_path, log=lambda *_: None)
    lock = yaml.safe_load((tmp_path / spec.CALIBRATION_FILE).read_text())["envs"]
    assert len(lock) == 2  # plain CartPole and the long-pole distribution
    entry = lock[task.test[0].calibration_key()]
    # a uniform random policy balances CartPole-v1 for ~22 steps on average
    assert 18 < entry["random"] < 26 and entry["episodes"] > 1000
    assert "uniform random actions" in entry["method"]
    again = spec.load(path)
    assert again.test[0].normalise.random == entry["random"]
    spec.require_calibrated(again, "test")
    assert again.fingerprint() != task.fingerprint()


def test_random_return_is_deterministic():
    task = spec.load("classic-transfer-v1-quick")
    a = calibrate.random_return(task.test[0], num_envs=8)
    b = calibrate.random_return(task.test[0], num_envs=8)
    assert a == b and -501 < a["random"] < -400  # Acrobot: random rarely swings up
