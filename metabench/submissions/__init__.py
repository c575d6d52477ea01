"""Submissions: load and validate a folder, hash its content, check and score it in isolation.

A submission is a folder with ``submission.yaml`` (metadata, the entry point, an optional
parameters file with its sha256, and a meta-training disclosure), an optional ``rule.py``
and an optional parameters file (``.npz`` or flax ``.msgpack``). Loading the YAML never runs
submitted code; building the rule imports ``rule.py`` and is done in a child process
(``python -m metabench.submissions``) by :func:`check` and :func:`submit`, so that a rule
that crashes, hangs or exhausts memory harms nothing but its own record.

- :mod:`~metabench.submissions.schema`: ``submission.yaml``, loaded and validated,
- :mod:`~metabench.submissions.build`: the rule built from the folder (imports its code),
- :mod:`~metabench.submissions.isolate`: the child processes that check and score,
- :mod:`~metabench.submissions.store`: result paths, shards, stale records, merging,
- :mod:`~metabench.submissions.orchestrate`: submitting one folder or a batch, locally or
  on Ray.

This module re-exports the names callers use. The modules inside import each other by their
own names, never this package (that would be an import cycle). To replace a function in a
test, patch the module that looks it up (``orchestrate.check``), not these re-exports.
"""

from metabench.submissions.build import batch_key, batched_rule, build_rule
from metabench.submissions.isolate import CHECK_TIMEOUT_S, CheckResult, check
from metabench.submissions.orchestrate import COMPILE_ALLOWANCE_S, submit, submit_many
from metabench.submissions.schema import (SUBMISSION_FILE, Disclosure, Submission,
                                          SubmissionError, load)
from metabench.submissions.store import (RESULTS_DIR, SubmitResult, merge, parse_shard,
                                         results_path, shard_seeds)

__all__ = ["CHECK_TIMEOUT_S", "COMPILE_ALLOWANCE_S", "CheckResult", "Disclosure",
           "RESULTS_DIR", "SUBMISSION_FILE", "Submission", "SubmissionError", "SubmitResult",
           "batch_key", "batched_rule", "build_rule", "check", "load", "merge", "parse_shard",
           "results_path", "shard_seeds", "submit", "submit_many"]
