"""Reading the project's YAML files (task specs, submissions) with errors that name the file,
the key and what was expected."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


class FieldError(ValueError):
    """A malformed YAML file: the message names the file, the key and the expectation.
    ``SpecError`` and ``SubmissionError`` are its kinds."""

    def __init__(self, file: str | os.PathLike, key: str, expected: str):
        self.file, self.key, self.expected = str(file), key, expected
        super().__init__(f"{file}: {key}: {expected}")


def read(path: Path, error: type[FieldError] = FieldError) -> Any:
    """The YAML document in ``path``; a syntax error is raised as ``error`` at ``<yaml>``."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise error(path, "<yaml>", f"valid YAML ({e})") from None
