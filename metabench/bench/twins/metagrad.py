"""Reference minimal meta-gradient actor-critic: a single-file, end-to-end jitted
online meta-gradient A2C (Xu, van Hasselt and Silver 2018), PureJaxRL style.

This module is deliberately standalone (it imports nothing from ``metabench``):
it is the yardstick against which the benchmark's general training harness is
timed for the ``metagrad`` family with its ``metagrad_gamma`` rule. The whole
training run -- rollouts, lambda-returns, the meta-gradient step on gamma, the
agent's step and episode-return logging -- is one ``jax.jit``-compiled
``lax.scan`` over updates.

Algorithm (kept identical to the harness so the timing comparison is fair):

* gymnax 1.0 environments, vmapped over ``num_envs``; auto-reset, with
  ``info["final_observation"]`` giving the true next observation.
* One actor-critic module with separate actor and critic tanh MLPs
  (orthogonal init: sqrt(2) hidden, 0.01 policy head, 1.0 value head),
  categorical policy.
* Each update collects ``rollout_len`` steps, then bootstraps values of every
  ``final_observation`` in one batched critic pass.
* The return ``g`` is the truncation-aware lambda-return:
  ``delta_t = r_t + gamma * (1 - terminated_t) * V(final_obs_t) - V(s_t)``,
  ``A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}``, ``g_t = A_t + V(s_t)``,
  with ``gamma = sigmoid(eta)`` adapted and ``lambda`` fixed.
* Agent loss ``-mean((g - V_old) log pi) + vf_coef * 0.5 * mean((V - g)^2)
  - ent_coef * mean(entropy)``; one step of global-norm clipping and Adam per
  rollout.
* Meta step, before the agent step of every update but the first: ``eta``
  follows (Adam, ``meta_lr``) the gradient of the next rollout's policy-gradient
  objective ``-mean((g_bar - V) log pi_theta'(a|s))``, ``g_bar`` the
  lambda-return with ``gamma_bar`` and ``lambda_bar``, where ``theta'(eta)`` is
  the previous agent step redone as a function of ``eta`` (clipping and Adam
  included).
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
    total_timesteps: int = 150_000
    num_envs: int = 16
    rollout_len: int = 16
    lr: float = 1e-3
    max_grad_norm: float = 0.5  # 0 disables clipping
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    meta_lr: float = 1e-2
    gamma_bar: float = 0.99
    lambda_bar: float = 1.0
    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"
    gamma: float = 0.99  # initial discount, adapted
    lambda_: float = 0.95  # fixed

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.rollout_len)


# --------------------------------------------------------------------------- #
# Network
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
            x = act(_dense(width, float(np.sqrt(2.0)))(x))
        return x


class ActorCritic(nn.Module):
    """``(logits, value)``. Submodule names match the harness's network, so one
    key initialises both to the same weights."""

    num_actions: int
    hidden: Sequence[int]
    activation: str

    def setup(self):
        self.actor = Torso(tuple(self.hidden), self.activation)
        self.critic = Torso(tuple(self.hidden), self.activation)
        self.actor_head = _dense(self.num_actions, 0.01)
        self.critic_head = _dense(1, 1.0)

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.actor_head(self.actor(obs)), self.value(obs)

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic_head(self.critic(obs))[..., 0]


# --------------------------------------------------------------------------- #
# State
# --------------------------------------------------------------------------- #


class Batch(NamedTuple):
    """One rollout, time-major ``[T, B, ...]``."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    value: jax.Array  # V(s_t) under the params that acted
    next_value: jax.Array  # V(final_obs_t), before any auto-reset


class RunnerState(NamedTuple):
    params: Any
    opt_state: Any
    eta_delta: jax.Array  # adapted offset of gamma's logit from its initial value
    meta_opt_state: Any
    # The previous agent step's inputs: the meta-gradient redoes that step.
    prev_params: Any
    prev_opt_state: Any
    prev_batch: Batch
    env_state: Any
    obs: jax.Array  # [B, obs_dim]
    ep_return: jax.Array  # [B] running undiscounted episode return
    rng: jax.Array


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def _flat_obs(obs: jax.Array) -> jax.Array:
    return obs.reshape(-1).astype(jnp.float32)


def _setup(config: Config):
    env, env_params = gymnax.make(config.env_name)
    num_actions = env.action_space(env_params).n
    network = ActorCritic(num_actions, tuple(config.hidden), config.activation)
    # eps_root keeps Adam's sqrt differentiable at a zero second moment: the
    # meta-gradient goes through it.
    adam = optax.adam(config.lr, eps=1e-5, eps_root=1e-12)
    tx = (optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)
          if config.max_grad_norm > 0 else adam)
    meta_tx = optax.adam(config.meta_lr)
    return env, env_params, network, tx, meta_tx


def lambda_return(batch: Batch, gamma: jax.Array, lambda_: jax.Array) -> jax.Array:
    """Bootstraps on truncation (from V(final_obs)) but not on termination; the
    trace is cut at every episode end."""
    not_term = 1.0 - batch.terminated.astype(jnp.float32)
    not_done = 1.0 - jnp.logical_or(batch.terminated, batch.truncated).astype(jnp.float32)
    delta = batch.reward + gamma * not_term * batch.next_value - batch.value
    decay = gamma * lambda_ * not_done

    def backward(acc, xs):
        d, k = xs
        acc = d + k * acc
        return acc, acc

    _, adv = jax.lax.scan(backward, jnp.zeros_like(delta[0]), (delta, decay), reverse=True)
    return adv + batch.value


def make_init(config: Config) -> Callable[[jax.Array], RunnerState]:
    """``init(rng) -> RunnerState``: network/optimiser init and env reset."""
    env, env_params, network, tx, meta_tx = _setup(config)
    obs_shape = env.observation_space(env_params).shape
    obs_dim = int(np.prod(obs_shape))
    t, b = config.rollout_len, config.num_envs

    def init(rng: jax.Array) -> RunnerState:
        # Four keys like the harness (whose fourth samples env parameters), so
        # that the same seed key gives the same run.
        rng, k_net, k_env, _ = jax.random.split(rng, 4)
        params = network.init(k_net, jnp.zeros((1, obs_dim)))
        opt_state = tx.init(params)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_env, b), env_params)
        delta = jnp.zeros((), jnp.float32)
        # Update 0 has no previous rollout: this placeholder is never differentiated.
        empty = Batch(jnp.zeros((t, b, obs_dim)), jnp.zeros((t, b), jnp.int32),
                      jnp.zeros((t, b)), jnp.zeros((t, b), bool), jnp.zeros((t, b), bool),
                      jnp.zeros((t, b)), jnp.zeros((t, b)))
        return RunnerState(params, opt_state, delta, meta_tx.init(delta), params, opt_state,
                           empty, env_state, jax.vmap(_flat_obs)(obs),
                           jnp.zeros((b,), jnp.float32), rng)

    return init


def make_run(config: Config) -> Callable[[RunnerState], dict]:
    """``run(runner_state) -> metrics``: the full training loop."""
    env, env_params, network, tx, meta_tx = _setup(config)
    num_updates = config.num_updates
    t, b = config.rollout_len, config.num_envs
    gamma_logit0 = jnp.float32(_logit(config.gamma))
    lambda_logit = jnp.float32(_logit(config.lambda_))

    def env_step(rng, env_state, action):
        obs, env_state, reward, terminated, truncated, info = env.step(
            rng, env_state, action, env_params)
        return (_flat_obs(obs), env_state, reward.astype(jnp.float32), terminated, truncated,
                _flat_obs(info["final_observation"]))

    v_env_step = jax.vmap(env_step)

    def eta(delta):
        # lambda goes through the same sigmoid as gamma so that both are the
        # rule's values bit for bit; it gets no gradient.
        return jax.nn.sigmoid(gamma_logit0 + delta), jax.nn.sigmoid(lambda_logit)

    # ---- rollout ---------------------------------------------------------- #
    def rollout_step(carry, _):
        params, env_state, obs, ep_return, rng = carry
        rng, k_act, k_env = jax.random.split(rng, 3)
        logits, value = network.apply(params, obs)
        action = jax.random.categorical(k_act, logits)
        next_obs, env_state, reward, terminated, truncated, final_obs = v_env_step(
            jax.random.split(k_env, b), env_state, action)
        done = jnp.logical_or(terminated, truncated)
        ep_return = ep_return + reward
        finished = (jnp.sum(jnp.where(done, ep_return, 0.0)), jnp.sum(done))
        ep_return = jnp.where(done, 0.0, ep_return)
        step = (obs, action, reward, terminated, truncated, value, final_obs)
        return (params, env_state, next_obs, ep_return, rng), (step, finished)

    # ---- losses ----------------------------------------------------------- #
    def policy(params, batch: Batch):
        logits, value = network.apply(params, batch.obs.reshape((t * b, -1)))
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, batch.action.reshape(-1)[:, None], axis=-1)[:, 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return logp.reshape((t, b)), value.reshape((t, b)), entropy.reshape((t, b))

    def loss_fn(params, batch: Batch, delta):
        gamma, lambda_ = eta(delta)
        g = lambda_return(batch, gamma, lambda_)
        logp, value, entropy = policy(params, batch)
        # No stop-gradient: adv is constant in params already, and the
        # meta-gradient must flow through it to gamma.
        adv = g - batch.value
        v_loss = 0.5 * jnp.mean((value - g) ** 2)
        return (-jnp.mean(adv * logp) + config.vf_coef * v_loss
                - config.ent_coef * jnp.mean(entropy))

    grad_fn = jax.grad(loss_fn)

    def agent_step(params, opt_state, batch, delta):
        updates, opt_state = tx.update(grad_fn(params, batch, delta), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def meta_gradient(state: RunnerState, batch: Batch, delta):
        advantage = lambda_return(batch, config.gamma_bar, config.lambda_bar) - batch.value

        def objective(d):
            params, _ = agent_step(state.prev_params, state.prev_opt_state, state.prev_batch, d)
            logp, _, _ = policy(params, batch)
            return -jnp.mean(advantage * logp)

        return jax.grad(objective)(delta)

    # ---- one update -------------------------------------------------------- #
    def update_step(state: RunnerState, i):
        (_, env_state, obs, ep_return, rng), (traj, (ret_sum, n_eps)) = jax.lax.scan(
            rollout_step, (state.params, state.env_state, state.obs, state.ep_return,
                           state.rng), None, length=t)
        obs_t, action, reward, terminated, truncated, value, final_obs = traj
        next_value = network.apply(state.params, final_obs.reshape((t * b, -1)),
                                   method=ActorCritic.value).reshape((t, b))
        batch = Batch(obs_t, action, reward, terminated, truncated, value, next_value)

        def meta_step(carry):
            delta, meta_opt_state = carry
            grad = meta_gradient(state, batch, delta)
            updates, meta_opt_state = meta_tx.update(grad, meta_opt_state, delta)
            return optax.apply_updates(delta, updates), meta_opt_state

        # `i` is the scan index, not part of the vmapped state, so this stays a
        # real branch when training is vmapped over seeds.
        delta, meta_opt_state = jax.lax.cond(i > 0, meta_step, lambda c: c,
                                             (state.eta_delta, state.meta_opt_state))
        params, opt_state = agent_step(state.params, state.opt_state, batch, delta)
        new_state = RunnerState(params, opt_state, delta, meta_opt_state, state.params,
                                state.opt_state, batch, env_state, obs, ep_return, rng)
        metrics = {"returns_sum": jnp.sum(ret_sum), "episodes": jnp.sum(n_eps),
                   "gamma": eta(delta)[0]}
        return new_state, metrics

    def run(runner_state: RunnerState) -> dict:
        _, metrics = jax.lax.scan(update_step, runner_state, jnp.arange(num_updates))
        return metrics

    return run


def make_train(config: Config) -> Callable[[jax.Array], dict]:
    """``train(rng) -> {"returns_sum", "episodes", "gamma"}``, each ``[num_updates]``."""
    init = make_init(config)
    run = make_run(config)

    def train(rng: jax.Array) -> dict:
        return run(init(rng))

    return train
