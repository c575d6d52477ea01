"""The yardsticks: one file per family's baseline, each a complete PureJaxRL-style trainer
that imports nothing from metabench (``ppo``: drift's ``ppo_clip``; ``dqn``: td_loss's
``dqn``; ``epg``: ``reinforce``; ``metagrad``: ``metagrad_gamma``; ``lpg``:
``actor_critic``). :mod:`metabench.bench` times each against the harness running the same
agent."""
