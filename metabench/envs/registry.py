"""Environment registry: ``register`` / ``make`` over every backend.

Ids are ``backend/Name[-vN]`` (``gymnax/CartPole-v1``). Each entry knows how to build the
environment, whether it is jittable, and a one-line note for ``metabench list envs``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

_ID = re.compile(r"^[a-z][a-z0-9_]*/[A-Za-z0-9_.\-]+$")


@dataclasses.dataclass(frozen=True)
class EnvEntry:
    """A registered environment."""

    id: str
    """``backend/Name[-vN]``."""
    factory: Callable[..., tuple[Any, Any]]
    """``factory(**params) -> (env, env_params)``; params override the defaults."""
    jittable: bool = True
    """Whether reset/step are pure JAX (False for host-stepped backends)."""
    note: str = ""
    """Shown by ``metabench list envs``; e.g. a reason the env needs network access."""
    offline: bool = True
    """False when building the env fetches data (it cannot run on an offline machine)."""

    @property
    def backend(self) -> str:
        return self.id.split("/", 1)[0]


_REGISTRY: dict[str, EnvEntry] = {}


class UnknownEnvError(KeyError):
    """An env id that is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def register(entry: EnvEntry, *, overwrite: bool = False) -> EnvEntry:
    """Adds an environment; ids must be ``backend/Name`` and unique unless ``overwrite``."""
    if not _ID.match(entry.id):
        raise ValueError(f"env id {entry.id!r} must look like 'backend/Name[-vN]'")
    if entry.id in _REGISTRY and not overwrite:
        raise ValueError(f"env id {entry.id!r} is already registered")
    _REGISTRY[entry.id] = entry
    return entry


def entry(env_id: str) -> EnvEntry:
    """The registry entry for ``env_id``, or an error that suggests close ids."""
    _load_backends()
    if env_id not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(env_id, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `metabench list envs`"
        raise UnknownEnvError(f"unknown env id {env_id!r}{hint}")
    return _REGISTRY[env_id]


def make(env_id: str, **params: Any) -> tuple[Any, Any]:
    """Builds ``(env, env_params)``; keyword params override the env's default params."""
    return entry(env_id).factory(**params)


def registered(backend: str | None = None) -> list[str]:
    """Sorted registered ids, optionally of one backend."""
    _load_backends()
    return sorted(i for i, e in _REGISTRY.items() if backend is None or e.backend == backend)


BACKENDS = ("gymnax", "chains", "grids", "brax", "gymnasium", "pettingzoo")
"""The backend modules of ``metabench.envs``, in registration order. Each registers its envs
when imported; they import this module, never the other way round, so the registry names
them here and loads them by name."""

_LOADED = False


def _load_backends() -> None:
    # Backends register on import; importing lazily keeps `import metabench` cheap.
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for name in BACKENDS:
            importlib.import_module(f"metabench.envs.{name}")
