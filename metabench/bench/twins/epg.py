"""Reference minimal EPG agent: a single-file, end-to-end jitted REINFORCE with a learned
baseline (PureJaxRL style), the agent of EPG (Houthooft et al. 2018) with its starting loss.

This module is deliberately standalone (it imports nothing from ``metabench``): it is the
yardstick against which the harness's EPG family (``families/epg.py`` with the rule
``reinforce``) is timed. The whole training run -- rollouts, returns, Adam updates and
episode-return logging -- is one ``jax.jit``-compiled function.

Algorithm (kept identical to the harness so the timing comparison is fair):

* gymnax 1.0 environments, vmapped over ``num_envs``; auto-reset, with
  ``info["final_observation"]`` giving the true next observation.
* Separate actor / critic MLPs (orthogonal init, categorical policy), one flax module whose
  parameter tree is the family's, plus the agent-side memory vector of EPG's contract
  (``memory_dim`` parameters, trained by Adam with everything else; REINFORCE never reads
  it, so its gradient is zero).
* Rollout of ``rollout_len`` steps via ``lax.scan``; values of every ``final_observation``
  computed afterwards in one batched critic pass.
* Returns to go within the rollout, cut at every episode end and at the rollout's last step,
  where they continue with ``V(s')`` (0 after a terminal state):
  ``G_t = r_t + gamma * (bootstrap_t if cut_t else G_{t+1})``. Computed once per rollout
  (the family computes them inside each minibatch's loss: the same values, as an env's
  returns depend on its own series only).
* ``epochs`` x ``minibatches`` Adam steps on minibatches of whole envs' time series, loss
  ``mean(-(G - sg V) log pi(a|s) + vf_coef (G - V)^2 - ent_coef H)``.

A seed's key draws the same weights, resets, actions and permutations as the family's
``init`` and ``step`` with the same key, so the two train the same agent (with the default
config, bit for bit).

The family also keeps, per env, a buffer of its ``buffer_len`` most recent steps across
updates, which a learned loss reads (``Inputs.history``, re-evaluated with the current
parameters). REINFORCE never reads it, so its network passes over the buffer are dead code
there and this twin keeps no buffer; what the harness still does for it (shifting the
buffer's arrays in its state once per update) is harness overhead in the timing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Config:
    env_name: str = "CartPole-v1"
    total_timesteps: int = 100_000
    num_envs: int = 16
    rollout_len: int = 32
    epochs: int = 1
    minibatches: int = 1  # split over envs: every minibatch keeps whole [T] time series
    lr: float = 3e-3
    anneal_lr: bool = False
    max_grad_norm: float = 0.0  # 0 disables clipping
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    gamma: float = 0.99
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    memory_dim: int = 8

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.rollout_len)


# --------------------------------------------------------------------------- #
# Networks
# --------------------------------------------------------------------------- #


def _dense(features: int, scale: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(scale),
                    bias_init=nn.initializers.zeros)


class Torso(nn.Module):
    hidden: Sequence[int]
    activation: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = nn.tanh if self.activation == "tanh" else nn.relu
        for width in self.hidden:
            x = act(_dense(width, np.sqrt(2.0))(x))
        return x


class ActorCritic(nn.Module):
    """Separate actor and critic torsos; ``value`` runs the critic alone."""

    num_actions: int
    hidden: Sequence[int]
    activation: str

    def setup(self):
        # These names give the harness's parameter tree, so one key draws the same weights.
        self.actor = Torso(self.hidden, self.activation)
        self.critic = Torso(self.hidden, self.activation)
        self.actor_head = _dense(self.num_actions, 0.01)
        self.critic_head = _dense(1, 1.0)

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.policy(obs), self.value(obs)

    def policy(self, obs: jax.Array) -> jax.Array:
        return self.actor_head(self.actor(obs))

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic_head(self.critic(obs))[..., 0]


class Transition(NamedTuple):
    obs: jax.Array  # [T, B, obs_dim]
    action: jax.Array  # [T, B]
    reward: jax.Array  # [T, B]
    terminated: jax.Array  # [T, B]
    done: jax.Array  # [T, B]  (terminated | truncated)
    final_obs: jax.Array  # [T, B, obs_dim]  true next obs (before auto-reset)


class RunnerState(NamedTuple):
    params: Any  # {"net": actor-critic parameters, "memory": [memory_dim]}
    opt_state: Any
    env_state: Any
    obs: jax.Array  # [B, obs_dim]
    ep_return: jax.Array  # [B] running undiscounted episode return
    rng: jax.Array


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def _flat_obs(obs: jax.Array) -> jax.Array:
    return obs.reshape(-1).astype(jnp.float32)


# Two separate log-softmaxes, as in the harness: with one shared, the backward pass adds the
# two cotangents in another order and the actor drifts from the harness's in the last bits.
def _log_prob(logits: jax.Array, action: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], axis=-1)[..., 0]


def _entropy(logits: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def _setup(config: Config):
    if config.num_envs % config.minibatches:
        raise ValueError("minibatches must divide num_envs")
    env, env_params = gymnax.make(config.env_name)
    network = ActorCritic(env.action_space(env_params).n, tuple(config.hidden),
                          config.activation)
    if config.anneal_lr:
        lr = optax.linear_schedule(
            config.lr, 0.0, config.num_updates * config.epochs * config.minibatches)
    else:
        lr = config.lr
    tx = optax.adam(lr, eps=1e-5)
    if config.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)
    return env, env_params, network, tx


def make_init(config: Config) -> Callable[[jax.Array], RunnerState]:
    """``init(rng) -> RunnerState``: network/optimiser init and env reset."""
    env, env_params, network, tx = _setup(config)

    def init(rng: jax.Array) -> RunnerState:
        # Five keys, the last unused (the harness draws env parameters with it): a seed's
        # key then gives the harness's weights, memory and resets.
        rng, k_net, k_mem, k_env, _ = jax.random.split(rng, 5)
        obs0, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_env, config.num_envs), env_params)
        obs0 = jax.vmap(_flat_obs)(obs0)
        params = {"net": network.init(k_net, jnp.zeros((1, obs0.shape[1]), jnp.float32)),
                  "memory": jax.random.normal(k_mem, (config.memory_dim,))}
        return RunnerState(params, tx.init(params), env_state, obs0,
                           jnp.zeros((config.num_envs,), jnp.float32), rng)

    return init


def make_run(config: Config) -> Callable[[RunnerState], dict]:
    """``run(runner_state) -> metrics``: the full training loop."""
    env, env_params, network, tx = _setup(config)
    n, t_len = config.num_envs, config.rollout_len
    mb_envs = n // config.minibatches

    def env_step(rng, env_state, action):
        obs, env_state, reward, terminated, truncated, info = env.step(
            rng, env_state, action, env_params)
        return (_flat_obs(obs), env_state, reward.astype(jnp.float32), terminated, truncated,
                _flat_obs(info["final_observation"]))

    v_env_step = jax.vmap(env_step)

    # ---- rollout ---------------------------------------------------------- #
    def rollout_step(carry, _):
        params, env_state, obs, ep_return, rng = carry
        rng, k_act, k_env = jax.random.split(rng, 3)
        # Only the actor: the loss recomputes V(s) with gradients, so no value is stored.
        logits = network.apply(params["net"], obs, method=network.policy)
        action = jax.random.categorical(k_act, logits)
        next_obs, env_state, reward, terminated, truncated, final_obs = v_env_step(
            jax.random.split(k_env, n), env_state, action)
        done = jnp.logical_or(terminated, truncated)
        ep_return = ep_return + reward
        finished_return = jnp.where(done, ep_return, 0.0)
        ep_return = jnp.where(done, 0.0, ep_return)
        transition = Transition(obs, action, reward, terminated, done, final_obs)
        return (params, env_state, next_obs, ep_return, rng), (transition, finished_return)

    # ---- returns to go ------------------------------------------------------ #
    def returns_to_go(traj: Transition, next_value: jax.Array) -> jax.Array:
        bootstrap = jnp.where(traj.terminated, 0.0, next_value)
        # The rollout's last step is a cut too: the next step is not in the buffer.
        cut = traj.done.at[-1].set(True)

        def backward(g_next, xs):
            r, c, boot = xs
            g = r + config.gamma * jnp.where(c, boot, g_next)
            return g, g

        _, g = jax.lax.scan(backward, jnp.zeros_like(traj.reward[0]),
                            (traj.reward, cut, bootstrap), reverse=True)
        return g

    # ---- loss over a minibatch of whole envs, [b, T] ------------------------ #
    def loss_fn(params, mb):
        obs, action, g = mb
        b = g.shape[0]
        logits, value = network.apply(params["net"], obs.reshape((b * t_len, -1)))
        logits = logits.reshape((b, t_len, -1))
        log_prob, entropy = _log_prob(logits, action), _entropy(logits)
        value = value.reshape((b, t_len))
        adv = g - jax.lax.stop_gradient(value)
        loss = -adv * log_prob + config.vf_coef * (g - value) ** 2 - config.ent_coef * entropy
        return jnp.mean(loss), jnp.mean(entropy)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_update(carry, mb):
        params, opt_state = carry
        (loss, entropy), grads = grad_fn(params, mb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, entropy)

    def epoch_update(carry, key):
        params, opt_state, batch = carry
        perm = jax.random.permutation(key, n)
        minibatches = jax.tree.map(
            lambda x: x[perm].reshape((config.minibatches, mb_envs) + x.shape[1:]), batch)
        (params, opt_state), out = jax.lax.scan(
            minibatch_update, (params, opt_state), minibatches)
        return (params, opt_state, batch), out

    # ---- one update --------------------------------------------------------- #
    def update_step(runner: RunnerState, _):
        params, opt_state, env_state, obs, ep_return, rng = runner
        (params, env_state, obs, ep_return, rng), (traj, finished) = jax.lax.scan(
            rollout_step, (params, env_state, obs, ep_return, rng), None, length=t_len)
        # Bootstrap values of the true next observations, one batched pass.
        next_value = network.apply(
            params["net"], traj.final_obs.reshape((n * t_len, -1)),
            method=network.value).reshape((t_len, n))
        g = returns_to_go(traj, next_value)
        # Batch-major [B, T]: minibatches are whole envs' time series.
        batch = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (traj.obs, traj.action, g))
        rng, k_epochs = jax.random.split(rng)
        (params, opt_state, _), (loss, entropy) = jax.lax.scan(
            epoch_update, (params, opt_state, batch), jax.random.split(k_epochs, config.epochs))
        metrics = {
            "returns_sum": finished.sum(),
            "episodes": traj.done.sum().astype(jnp.int32),
            "loss": loss.mean(),
            "entropy": entropy.mean(),
        }
        return RunnerState(params, opt_state, env_state, obs, ep_return, rng), metrics

    def run(runner_state: RunnerState) -> dict:
        _, metrics = jax.lax.scan(update_step, runner_state, None, length=config.num_updates)
        return metrics

    return run


def make_train(config: Config) -> Callable[[jax.Array], dict]:
    """``train(rng) -> {"returns_sum", "episodes", "loss", "entropy"}``, each
    ``[num_updates]``."""
    init = make_init(config)
    run = make_run(config)

    def train(rng: jax.Array) -> dict:
        return run(init(rng))

    return train
