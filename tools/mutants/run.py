"""Planted bugs the test suite must kill (`make mutants`).

Each `*.yaml` file beside this script lists mutants: a realistic bug written as an exact text
replacement in one file of the package, and the tests that guard against it. For each mutant
the package is copied to a scratch folder, the one replacement is applied there (the checkout
is never touched), the named tests run against the copy, and the mutant is *killed* when they
fail. A mutant whose `old` text does not occur exactly once is reported as broken: the code
moved and the mutant must be rewritten, so it can never pass silently.

    python tools/mutants/run.py                 # every mutant
    python tools/mutants/run.py -k munchausen   # those whose name contains the text
    python tools/mutants/run.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COPY = ("metabench", "tests", "submissions", "leaderboard", "pyproject.toml",
        "README.md")
KEYS = {"name", "file", "old", "new", "tests", "why"}


class MutantError(ValueError):
    pass


def load(folder: Path = HERE) -> list[dict]:
    out, names = [], set()
    for path in sorted(folder.glob("*.yaml")):
        items = yaml.safe_load(path.read_text()) or []
        if not isinstance(items, list):
            raise MutantError(f"{path}: expected a list of mutants")
        for i, m in enumerate(items):
            where = f"{path.name}[{i}]"
            if not isinstance(m, dict) or set(m) != KEYS:
                got = sorted(m) if isinstance(m, dict) else type(m).__name__
                raise MutantError(f"{where}: expected exactly the keys {sorted(KEYS)}, got {got}")
            if m["name"] in names:
                raise MutantError(f"{where}: duplicate name {m['name']!r}")
            if not isinstance(m["tests"], list) or not m["tests"]:
                raise MutantError(f"{where}: 'tests' must be a non-empty list of pytest ids")
            if m["old"] == m["new"]:
                raise MutantError(f"{where}: 'old' and 'new' are the same text")
            names.add(m["name"])
            out.append(dict(m, source=path.name))
    return out


def apply(root: Path, m: dict) -> str:
    """Writes the mutated file under `root` and returns the original text."""
    path = root / m["file"]
    text = path.read_text()
    count = text.count(m["old"])
    if count != 1:
        raise MutantError(f"{m['name']}: 'old' occurs {count} times in {m['file']} (expected 1)")
    path.write_text(text.replace(m["old"], m["new"]))
    return text


def run_one(scratch: Path, m: dict, python: str) -> tuple[str, float, str]:
    original = apply(scratch, m)
    env = dict(os.environ, PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.time()
    try:
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               "-p", "no:randomly", *m["tests"]], cwd=scratch, env=env,
                              capture_output=True, text=True)
    finally:
        (scratch / m["file"]).write_text(original)
    dt = time.time() - t0
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    # pytest: 0 all passed, 1 some failed; 2-5 mean the tests never ran as meant.
    verdict = {0: "SURVIVED", 1: "killed"}.get(proc.returncode, f"error (pytest rc {proc.returncode})")
    return verdict, dt, tail[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    mutants = [m for m in load() if args.k in m["name"]]
    if args.list:
        for m in mutants:
            print(f"{m['name']:40s} {m['file']}  ({m['source']})\n    {m['why'].strip()}")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="metabench-mutants-"))
    try:
        for item in COPY:
            src = ROOT / item
            if src.is_dir():
                shutil.copytree(src, scratch / item,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, scratch / item)
        # Nothing in the scratch folder may reach the package installed from the checkout.
        for m in mutants:
            apply(scratch, m)  # validates `old` against the pristine copy
            (scratch / m["file"]).write_text((ROOT / m["file"]).read_text())
        rows, survived = [], 0
        for m in mutants:
            verdict, dt, tail = run_one(scratch, m, sys.executable)
            survived += verdict != "killed"
            rows.append((m["name"], verdict, dt))
            print(f"{m['name']:40s} {verdict:24s} {dt:6.1f} s  {tail}", flush=True)
        print(f"\n{len(rows) - survived}/{len(rows)} planted bugs killed")
        return 1 if survived else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
