"""``python -m metabench._child``: the entry point of metabench's isolated check and scoring
processes (see :mod:`metabench.submission`). A module of its own, because running
``python -m metabench.submission`` after ``import metabench`` (which imports it) makes runpy
warn about executing an already imported module."""

import sys

from metabench.submission import main

if __name__ == "__main__":
    sys.exit(main())
