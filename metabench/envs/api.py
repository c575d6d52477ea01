"""The environment interface every backend implements, so that callers read capabilities
instead of probing for them.

The core is gymnax 1.0's functional API: ``reset(key, params) -> (obs, state)``, ``step(key,
state, action, params) -> (obs, state, reward, terminated, truncated, info)`` with
``info["final_observation"]`` (auto-reset on done), ``action_space(params)``,
``observation_space(params)`` and ``default_params``. metabench adds
``finalise_params(params)`` (fields derived from drawn ones, jittable) and the capabilities
below, each with the value a plain single-agent jitted env has, so a backend states only
where it differs.
"""

from __future__ import annotations

from typing import Any


class Env:
    """Base class of every backend's env; see the module docstring for the contract."""

    id: str = ""
    """The registered id, ``backend/Name[-vN]``."""
    jittable: bool = True
    """Steps inside ``jit``; False for host-stepped envs (gymnasium, pettingzoo), which run
    through callbacks and are not sharded across devices."""
    num_agents: int = 1
    """Copies per game: a multi-agent env's batch holds whole games of this many agents."""
    static_params: tuple[str, ...] = ()
    """Parameters fixed when the env is built (a physics backend): a task may set them only
    as constants."""
    tabular: bool = False
    """Observations index a finite state set (LPG's tabular grids)."""
    one_hot_obs: bool = False
    """Observations are one-hot vectors, so an agent may read them as a table row."""
    collect_actions: bool = False
    """The action set includes explicit collect actions (LPG's 18-action grids)."""

    def finalise_params(self, params: Any) -> Any:
        """Params with the fields derived from drawn ones filled in; nothing by default."""
        return params

    def release(self) -> None:
        """Frees the host copies a run used (host-stepped envs); nothing for jitted ones."""

    def close(self) -> None:
        """Ends the env's host processes for good (host-stepped envs); nothing otherwise."""

    def episode_log(self) -> list[dict] | None:
        """Per-agent returns of the games played (multi-agent envs); None otherwise."""
        return None


def capability(env: Any, name: str) -> Any:
    """``env``'s value of one of the capabilities above; for an env that is not an
    :class:`Env` (a gymnax env handed straight to a family's ``make_train``), the value a plain
    jitted single-agent env has."""
    return getattr(env, name, getattr(Env, name))
