"""The command line: listings, friendly errors, and eval giving identical scores twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from metabench import cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "metabench.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=900)


def test_list(capsys):
    assert cli.main(["list", "rules"]) == 0
    out = capsys.readouterr().out
    for rule in ("ppo_clip", "dpo", "lpo"):
        assert rule in out
    assert cli.main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "classic-transfer-v1-quick" in out and "INVALID" not in out
    assert cli.main(["list", "envs"]) == 0
    out = capsys.readouterr().out
    assert "gymnax/Asterix-MinAtar" in out and "gymnax/DeepSea-bsuite" in out
    assert cli.main(["list", "families"]) == 0
    assert "drift" in capsys.readouterr().out


def test_unknown_names_are_friendly_errors(capsys):
    assert cli.main(["eval", "ppo_clipp", "--task", "classic-transfer-v1-quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown rule 'ppo_clipp'" in err and "did you mean ppo_clip" in err
    assert cli.main(["eval", "dpo", "--task", "classic-transfer-v9"]) == 2
    assert "unknown task 'classic-transfer-v9'" in capsys.readouterr().err


def test_eval_in_a_fresh_process_and_in_process_gives_identical_scores(tmp_path, tiny_task_path,
                                                                        capsys):
    """The command line end to end once (a fresh interpreter, as a user runs it), then the
    same command in this process: the same records and the same printed scores. One child
    is enough; determinism across processes is all a second one added."""
    args = ["eval", "ppo_clip", "dpo", "--task", str(tiny_task_path), "--quiet"]
    p = run_cli(*args, "--out-dir", str(tmp_path / "run0"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "IQM" in p.stdout and "P(dpo > ppo_clip)" in p.stdout
    assert cli.main([*args, "--out-dir", str(tmp_path / "run1")]) == 0
    here = capsys.readouterr().out
    recs = [[json.loads((tmp_path / f"run{i}" / "tiny" / "test" / f"{r}.json").read_text())
             for r in ("ppo_clip", "dpo")] for i in range(2)]
    for a, b in zip(*recs):
        assert a["runs"] == b["runs"] and len(a["runs"]) == 4
        assert a["aggregates"] == b["aggregates"]
        assert a["probability_of_improvement"] == b["probability_of_improvement"]
    assert recs[0][1]["probability_of_improvement"]["baseline"] == "ppo_clip"
    # the printed tables agree too, apart from timings
    def scores(out):
        return [ln.split()[:4] for ln in out.splitlines() if "IQM" in ln or "P(" in ln]

    assert scores(p.stdout) == scores(here) and len(scores(here)) == 3
