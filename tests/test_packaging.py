"""What a non-editable install carries: every data file the package reads (task files, the
loss-graph library, shipped parameters, the site's templates and static files) is named by
``[tool.setuptools.package-data]``, so ``pip install .`` finds what an editable install does."""

from __future__ import annotations

import fnmatch
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_data_file_in_the_package_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["metabench"]
    tracked = subprocess.run(["git", "ls-files", "metabench"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    data = [Path(f).relative_to("metabench").as_posix() for f in tracked
            if not f.endswith(".py")]
    assert any(f.startswith("tasks/") for f in data) and any(f.startswith("site/") for f in data)
    missing = [f for f in data if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"not in package-data (a non-editable install would lack them): {missing}"


def test_the_version_is_written_once():
    import metabench
    from metabench.harness import origin

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in config["project"]["dynamic"] and "version" not in config["project"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "metabench.__version__"}
    assert origin.__version__ is metabench.__version__
