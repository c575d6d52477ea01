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
