"""metabench: a gym-style benchmark and leaderboard for learned RL update rules.

The public API::

    import metabench as mb
    task = mb.load_task("classic-transfer-v1-quick")
    record = mb.evaluate(mb.reference_rule("dpo"), task, split="test")

Names are imported on first use (PEP 562), so ``import metabench.results`` or building the
site from records loads neither JAX nor the families.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "make_env": ("metabench.envs", "make"),
    "register_env": ("metabench.envs", "register"),
    "Family": ("metabench.families", "Family"),
    "Trainer": ("metabench.families", "Trainer"),
    "find_rule": ("metabench.families", "find_rule"),
    "get_family": ("metabench.families", "get_family"),
    "list_families": ("metabench.families.base", "families"),
    "drift": ("metabench.families.drift", None),
    "epg": ("metabench.families.epg", None),
    "lpg": ("metabench.families.lpg", None),
    "metagrad": ("metabench.families.metagrad", None),
    "td_loss": ("metabench.families.td_loss", None),
    "RuleRef": ("metabench.harness", "RuleRef"),
    "evaluate": ("metabench.harness", "evaluate"),
    "reference_rule": ("metabench.harness", "reference_rule"),
    "train_env": ("metabench.harness", "train_env"),
    "UpdateRule": ("metabench.rules", "UpdateRule"),
    "params_hash": ("metabench.rules", "params_hash"),
    "check_submission": ("metabench.submissions", "check"),
    "submit": ("metabench.submissions", "submit"),
    "aggregates": ("metabench.scoring", "aggregates"),
    "normalise": ("metabench.scoring", "normalise"),
    "probability_of_improvement": ("metabench.scoring", "probability_of_improvement"),
    "SpecError": ("metabench.tasks.schema", "SpecError"),
    "TaskSpec": ("metabench.tasks.schema", "TaskSpec"),
    "list_tasks": ("metabench.tasks.schema", "list_tasks"),
    "load_task": ("metabench.tasks.spec", "load"),
}

__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'metabench' has no attribute {name!r}")
    module, attr = _API[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
