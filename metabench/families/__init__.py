"""Families: the slots rules fill. Importing this package registers every family."""

from metabench.families import drift, lpg, td_loss
from metabench.families.base import (Check, CheckReport, Family, Trainer, families, find_rule,
                                     get_family, register_family)

__all__ = ["Check", "CheckReport", "Family", "Trainer", "drift", "families", "lpg", "td_loss", "find_rule",
           "get_family", "register_family"]
