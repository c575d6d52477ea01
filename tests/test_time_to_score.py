"""Time to a score: the persistent compilation cache, envs compiled side by side, and
progress that moves. (How fast is measured by `metabench bench --time-to-score`, not here.)"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import textwrap

import numpy as np

from metabench import harness
from metabench.harness import train
from metabench.progress import Reporter, line
from metabench.rules import UpdateRule
from metabench.tasks import spec


def test_plain_progress_prints_every_tenth_and_the_end():
    out = io.StringIO()
    show = Reporter(out, every=0.25, live=False)
    for done in range(0, 101, 5):
        show("CartPole", done, 100, done * 512, 0.5 + done / 10)
    lines = out.getvalue().splitlines()
    assert [ln.split("%")[0].split()[-1] for ln in lines] == ["0", "25", "50", "75", "100"]
    assert lines[2] == line("CartPole", 50, 100, 25600, 5.5)
    assert "25,600 env steps per seed" in lines[2] and "4,655 steps/s" in lines[2]
    assert "ETA 6s" in lines[2] and lines[-1].endswith("10.5s")


def test_a_live_bar_shows_rate_and_eta():
    out = io.StringIO()
    with Reporter(out, live=True) as show:
        show("Acrobot-v1", 30, 100, 30 * 512, 3.0)
    text = out.getvalue()
    assert "Acrobot-v1" in text and "30/100" in text and "5,120 steps/s" in text
    assert "ETA 7s" in text


def _cache_child(env: dict) -> str:
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from metabench.harness import train
        print(train.use_compilation_cache())
        print(jax.config.jax_compilation_cache_max_size)
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
    """)
    base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_compilation_cache_is_on_by_default_and_can_be_turned_off(tmp_path):
    home = tmp_path / "xdg"
    got = _cache_child({"XDG_CACHE_HOME": str(home), "METABENCH_COMPILATION_CACHE": "",
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}).split()
    assert got[0] == str(home / "metabench" / "xla") and int(got[1]) == train.CACHE_MAX_BYTES
    assert any((home / "metabench" / "xla").iterdir())  # the program was written there
    own = tmp_path / "own"
    got = _cache_child({"METABENCH_COMPILATION_CACHE": str(own),
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}).split()
    assert got[0] == str(own) and any(own.iterdir())
    assert _cache_child({"METABENCH_COMPILATION_CACHE": "0"}).split()[0] == "None"


def test_precompiled_envs_train_as_if_compiled_alone(tiny_task_path):
    task = spec.load(tiny_task_path, calibration={})
    base = harness.reference_rule("ppo_clip")
    # A rule object of its own: compiled cells are cached by rule, and another test in this
    # worker may already have compiled ppo_clip on the same envs.
    own = UpdateRule(base.rule.init, lambda mp, x: base.rule.apply(mp, x))
    ref = dataclasses.replace(base, rule=own)
    cells = [(e, [0, 1]) for e in task.test]
    before = set(train._CACHE)
    ahead = train.precompile(ref, task, cells)
    assert set(ahead) == {e.name for e in task.test} and all(s > 0 for s in ahead.values())
    built = set(train._CACHE) - before
    assert len(built) == len(task.test)  # one compiled cell per env, built in the threads
    runs = [harness.train_env(ref, task, e, [0, 1]) for e in task.test]
    assert all(r.failure is None for r in runs)
    assert set(train._CACHE) - before == built  # training found them; it built no cell
    alone = harness.train_env(harness.reference_rule("ppo_clip"), task, task.test[1], [0, 1])
    assert np.array_equal(alone.returns_sum, runs[1].returns_sum)


def test_a_reference_factorys_passed_check_is_reused_when_nothing_changed(tmp_path,
                                                                           monkeypatch):
    from metabench.submissions import isolate

    monkeypatch.setenv("METABENCH_COMPILATION_CACHE", str(tmp_path / "xla"))
    first = isolate.check("submissions/baselines/ppo_clip")
    assert first.ok and "reused" not in first.sandbox, first.message
    memo = isolate._check_memo(first.submission, False)
    assert memo.parent == tmp_path / "xla-checks" and memo.exists()
    again = isolate.check("submissions/baselines/ppo_clip")
    assert again.ok and again.report == first.report and again.message == first.message
    assert again.sandbox["reused"] == isolate.REUSED
    assert isolate.check("submissions/baselines/ppo_clip", unsandboxed=True).sandbox[
        "sandboxed"] is False  # another setting: checked again
    monkeypatch.setenv("METABENCH_COMPILATION_CACHE", "0")
    assert isolate._check_memo(first.submission, False) is None
