"""`metabench bench`: the table of env-only, minimal and harness throughput, and seed scaling."""

from __future__ import annotations

from metabench import bench
from metabench.cli import main


def test_bench_quick_rows_and_table(capsys):
    rows = bench.run(env_id=["gymnax/CartPole-v1"], total_timesteps=1e4, seeds=(1, 2),
                     quick=True, algos=("ppo",))
    assert [(r["algo"], r["env"], r["seeds"]) for r in rows] == [
        ("ppo", "gymnax/CartPole-v1", 1), ("ppo", "gymnax/CartPole-v1", 2)]
    for r in rows:
        assert r["env_steps_per_seed"] > 0 and r["num_envs"] == 4
        for k in ("env_only_steps_per_s", "minimal_steps_per_s", "harness_steps_per_s"):
            assert r[k] > 0, (k, r)
        # Training does everything stepping random actions does and more.
        assert r["env_only_steps_per_s"] > r["harness_steps_per_s"]
    table = bench.format_table(rows)
    assert "env only" in table and table.count("gymnax/CartPole-v1") == 2
    page = bench.plot_html(rows)
    # One log-log chart for the (algo, env) pair, one line per measured throughput.
    assert page.count("<svg") == 1 and page.count("<polyline") == 3
    assert "log2 seeds" in page and "ppo on gymnax/CartPole-v1" in page


def test_bench_cli_takes_several_seed_counts(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--algo", "ppo", "--env", "gymnax/CartPole-v1",
                 "--timesteps", "5e3", "--seeds", "1", "--json", str(out),
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
