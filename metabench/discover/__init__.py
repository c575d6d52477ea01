"""Discovery: meta-train update rules on a task's train split, one module per procedure,
named as the command that runs it.

- :mod:`metabench.discover.evolution`: regularised evolution over ``td_loss`` loss graphs
  (Co-Reyes et al. 2021), ``metabench discover evolve``.
- :mod:`metabench.discover.es`: OpenAI-ES on LPO's drift network or EPG's loss,
  ``metabench discover lpo`` / ``epg``.
- :mod:`metabench.discover.lpg`: meta-gradient training of LPG, ``metabench discover lpg``.
- :mod:`metabench.discover.common`: their checkpoints and the submission they write.

The package imports none of them (importing one runs this file first, so a re-export here
would import the procedures in a circle).
"""
