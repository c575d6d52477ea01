"""The pettingzoo backend: parallel multi-agent envs as ``pettingzoo/<suite>.<module>``.

Every agent is an independent learner: the families see each agent of each game as one env
copy, so agents are batched exactly like vectorised envs, share the agent's parameters and
learn with the same rule. A family's ``num_envs`` copies per seed are therefore
``num_envs / num_agents`` games, and ``num_envs`` must be a multiple of the number of agents.
Sharing parameters needs every agent to have the same observation and action spaces; games
whose agents differ are refused with a clear error when built.

Episodes end as the library ends them. An agent whose episode ends while its game plays on
(a knight killed in knights_archers_zombies, a walker that falls in multiwalker with
``terminate_on_fall: false``) leaves the game, and the other agents play on, exactly as in the
library. Its copy cannot start a new episode before the game does, so it waits in an absorbing
state: it keeps its last observation, gets reward 0 and its actions are not sent. Its end is
reported, with the flag the library gave it when it left (``terminated``, or ``truncated``) and
that last observation as ``final_observation``, on the step the game is over (every agent has
left) and is reset; every copy of the game then gets the new game's first observation. So a
copy's episode return is the agent's return in the library, and its waiting steps are those of
a terminal absorbing state (reward 0, no effect, value 0). (In the MPE games every agent's
episode ends at ``max_cycles`` anyway, and nobody waits.)

A time limit is a truncation (:mod:`metabench.envs.conformance`). ``sisl.multiwalker_v9``
reports its ``max_cycles`` limit as a termination of every agent; the pool reads it as the
library means it (:data:`TIME_LIMIT_AS_TERMINATION`): the walkers the step really ended (a
fall, the package dropped or delivered) are terminated, the others truncated.

Returns per agent are what the families record and score (the mean over agents); the pool
also keeps every finished game's per-agent and team (summed) returns, which the harness adds
to each seed's record (:meth:`GamePool.episode_log`).

MPE lives in the ``mpe2`` package (``pettingzoo/mpe.simple_spread_v3``); SISL and Butterfly
games come from pettingzoo itself (``pettingzoo/sisl.multiwalker_v9``; Butterfly needs
pygame). Keyword params of ``make`` (task YAML ``params:``) go to ``parallel_env``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import numpy as np

from metabench.envs.hostenv import HostEnv, HostPool, StepResult, gymnax_space
from metabench.envs.registry import EnvEntry, register

# suite -> (python package, parallel-env modules whose agents share spaces). The other MPE
# games (adversary, tag, push, crypto, speaker-listener, world-comm, collect-treasure) mix
# roles with different spaces, which parameter sharing cannot serve.
SUITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mpe": ("mpe2", ("simple_v3", "simple_spread_v3", "simple_reference_v3", "simple_line_v1",
                     "simple_formation_v1")),
    "sisl": ("pettingzoo.sisl", ("multiwalker_v9", "pursuit_v5")),
    "butterfly": ("pettingzoo.butterfly", ("pistonball_v6", "cooperative_pong_v6",
                                           "knights_archers_zombies_v11")),
}
_NOTES = {"butterfly": "host-stepped, multi-agent; pistonball needs pymunk"}


def _multiwalker_terminations(env: Any, terminated: dict) -> dict:
    """multiwalker_v9 marks every agent terminated once ``frames >= max_cycles``; its base
    env's last dones say which walkers the step really ended."""
    base = env.unwrapped.env
    if base.frames < base.max_cycles:
        return {}
    really = base.get_last_dones()
    return {a: bool(really[i]) for i, a in enumerate(env.possible_agents) if a in terminated}


# Games that report their time limit as a termination: ``(parallel env, terminations of the
# step) -> {agent: really terminated}`` on the steps where the limit is reached.
TIME_LIMIT_AS_TERMINATION: dict[str, Callable[[Any, dict], dict]] = {
    "sisl.multiwalker_v9": _multiwalker_terminations,
}


class _Game:
    """One live parallel env and the running returns of its current episode."""

    def __init__(self, env: Any, agents: list[str], obs: dict, group: int):
        self.env, self.agents, self.group = env, agents, group
        self.obs = obs
        self.returns = np.zeros(len(agents))
        self.t = 0
        self.left: dict[str, bool] = {}
        """Agents whose episode ended, and whether it was terminated (else truncated)."""


class GamePool(HostPool):
    """Copies = (game, agent) pairs; one reset batch (one seed's copies) is one group of
    ``len(seeds) / num_agents`` games."""

    def __init__(self, make_game: Callable[[], Any], agents: list[str], obs_shape: tuple,
                 action_shape: tuple,
                 real_terminations: Callable[[Any, dict], dict] | None = None):
        self._make_game = make_game
        self._real_terminations = real_terminations
        self.agents = list(agents)
        self._obs_shape, self._act_shape = obs_shape, action_shape
        self._games: list[_Game] = []
        self._where: dict[int, tuple[int, int]] = {}  # slot -> (game, agent index)
        self._next = 0
        self._log: list[dict] = []  # per group: finished episodes

    def _obs(self, game: _Game, obs: dict) -> np.ndarray:
        return np.stack([np.asarray(obs[a], np.float32).reshape(self._obs_shape)
                         for a in game.agents])

    def reset(self, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = len(self.agents)
        if len(seeds) % k:
            raise ValueError(f"{len(seeds)} env copies cannot be split into games of {k} "
                             f"agents: make the agent's num_envs a multiple of {k}")
        group = len(self._log)
        self._log.append({"steps": [], "team": [], "agents": [], "total_steps": 0})
        slots, obs = [], []
        for g in range(len(seeds) // k):
            env = self._make_game()
            o, _ = env.reset(seed=int(seeds[g * k]))
            game = _Game(env, self.agents, o, group)
            for i in range(k):
                self._where[self._next] = (len(self._games), i)
                slots.append(self._next)
                self._next += 1
            self._games.append(game)
            obs.append(self._obs(game, o))
        return np.array(slots), np.concatenate(obs)

    def step(self, slots: np.ndarray, actions: np.ndarray) -> StepResult:
        groups = self._groups(slots, lambda g: len(self.agents), "pettingzoo")
        n, k = len(slots), len(self.agents)
        obs = np.empty((n, *self._obs_shape), np.float32)
        final = np.empty_like(obs)
        reward = np.zeros(n, np.float32)
        term, trunc = np.zeros(n, bool), np.zeros(n, bool)
        for g, rows in groups.items():
            game = self._games[g]
            playing = set(game.env.agents)
            o, r, te, tr, _ = game.env.step({a: actions[row] for a, row in zip(game.agents, rows)
                                             if a in playing})
            game.t += 1
            self._log[game.group]["total_steps"] = max(self._log[game.group]["total_steps"],
                                                       game.t)
            game.obs = {**game.obs, **o}  # an agent that left keeps its last observation
            really = self._real_terminations(game.env, te) if self._real_terminations else {}
            for a in game.agents:
                if a not in game.left and (te.get(a, False) or tr.get(a, False)):
                    game.left[a] = really.get(a, bool(te.get(a, False)))
            r_vec = np.array([float(r.get(a, 0.0)) for a in game.agents])
            game.returns += r_vec
            reward[rows], final[rows] = r_vec, self._obs(game, game.obs)
            if len(game.left) == k or not game.env.agents:
                # Every agent has left: the game is over. Each agent's end is reported now,
                # with the flag the library gave it when it left.
                ended = np.array([game.left.get(a, False) for a in game.agents])
                term[rows], trunc[rows] = ended, ~ended
                log = self._log[game.group]
                log["steps"].append(game.t)
                log["team"].append(float(game.returns.sum()))
                log["agents"].append(game.returns.copy())
                new_obs, _ = game.env.reset()
                game.obs, game.returns, game.left = new_obs, np.zeros(k), {}
                obs[rows] = self._obs(game, new_obs)
            else:
                obs[rows] = final[rows]
        return StepResult(obs, reward, term, trunc, final)

    def episode_log(self) -> list[dict]:
        """Per reset group (one per seed, in reset order): the step count of each finished
        game at its end, its team return, its per-agent returns ``[games, agents]``, and the
        group's step count."""
        return [{"steps": np.asarray(g["steps"]), "team": np.asarray(g["team"]),
                 "agents": np.asarray(g["agents"]).reshape(-1, len(self.agents)),
                 "total_steps": g["total_steps"]} for g in self._log]

    def release(self) -> None:
        for game in self._games:
            game.env.close()
        self._games, self._where, self._log, self._cached = [], {}, [], None


class MultiAgentEnv(HostEnv):
    """A :class:`HostEnv` whose copies are the agents of parallel games."""

    def __init__(self, *args, agents: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.agents = list(agents)

    @property
    def num_agents(self) -> int:
        return len(self.agents)

    def episode_log(self) -> list[dict]:
        return self.pool.episode_log()


def _factory(suite: str, module: str) -> Callable[..., tuple[MultiAgentEnv, Any]]:
    env_id = f"pettingzoo/{suite}.{module}"

    def make(**kwargs: Any) -> tuple[MultiAgentEnv, Any]:
        kwargs = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                  for k, v in kwargs.items()}
        try:
            mod = importlib.import_module(f"{SUITES[suite][0]}.{module}")
        except ImportError as e:
            raise ValueError(f"{env_id} needs a package that is not installed: {e}") from None
        try:
            probe = mod.parallel_env(**kwargs)
        except TypeError as e:
            raise ValueError(f"{env_id} does not take these parameters "
                             f"({', '.join(sorted(kwargs))}): {e}") from None
        agents = list(probe.possible_agents)
        obs_spaces = {a: probe.observation_space(a) for a in agents}
        act_spaces = {a: probe.action_space(a) for a in agents}
        limit = int(kwargs.get("max_cycles", getattr(probe.unwrapped, "max_cycles", 1000)))
        probe.close()
        first = agents[0]
        differ = [a for a in agents if obs_spaces[a] != obs_spaces[first]
                  or act_spaces[a] != act_spaces[first]]
        if differ:
            raise ValueError(
                f"{env_id}: agents {first} and {differ[0]} have different spaces "
                f"({obs_spaces[first]}, {act_spaces[first]} vs {obs_spaces[differ[0]]}, "
                f"{act_spaces[differ[0]]}); independent learners that share parameters need "
                f"identical spaces")
        try:
            obs_space, act_space = gymnax_space(obs_spaces[first]), gymnax_space(act_spaces[first])
        except ValueError as e:
            raise ValueError(f"{env_id}: {e}") from None
        act_shape = () if hasattr(act_space, "n") else tuple(act_space.shape)
        pool = GamePool(lambda: mod.parallel_env(**kwargs), agents,
                        tuple(obs_space.shape), act_shape,
                        TIME_LIMIT_AS_TERMINATION.get(f"{suite}.{module}"))
        # parallel_env(**kwargs) forwards to raw_env, whose signature names the options.
        sig = inspect.signature(getattr(mod, "raw_env", mod.parallel_env))
        options = tuple(sorted(n for n, p in sig.parameters.items() if n != "render_mode"
                               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)))
        env = MultiAgentEnv(env_id, pool, obs_space, act_space, limit, options, agents=agents)
        return env, env.default_params

    return make


for _suite, (_, _modules) in SUITES.items():
    for _module in _modules:
        register(EnvEntry(id=f"pettingzoo/{_suite}.{_module}", factory=_factory(_suite, _module),
                          jittable=False, note=_NOTES.get(_suite, "host-stepped, multi-agent")),
                 overwrite=True)
