"""Task specs: strict loading, errors that name file and key, fingerprints, shipped tasks."""

from __future__ import annotations

import pytest

from metabench.tasks import spec
from metabench.tasks.spec import SpecError

from helpers import TINY_TASK, write_task


def load_text(tmp_path, text, calibration=None):
    return spec.load(write_task(tmp_path, text), calibration=calibration or {})


def expect_error(tmp_path, text, key, words):
    path = write_task(tmp_path, text)
    with pytest.raises(SpecError) as e:
        spec.load(path, calibration={})
    msg = str(e.value)
    assert str(path) in msg and e.value.key == key, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_tiny_task_loads(tmp_path):
    t = load_text(tmp_path, TINY_TASK.format(steps=4096))
    assert t.id == "tiny" and t.total_timesteps == 4096
    assert [e.name for e in t.test] == ["CartPole-v1", "CartPole-long-pole"]
    assert t.test[1].params["length"].kind == "uniform"
    assert spec.agent_config(t, "drift").rollout_len == 32
    assert t.scoring.baselines == {"drift": "ppo_clip"}
    assert t.budget.seeds == 2


@pytest.mark.parametrize("old,new,key,words", [
    ("seed: 0", "seed: 0\nsedes: 3", "sedes", ["unknown key"]),
    ("total_timesteps: 4096", "", "total_timesteps", ["missing"]),
    ("env: gymnax/CartPole-v1\n    normalise: {random: 22.0, reference: 500.0}\ntest",
     "env: gymnax/CartPol-v1\n    normalise: {random: 22.0, reference: 500.0}\ntest",
     "train[0].env", ["registered env id", "CartPole-v1"]),
    ("{length: {uniform: [0.5, 1.0]}}", "{length: {uniform: [1.0, 0.5]}}",
     "test[1].params.length", ["lo < hi"]),
    ("{length: {uniform: [0.5, 1.0]}}", "{lenght: 0.7}", "test[1].params.lenght",
     ["parameter of gymnax/CartPole-v1", "length"]),
    ("rollout_len: 32", "rollout_length: 32", "agents.drift.rollout_length",
     ["unknown drift agent setting", "rollout_len"]),
    ("minibatches: 2", "minibatches: 3", "agents.drift", ["must divide"]),
    ("drift: {", "dirft: {", "agents.dirft", ["known family", "drift"]),
    ("total_timesteps: 4096", "total_timesteps: 64", "total_timesteps",
     ["at least one drift update", "128"]),
    ("total_timesteps: 4096", "total_timesteps: -5", "total_timesteps", ["positive"]),
    ("seeds: 2", "seeds: two", "budget.seeds", ["positive integer"]),
    ("scoring: {bootstrap_reps: 200, baselines: {drift: ppo_clip}}", "scoring: {aggregate: best}", "scoring.aggregate",
     ["iqm"]),
    ("baselines: {drift: ppo_clip}", "baselines: {drift: ppo}",
     "scoring.baselines.drift", ["ppo_clip"]),
    ("scoring: {bootstrap_reps: 200, baselines: {drift: ppo_clip}}", "scoring: {}",
     "scoring.baselines.drift", ["missing", "ppo_clip"]),
    ("baselines: {drift: ppo_clip}", "baselines: {drift: ppo_clip, td_loss: dqn}",
     "scoring.baselines.td_loss", ["family listed under agents"]),
    ("    name: CartPole-long-pole\n", "", "test[1].name", ["unique"]),
    ("test:\n  - env: gymnax/CartPole-v1\n    normalise: {random: 22.0, reference: 500.0}",
     "test:\n  - env: gymnax/CartPole-v1\n    normalise: {random: 22.0}",
     "test[0].normalise.reference", ["missing"]),
    ("test:\n  - env: gymnax/CartPole-v1\n    normalise: {random: 22.0, reference: 500.0}",
     "test:\n  - env: gymnax/CartPole-v1\n    normalise: {random: 500.0, reference: 500.0}",
     "test[0].normalise.reference", ["different from random"]),
    ("test:\n  - env: gymnax/CartPole-v1\n    normalise: {random: 22.0, reference: 500.0}",
     "test:\n  - env: gymnax/CartPole-v1\n    normalise: {random: guess, reference: 500.0}",
     "test[0].normalise.random", ["calibrated"]),
])
def test_errors_name_file_key_and_expectation(tmp_path, old, new, key, words):
    text = TINY_TASK.format(steps=4096)
    assert old in text, old
    expect_error(tmp_path, text.replace(old, new, 1), key, words)


def test_bad_yaml_and_non_mapping(tmp_path):
    expect_error(tmp_path, "id: [unclosed", "<yaml>", ["valid YAML"])
    expect_error(tmp_path, "- just a list", "<top level>", ["a mapping"])


def test_empty_split_is_an_error(tmp_path):
    text = TINY_TASK.format(steps=4096)
    start = text.index("train:")
    end = text.index("test:")
    expect_error(tmp_path, text[:start] + "train: []\n" + text[end:], "train", ["non-empty"])


def test_unknown_task_suggests(tmp_path):
    with pytest.raises(FileNotFoundError, match="did you mean classic-transfer-v1"):
        spec.load("classic-transfer-v2")


def test_calibrated_random_reads_the_lock_or_says_how_to_fix(tmp_path):
    text = TINY_TASK.format(steps=4096).replace("{random: 22.0, reference: 500.0}",
                                                "{random: calibrated, reference: 500.0}")
    t = load_text(tmp_path, text, calibration={})
    assert t.test[0].normalise.random is None and t.test[0].normalise.calibrated
    with pytest.raises(SpecError, match=r"test\[0\].normalise.random.*metabench calibrate tiny"):
        spec.require_calibrated(t, "test")
    lock = {t.test[0].calibration_key(): {"random": 21.5},
            t.test[1].calibration_key(): {"random": 23.5}}
    t2 = load_text(tmp_path, text, calibration=lock)
    assert [e.normalise.random for e in t2.test] == [21.5, 23.5]
    spec.require_calibrated(t2, "test")


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    text = TINY_TASK.format(steps=4096)
    a = load_text(tmp_path, text).fingerprint()
    assert a == load_text(tmp_path, text).fingerprint()
    # comments and descriptions don't change what is measured
    assert a == load_text(tmp_path, "# comment\n" + text.replace("for tests", "x")).fingerprint()
    assert a != load_text(tmp_path, TINY_TASK.format(steps=8192)).fingerprint()
    assert a != load_text(tmp_path, text.replace("[0.5, 1.0]", "[0.5, 1.1]")).fingerprint()


def test_family_fingerprint_ignores_other_families_agents(tmp_path):
    text = TINY_TASK.format(steps=4096)
    base = load_text(tmp_path, text)
    more = load_text(tmp_path, text.replace(
        "agents:\n", "agents:\n  metagrad: {num_envs: 8}\n").replace(
        "{drift: ppo_clip}", "{drift: ppo_clip, metagrad: a2c_fixed}"))
    assert "metagrad" in more.agents
    # Adding a family's agent leaves the drift records valid, but not the whole-spec hash.
    assert more.fingerprint("drift") == base.fingerprint("drift")
    assert more.fingerprint() != base.fingerprint()
    assert more.fingerprint("metagrad") != more.fingerprint("drift")
    retuned = load_text(tmp_path, text.replace("epochs: 2", "epochs: 3"))
    assert retuned.fingerprint("drift") != base.fingerprint("drift")


def test_every_shipped_task_loads_and_is_calibrated():
    names = spec.list_tasks()
    for required in ("classic-transfer-v1", "classic-transfer-v1-quick", "minatar-transfer-v1",
                     "minatar-transfer-v1-quick"):
        assert required in names
    for name in names:
        t = spec.load(name)
        assert t.id == name
        for split in spec.SPLITS:
            spec.require_calibrated(t, split)
    full = spec.load("minatar-transfer-v1")
    assert full.total_timesteps == 10_000_000 and full.budget.seeds == 16
    cfg = spec.agent_config(full, "drift")
    assert (cfg.num_envs, cfg.rollout_len, cfg.epochs, cfg.minibatches, cfg.lr) == (64, 128, 4, 8,
                                                                                     5e-3)
    assert [e.env for e in full.train] == ["gymnax/Breakout-MinAtar", "gymnax/Freeway-MinAtar"]
    assert [e.env for e in full.test] == ["gymnax/Asterix-MinAtar", "gymnax/SpaceInvaders-MinAtar"]
    # the task files' claims: PureJaxRL's MinAtar PPO is relu; Brax clips no values, quick or not
    for name in ("minatar-transfer-v1", "minatar-transfer-v1-quick"):
        assert spec.agent_config(spec.load(name), "drift").activation == "relu", name
    for name in ("brax-transfer-v1", "brax-transfer-v1-quick"):
        assert spec.agent_config(spec.load(name), "drift").value_clip == 0.0, name


def test_spec_and_submission_errors_are_one_kind_and_the_lock_file_is_checked(tmp_path):
    from metabench import submissions, yamlfile

    assert issubclass(SpecError, yamlfile.FieldError)
    assert issubclass(submissions.SubmissionError, yamlfile.FieldError)
    lock = tmp_path / spec.CALIBRATION_FILE
    lock.write_text("- not\n- a mapping\n")
    with pytest.raises(yamlfile.FieldError, match=r"calibration.*: <top level>: a mapping, got list"):
        spec.load_calibration(tmp_path)
    lock.write_text("envs: [unclosed")
    with pytest.raises(SpecError, match=r": <yaml>: valid YAML"):
        spec.load_calibration(tmp_path)


def test_reading_a_task_loads_no_jax_and_fingerprints_like_loading():
    """The site reads specs without the RL stack; its fingerprints must be the harness's."""
    import subprocess
    import sys

    code = ("import sys; from metabench.tasks import schema\n"
            "for n in schema.list_tasks(): schema.read(n).fingerprint()\n"
            "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'metabench.envs', "
            "'metabench.families') if m in sys.modules)\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in spec.list_tasks():
        read, loaded = spec.read(name), spec.load(name)
        for family in [None, *loaded.families()]:
            assert read.fingerprint(family) == loaded.fingerprint(family), (name, family)
