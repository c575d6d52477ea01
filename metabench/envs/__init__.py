"""One environment API over every backend; ids are ``backend/Name[-vN]``."""

import importlib
import importlib.util
import sys
import types


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module nothing has used yet: reading any attribute it
    lacks imports the real module (which then replaces it) and reads it there. (The standard
    library's ``LazyLoader`` does not serve: on Python 3.11 an ``import`` statement reads the
    module's ``__spec__``, which loads it.)"""

    def __getattr__(self, attr: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attr)


def _defer(name: str) -> None:
    """Puts a :class:`_Deferred` in place of ``name`` (not where it is imported already or
    not installed)."""
    if name in sys.modules or importlib.util.find_spec(name.partition(".")[0]) is None:
        return
    module = sys.modules[name] = _Deferred(name)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)


# gymnax imports its Pong at import, and Pong imports matplotlib.pyplot and seaborn (scipy.stats
# under it) to render: 1.1 s of every metabench process's start, for envs nothing here renders.
for _name in ("matplotlib.pyplot", "seaborn"):
    _defer(_name)

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
