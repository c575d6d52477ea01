"""The delayed chain MDPs of Oh et al. 2020 (LPG), as jittable gymnax-style envs: ``chain/...``.

Two actions. The first action of an episode picks a branch of the chain; every later action
just moves one state along it (both actions do the same). After ``chain_length`` steps the
episode terminates with reward +1 if the first action was the level's ``good_action`` and -1
otherwise. Earlier steps give 0, or, in the noisy chains, ``+noise_scale`` or
``-noise_scale`` with probability 1/2 each (the paper's noisy chain: random +-1 rewards). The
agent must credit a reward ``chain_length`` steps late to the very first decision; the optimal
policy's expected return is exactly 1 in every variant (the noise has mean zero).

**Observation.**

* plain and noisy chains: the one-hot of the state index, ``[1 + 2 * max_length]``: index 0
  is the start state, ``1 + branch * max_length + (pos - 1)`` the state ``pos`` steps along
  branch ``branch`` (the first action taken). So the branch is part of the (Markov) state,
  and a tabular agent can propagate the final reward back along each branch; ``max_length``
  is the top of the env's length range, static per id.
* distractor chains (as in the paper): ``[2 + 20]`` bits and no position. Bit 0 is 1 at the
  start state (before the first action), bit 1 is 1 once the first action taken this episode
  was the good one (0 at the start and on the bad branch), and the 20 remaining bits are
  Bernoulli(1/2), drawn afresh at every observation.

**Variants** (Oh et al. 2020, appendix A):

==========================  ============  ==============================================
id                          length range  extra
==========================  ============  ==============================================
chain/short                 [5, 30]
chain/long                  [5, 50]
chain/short-noisy           [5, 30]       +-1 reward (prob 1/2 each) on non-final steps
chain/long-noisy            [5, 50]       +-1 reward (prob 1/2 each) on non-final steps
chain/short-distractor      [5, 30]       2 informative + 20 random observation bits
chain/long-distractor       [5, 50]       2 informative + 20 random observation bits
==========================  ============  ==============================================

Differences from the paper, and why: the plain and noisy chains observe a one-hot of (branch,
position) rather than whatever encoding the paper used (the appendix does not give one; a
one-hot state is what a tabular agent needs); the length ranges are those of the public
reproductions.

**Lifetimes and levels.** The chain length (and which first action is good) is drawn *per
lifetime*, i.e. per seed, through ``level_seed``: ``-1`` (the default) uses ``chain_length``
and ``good_action`` as given; ``>= 0`` makes ``finalise_params`` (called by the task's param
sampler once per seed, jitted) draw ``chain_length`` uniformly from ``[min_length,
max_length]`` and ``good_action`` from {0, 1}. ``default_params`` is level 0 (stored with
``level_seed = -1``). A task samples a chain per seed with::

    - env: chain/short
      params: {level_seed: {uniform: [0, 1000000000]}}

(no change to ``metabench/tasks/spec.py`` needed), or fixes one with ``chain_length: 20``.
``env.sample_params(key)`` draws a level from a PRNG key. ``noise_scale: 0`` turns a noisy
chain's noise off.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import spaces

from metabench.envs.api import Env
from metabench.envs.grids import DEFAULT_LEVEL_SEED, override_params
from metabench.envs.registry import EnvEntry, register

NUM_DISTRACTORS = 20
NUM_INFORMATIVE_BITS = 2
"""Distractor chains: bit 0 (at the start state) and bit 1 (the good branch was taken)."""


@struct.dataclass
class ChainParams:
    chain_length: jax.Array
    """int32: steps per episode (the reward comes on the last)."""
    good_action: jax.Array
    """int32: the first action that earns +1 (the other earns -1)."""
    noise_scale: jax.Array
    """float32: every non-final step rewards +noise_scale or -noise_scale with probability
    1/2 each (0: no noise, reward 0)."""
    min_length: jax.Array
    """int32: lower end of the chain-length range a level seed draws from."""
    max_length: jax.Array
    """int32: upper end (inclusive), at most the env's static ``max_length``."""
    level_seed: jax.Array
    """int32: -1 uses these params as given; >= 0 draws chain_length and good_action."""


@struct.dataclass
class ChainState:
    pos: jax.Array      # int32 steps taken this episode
    branch: jax.Array   # int32 the first action (0 before it is taken)


@dataclasses.dataclass(frozen=True)
class ChainSetting:
    length: tuple[int, int]
    noise_scale: float = 0.0
    distractors: int = 0


SETTINGS: dict[str, ChainSetting] = {
    "short": ChainSetting((5, 30)),
    "long": ChainSetting((5, 50)),
    "short-noisy": ChainSetting((5, 30), noise_scale=1.0),
    "long-noisy": ChainSetting((5, 50), noise_scale=1.0),
    "short-distractor": ChainSetting((5, 30), distractors=NUM_DISTRACTORS),
    "long-distractor": ChainSetting((5, 50), distractors=NUM_DISTRACTORS),
}


class ChainEnv(Env):
    """A delayed chain: ``reset(key, params)``, ``step(key, state, action, params)``.

    ``step`` returns ``(obs, state, reward, terminated, truncated, info)``, auto-resets when
    the chain ends (``truncated`` is always False), with ``info["final_observation"]``.
    """

    jittable = True

    def __init__(self, name: str, setting: ChainSetting):
        self.name = name
        self.id = f"chain/{name}"
        self.setting = setting
        self.max_length = setting.length[1]
        self.num_distractors = setting.distractors
        self.level_fields = ("chain_length", "good_action")
        self._default: ChainParams | None = None

    @property
    def default_params(self) -> ChainParams:
        if self._default is None:
            lo, hi = self.setting.length
            base = ChainParams(chain_length=jnp.int32(hi), good_action=jnp.int32(0),
                               noise_scale=jnp.float32(self.setting.noise_scale),
                               min_length=jnp.int32(lo), max_length=jnp.int32(hi),
                               level_seed=jnp.int32(DEFAULT_LEVEL_SEED))
            self._default = self.finalise_params(base).replace(level_seed=jnp.int32(-1))
        return self._default

    @partial(jax.jit, static_argnums=0)
    def finalise_params(self, params: ChainParams) -> ChainParams:
        """Draws the chain from ``level_seed`` when it is >= 0 and keeps lengths in
        ``[1, max_length]`` (jittable)."""
        key = jax.random.PRNGKey(jnp.maximum(jnp.asarray(params.level_seed, jnp.int32), 0))
        k_len, k_good = jax.random.split(key)
        hi = jnp.clip(params.max_length, 1, self.max_length)
        lo = jnp.clip(params.min_length, 1, hi)
        length = jax.random.randint(k_len, (), lo, hi + 1)
        good = jax.random.randint(k_good, (), 0, 2)
        use = jnp.asarray(params.level_seed) >= 0
        return params.replace(
            chain_length=jnp.clip(jnp.where(use, length, params.chain_length), 1,
                                  self.max_length).astype(jnp.int32),
            good_action=jnp.where(use, good, params.good_action).astype(jnp.int32))

    def sample_params(self, key: jax.Array) -> ChainParams:
        """A random level: the default params with a random ``level_seed`` (jittable)."""
        seed = jax.random.randint(key, (), 0, np.iinfo(np.int32).max)
        return self.finalise_params(self.default_params.replace(level_seed=seed))

    @property
    def one_hot_obs(self) -> bool:
        """Every observation is exactly one-hot (all but the distractor chains)."""
        return not self.num_distractors

    @property
    def obs_size(self) -> int:
        """``1 + 2 * max_length`` (one-hot state), or ``2 + num_distractors`` (distractor)."""
        if self.num_distractors:
            return NUM_INFORMATIVE_BITS + self.num_distractors
        return 1 + 2 * self.max_length

    def _obs(self, key, state: ChainState, params: ChainParams) -> jax.Array:
        if self.num_distractors:
            start = state.pos == 0
            good = ~start & (state.branch == params.good_action)
            info = jnp.stack([start, good]).astype(jnp.float32)
            bits = jax.random.bernoulli(key, 0.5, (self.num_distractors,)).astype(jnp.float32)
            return jnp.concatenate([info, bits])
        index = jnp.where(state.pos == 0, 0, 1 + state.branch * self.max_length + state.pos - 1)
        return jax.nn.one_hot(index, 1 + 2 * self.max_length, dtype=jnp.float32)

    def _reset(self, key, params: ChainParams):
        state = ChainState(pos=jnp.int32(0), branch=jnp.int32(0))
        return self._obs(key, state, params), state

    @partial(jax.jit, static_argnums=0)
    def reset(self, key: jax.Array, params: ChainParams):
        return self._reset(key, params)

    @partial(jax.jit, static_argnums=0)
    def step(self, key, state: ChainState, action, params: ChainParams):
        k_noise, k_obs, k_reset = jax.random.split(key, 3)
        action = jnp.asarray(action, jnp.int32)
        branch = jnp.where(state.pos == 0, action, state.branch)
        pos = state.pos + 1
        terminated = pos >= params.chain_length
        final = jnp.where(branch == params.good_action, 1.0, -1.0)
        sign = jnp.where(jax.random.bernoulli(k_noise, 0.5), 1.0, -1.0)
        reward = jnp.where(terminated, final, params.noise_scale * sign).astype(jnp.float32)
        state_st = ChainState(pos=pos, branch=branch)
        obs_st = self._obs(k_obs, state_st, params)
        obs_re, state_re = self._reset(k_reset, params)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(terminated, a, b), state_re,
                                       state_st)
        obs = jnp.where(terminated, obs_re, obs_st)
        return obs, state, reward, terminated, jnp.bool_(False), {"final_observation": obs_st}

    def observation_space(self, params: ChainParams | None = None) -> spaces.Box:
        return spaces.Box(0.0, 1.0, (self.obs_size,), jnp.float32)

    def action_space(self, params: ChainParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(2)

    def __repr__(self) -> str:
        return f"ChainEnv({self.name!r})"


_ENVS: dict[str, ChainEnv] = {}


def make_env(name: str) -> ChainEnv:
    """The (cached) env instance for ``chain/<name>``."""
    if name not in _ENVS:
        _ENVS[name] = ChainEnv(name, SETTINGS[name])
    return _ENVS[name]


def _factory(name: str) -> Callable[..., tuple[ChainEnv, ChainParams]]:
    def make(**overrides: Any) -> tuple[ChainEnv, ChainParams]:
        env = make_env(name)
        params = env.default_params
        if overrides:
            for field in ("chain_length", "min_length", "max_length"):
                if field in overrides and not 1 <= int(overrides[field]) <= env.max_length:
                    raise ValueError(f"{env.id}: {field} must be in [1, {env.max_length}], "
                                     f"got {overrides[field]}")
            if "good_action" in overrides and int(overrides["good_action"]) not in (0, 1):
                raise ValueError(f"{env.id}: good_action must be 0 or 1, "
                                 f"got {overrides['good_action']}")
            params = override_params(env.id, params, overrides, env.level_fields)
            params = env.finalise_params(params)
        return env, params

    return make


for _name, _s in SETTINGS.items():
    _extra = {0: "", NUM_DISTRACTORS: f", obs: 2 informative + {NUM_DISTRACTORS} random bits"}[
        _s.distractors]
    _noise = f", +-{_s.noise_scale:g} reward noise" if _s.noise_scale else ""
    register(EnvEntry(
        id=f"chain/{_name}", factory=_factory(_name), jittable=True,
        note=f"LPG delayed chain, length {_s.length[0]}-{_s.length[1]} per level_seed"
             f"{_noise}{_extra}"), overwrite=True)
