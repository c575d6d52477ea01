"""Families: the slots rules fill. Importing this package registers every family."""

from metabench.families import drift, epg, lpg, metagrad, td_loss
from metabench.families.base import (Check, CheckReport, Family, Trainer, families, find_rule,
                                     get_family, register_family)

__all__ = ["Check", "CheckReport", "Family", "Trainer", "drift", "epg", "families", "lpg", "metagrad", "td_loss", "find_rule",
           "get_family", "register_family"]
