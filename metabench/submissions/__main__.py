"""``python -m metabench.submissions``: the entry point of the isolated check and scoring
processes (:mod:`metabench.submissions.isolate` holds what they do). A module of its own,
because ``python -m metabench.submissions.isolate`` would run a module that importing the
package had already loaded, which runpy warns about."""

import sys

from metabench.submissions.isolate import main

if __name__ == "__main__":
    sys.exit(main())
