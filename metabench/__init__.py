"""metabench: a gym-style benchmark and leaderboard for learned RL update rules.

The public API::

    import metabench as mb
    task = mb.load_task("classic-transfer-v1-quick")
    record = mb.evaluate(mb.reference_rule("dpo"), task, split="test")
"""

from metabench.envs import make as make_env
from metabench.envs import register as register_env
from metabench.families import Family, Trainer, find_rule, get_family
from metabench.families.base import families as list_families
from metabench.families import drift, epg, lpg, metagrad, td_loss
from metabench.harness import RuleRef, evaluate, reference_rule, train_env
from metabench.rules import UpdateRule, params_hash
from metabench.submission import check as check_submission
from metabench.submission import submit
from metabench.scoring import aggregates, normalise, probability_of_improvement
from metabench.spec import SpecError, TaskSpec, list_tasks
from metabench.spec import load as load_task

__version__ = "0.1.0"

__all__ = [
    "Family",
    "RuleRef",
    "SpecError",
    "TaskSpec",
    "Trainer",
    "UpdateRule",
    "__version__",
    "aggregates",
    "check_submission",
    "drift",
    "epg",
    "evaluate",
    "find_rule",
    "get_family",
    "list_families",
    "list_tasks",
    "load_task",
    "lpg",
    "metagrad",
    "make_env",
    "normalise",
    "params_hash",
    "probability_of_improvement",
    "reference_rule",
    "register_env",
    "submit",
    "td_loss",
    "train_env",
]
