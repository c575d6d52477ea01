"""Discovery: meta-train update rules on a task's train split.

- :mod:`metabench.discover.evolution`: regularised evolution over ``td_loss`` loss graphs
  (Co-Reyes et al. 2021), ``metabench discover evolve``.
"""

from metabench.discover.evolution import EvolveConfig, Individual, evolve

__all__ = ["EvolveConfig", "Individual", "evolve"]
