"""One environment API over every backend; ids are ``backend/Name[-vN]``."""

from metabench.envs.distributions import make_param_sampler
from metabench.envs.registry import EnvEntry, UnknownEnvError, entry, make, register, registered

__all__ = [
    "EnvEntry",
    "UnknownEnvError",
    "entry",
    "make",
    "make_param_sampler",
    "register",
    "registered",
]
