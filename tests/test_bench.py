"""`metabench bench`: the table of env-only, minimal and harness throughput, and seed scaling."""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib

import pytest

from metabench import bench
from metabench.cli import main


# Per family, a budget at which both its minimal twin and the harness clearly learn CartPole
# (a random policy returns about 22), measured on the 2-core CPU.
LEARNING_STEPS = {"ppo": 51_200, "dqn": 150_000, "epg": 30_720, "metagrad": 25_600,
                  "lpg": 99_840}
# About half of each family's lower final return measured at those budgets (this fixture's
# keys; twin and harness): ppo 198 and 278 (one seed), 244 and 248 (two); dqn 210 and 154;
# epg 166, metagrad 76, lpg 243 (both sides equal). A wrong-sign update stays far below.
LEARNED = {"ppo": 100.0, "dqn": 75.0, "epg": 80.0, "metagrad": 40.0, "lpg": 120.0}
# The twins that draw from a key what their family draws (the README's "bit for bit";
# test_minimal_{epg,metagrad,lpg}.py compare their whole return arrays with the harness).
KEY_TWINS = ("epg", "metagrad", "lpg")


@pytest.fixture(scope="module")
def rows():
    """Every family's pair at one seed and a learning budget, and PPO again at two seeds: one
    process, compiled once each."""
    return [row for algo, steps in LEARNING_STEPS.items()
            for row in bench.run(["gymnax/CartPole-v1"], total_timesteps=steps, quick=True,
                                 algos=(algo,), devices=(1,))] + bench.run(
        ["gymnax/CartPole-v1"], total_timesteps=LEARNING_STEPS["ppo"], seeds=(2,), quick=True,
        algos=("ppo",))


def test_bench_covers_every_family_with_its_minimal_twin(rows):
    """One row per family's pair: the same env steps counted on both sides, and both sides
    learn (so that their speeds are comparable)."""
    assert [(r["algo"], r["seeds"]) for r in rows] == [
        ("ppo", 1), ("dqn", 1), ("epg", 1), ("metagrad", 1), ("lpg", 1), ("ppo", 2)]
    for r in rows:
        assert r["env"] == "gymnax/CartPole-v1" and r["devices"] == 1
        assert r["env_steps_per_seed"] == LEARNING_STEPS[r["algo"]], r
        for k in ("env_only_steps_per_s", "minimal_steps_per_s", "harness_steps_per_s"):
            assert r[k] > 0, (k, r)
        # One repeat: the paired ratio (per repeat) and the ratio of the medians agree.
        assert r["ratio_range"] == pytest.approx([r["ratio"]] * 2)
        # Training does everything stepping random actions does and more.
        assert r["env_only_steps_per_s"] > r["harness_steps_per_s"]
        assert min(r["minimal_final_return"], r["harness_final_return"]) > LEARNED[r["algo"]], r
        if r["algo"] in KEY_TWINS:
            # Same keys, same agent: the bench's returns are the harness's, bit for bit.
            assert r["minimal_final_return"] == r["harness_final_return"], r
    assert rows[0]["num_envs"] == 4  # PureJaxRL's PPO CartPole setting
    table = bench.format_table(rows)
    assert "env only" in table and "metagrad gymnax/CartPole-v1" in table
    page = bench.plot_html(rows)
    # One log-log chart per (algo, env), one line per measured throughput.
    assert page.count("<svg") == 5 and page.count("<polyline") == 15
    # A dot per measured point, so that one-seed-count series (a lone point) show too.
    assert page.count("<circle") == 3 * len(rows)
    assert "log2 seeds" in page and "ppo on gymnax/CartPole-v1" in page


@pytest.mark.parametrize("algo", sorted(bench.PAIRS))
def test_the_bench_configures_the_harness_as_the_leaderboard_runs_it(algo):
    """Each pair's harness side is the family's default agent (what the leaderboard trains;
    the lpg family's default torso is tabular, the bench's CartPole needs its mlp), and the
    twin's own Config is checked against those defaults in its test file."""
    from metabench.families import drift, epg, lpg, metagrad, td_loss

    family = {"drift": drift, "td_loss": td_loss, "epg": epg, "metagrad": metagrad,
              "lpg": lpg}
    pair = bench.PAIRS[algo]("CartPole-v1", 10_000)
    want = family[pair.family].Config()
    if pair.family == "lpg":
        want = dataclasses.replace(want, network="mlp")
    assert pair.harness_config == want
    assert pair.config == type(pair.config)(total_timesteps=10_000)


def test_bench_cli_takes_several_seed_counts(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # The rows fixture's settings: the minimal and harness compilations are reused.
    assert main(["bench", "--quick", "--algo", "ppo", "--env", "gymnax/CartPole-v1",
                 "--timesteps", "51200", "--seeds", "1", "2", "--json", str(out),
                 "--plot", str(tmp_path / "bench.html")]) == 0
    printed = capsys.readouterr().out
    assert "env only" in printed and "harness" in printed
    assert out.exists() and '"env_only_steps_per_s"' in out.read_text()
    assert "<svg" in (tmp_path / "bench.html").read_text()


def test_backend_rows_cover_host_stepped_backends():
    entries = bench.backend_entries(["gymnasium/CartPole-v1", "pettingzoo/mpe.simple_spread_v3"],
                                    num_envs=4, async_envs=2)
    assert [e[0] for e in entries] == ["gymnasium/CartPole-v1 sync"] * 2 + [
        "gymnasium/CartPole-v1 async", "pettingzoo/mpe.simple_spread_v3"]
    rows = bench.backend_rows(entries, num_envs=4, steps=5, repeats=1)
    # Copies of a multi-agent env are rounded up to whole games (3 agents: 4 -> 6).
    assert [r["num_envs"] for r in rows] == [4, 2, 2, 6]
    assert all(r["steps_per_s"] > 0 and r["compile_s"] > 0 for r in rows)
    assert rows[2]["params"] == {"vectorization": "async"}
    table = bench.format_backend_table(rows)
    assert "gymnasium/CartPole-v1 async" in table and "copies" in table


def test_every_pair_is_an_algo_choice_and_devices_are_restored(monkeypatch):
    from metabench import cli

    assert cli.BENCH_ALGOS == list(bench.PAIRS)
    monkeypatch.setenv("METABENCH_DEVICES", "7")
    with bench._devices(1):
        assert os.environ["METABENCH_DEVICES"] == "1"
    assert os.environ["METABENCH_DEVICES"] == "7"
    with pytest.raises(ValueError, match="no minimal implementation for algo 'sac'"):
        bench.run(algos=("sac",), quick=True)


def test_table_shows_the_paired_ratios_spread():
    row = {"algo": "dqn", "env": "gymnax/Breakout-MinAtar", "devices": 1, "seeds": 1,
           "env_steps_per_seed": 100_000, "env_only_steps_per_s": 5e5,
           "minimal_steps_per_s": 1.6e4, "harness_steps_per_s": 1.4e4, "ratio": 0.875,
           "ratio_range": [0.8, 0.93], "repeats": 5, "minimal_compile_s": 3.0,
           "harness_compile_s": 4.0, "minimal_final_return": 1.0,
           "harness_final_return": 1.1, "device": "cpu:cpu"}
    table = bench.format_table([row])
    assert "median of 5 interleaved runs" in table
    assert "0.88 (0.80-0.93)" in table and "16,000" in table and "14,000" in table


@pytest.mark.parametrize("algo", sorted(bench.PAIRS))
def test_minimal_implementations_are_standalone(algo):
    """A yardstick must not depend on the harness it is compared against."""
    module = bench.PAIRS[algo]("CartPole-v1", 10_000).module
    roots = set()
    for node in ast.walk(ast.parse(pathlib.Path(module.__file__).read_text())):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {module.__name__}"
            roots.add(node.module.split(".")[0])
    allowed = {"__future__", "dataclasses", "time", "typing",
               "jax", "flax", "optax", "gymnax", "numpy"}
    assert roots <= allowed, roots - allowed
