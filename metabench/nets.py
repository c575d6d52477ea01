"""The agents' flax networks: MLP and MinAtar-CNN actor-critics, discrete or Gaussian heads.

Policy outputs are plain arrays (logits, or a mean with a state-independent log std), and
the distribution maths are small pure functions below, so families stay readable.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SQRT2 = float(np.sqrt(2.0))


def _dense(features: int, scale: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(scale),
                    bias_init=nn.initializers.zeros)


class MLPTorso(nn.Module):
    hidden: Sequence[int]
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = {"tanh": nn.tanh, "relu": nn.relu}[self.activation]
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = act(_dense(h, _SQRT2)(x))
        return x


class MinAtarTorso(nn.Module):
    """The MinAtar baselines' torso: one 3x3 conv with 16 channels, then a dense layer."""

    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), padding="VALID",
                            kernel_init=nn.initializers.orthogonal(_SQRT2))(x))
        x = x.reshape((x.shape[0], -1))
        return nn.relu(_dense(self.hidden, _SQRT2)(x))


class ActorCritic(nn.Module):
    """Separate actor and critic torsos (PureJaxRL style).

    ``__call__(obs) -> (policy_out, value)`` with obs batched ``[N, ...]``; ``value(obs)``
    runs the critic alone, used to bootstrap from final observations cheaply.
    """

    action_dim: int
    continuous: bool = False
    torso: str = "mlp"
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"

    def _torso(self, name: str):
        if self.torso == "cnn":
            return MinAtarTorso(hidden=self.hidden[-1], name=name)
        return MLPTorso(hidden=tuple(self.hidden), activation=self.activation, name=name)

    def setup(self):
        self.actor_torso = self._torso("actor")
        self.critic_torso = self._torso("critic")
        self.actor_head = _dense(self.action_dim, 0.01)
        self.critic_head = _dense(1, 1.0)
        if self.continuous:
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))

    def __call__(self, obs):
        out = self.actor_head(self.actor_torso(obs))
        if self.continuous:
            out = jnp.concatenate([out, jnp.broadcast_to(self.log_std, out.shape)], axis=-1)
        return out, self.value(obs)

    def value(self, obs):
        return self.critic_head(self.critic_torso(obs))[..., 0]


# --- distribution maths over the policy output -------------------------------------------


def sample(key: jax.Array, out: jax.Array, continuous: bool) -> jax.Array:
    if continuous:
        mean, log_std = jnp.split(out, 2, axis=-1)
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    return jax.random.categorical(key, out)


def log_prob(out: jax.Array, action: jax.Array, continuous: bool) -> jax.Array:
    if continuous:
        mean, log_std = jnp.split(out, 2, axis=-1)
        z = (action - mean) / jnp.exp(log_std)
        return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
    logp = jax.nn.log_softmax(out)
    return jnp.take_along_axis(logp, action[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(out: jax.Array, continuous: bool) -> jax.Array:
    if continuous:
        _, log_std = jnp.split(out, 2, axis=-1)
        return jnp.sum(log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e), axis=-1)
    logp = jax.nn.log_softmax(out)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class QNetwork(nn.Module):
    """Q-values over actions: an MLP on flattened observations (PureJaxRL's DQN: relu 120, 84)
    or the MinAtar torso."""

    action_dim: int
    torso: str = "mlp"
    hidden: Sequence[int] = (120, 84)

    @nn.compact
    def __call__(self, obs):
        if self.torso == "cnn":
            x = MinAtarTorso(hidden=self.hidden[-1])(obs)
        else:
            x = MLPTorso(hidden=tuple(self.hidden), activation="relu")(obs)
        return nn.Dense(self.action_dim)(x)
