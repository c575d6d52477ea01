"""The harness: train fresh agents with a rule on a task's environments and score them.

One concern per module:

- :mod:`metabench.harness.train`: the training engine (compiled and cached pieces, chunks,
  devices and seed sharding), from a rule to per-env measurements (:class:`EnvRun`);
- :mod:`metabench.harness.records`: from those measurements to the versioned result record
  (per-seed runs, env parts, the score matrix, aggregates), and :func:`evaluate`, which does
  both for a whole task split;
- :mod:`metabench.harness.origin`: the record's provenance (code version, git commit, libraries,
  device).

The names callers use are re-exported here, so ``harness.train_env`` and the like keep working.
The tunables ``CHUNK_SECONDS`` and ``MIN_CHUNK_ENV_STEPS`` are not: a copy here would not be
the value the engine reads, so patch them in :mod:`metabench.harness.train`. The submodules
import one another by module path, never this package (see tests/test_layers.py).
"""

from metabench.harness.origin import LIBRARIES, provenance
from metabench.harness.records import (CURVE_POINTS, agent_returns, assemble, build_record,
                                       downsample_curve, downsample_trace, env_part, evaluate,
                                       failed_part, merge_parts, reference_summary,
                                       rule_block, run_records, score_matrix)
from metabench.harness.train import (Compiled, EnvRun, RuleRef, compiled, devices,
                                     memory_usage, reference_rule, seed_keys, train_env,
                                     train_population)

__all__ = [
    "CURVE_POINTS", "LIBRARIES", "Compiled", "EnvRun", "RuleRef", "agent_returns", "assemble",
    "build_record", "compiled", "devices", "downsample_curve", "downsample_trace", "env_part",
    "evaluate", "failed_part", "memory_usage", "merge_parts", "provenance", "reference_rule",
    "reference_summary", "rule_block", "run_records", "score_matrix", "seed_keys", "train_env",
    "train_population",
]
