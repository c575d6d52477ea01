"""Reference minimal LPG agent trained by A2C: single-file, end-to-end jitted (PureJaxRL style).

This module is deliberately standalone (it imports nothing from ``metabench``): it is the
yardstick against which the harness's LPG family (:mod:`metabench.families.lpg`) with its
baseline rule ``actor_critic`` is timed. The whole training run -- environment rollouts,
targets, agent updates and episode-return logging -- is one ``jax.jit``-compiled function.

The agent (Oh et al. 2020) has a policy ``pi(a|s)`` and a prediction vector ``y(s)`` in the
simplex over ``num_bins = 30`` entries; here ``y`` is a categorical value distribution, so the
agent is an A2C with a distributional critic. Kept identical to the family so the timing
comparison is fair:

* gymnax 1.0 environments, vmapped over ``num_envs``; auto-reset, with
  ``info["final_observation"]`` giving the true next observation.
* One network: a relu MLP torso (orthogonal sqrt(2) init, zero bias) with two linear heads
  (flax default init): policy logits and the logits of ``y``.
* Rollout of ``rollout_len`` steps via ``lax.scan``; ``y`` of every ``final_observation``
  computed afterwards in one batched pass.
* Value bins evenly spaced on ``[-v_max, v_max]``; the value of ``y`` is ``E_y[bin]``.
* GAE with truncation handled correctly:
  ``delta_t = r_t + gamma * (1 - terminated_t) * V(final_obs_t) - V(s_t)``,
  ``A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}``; the policy target is ``A_t``
  (not normalised) and the prediction target ``softmax(-(bins - G_t)^2 / (2 sigma^2))`` for
  the lambda-return ``G_t = A_t + V(s_t)`` clipped to the bins, ``sigma`` = ``sigma_bins``
  bin widths (a Gaussian: the KL(y || y_hat) fit then reads out the mean return).
* One gradient step per rollout on
  ``-mean(log pi(a|s) A) + alpha_y * mean(KL(y || y_hat)) - ent_coef * mean(H(pi))``;
  Adam (``eps_root=1e-12``), RMSProp or SGD, after a global-norm clip when
  ``max_grad_norm > 0``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax

"""The ``eps`` of the value transform ``h``."""


@dataclasses.dataclass(frozen=True)
class Config:
    env_name: str = "CartPole-v1"
    total_timesteps: int = 500_000
    num_envs: int = 16
    rollout_len: int = 20
    lr: float = 1e-3
    optimiser: str = "adam"  # adam, rmsprop or sgd
    alpha_y: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 0.99
    gae_lambda: float = 0.95
    v_max: float = 100.0
    sigma_bins: float = 0.75
    max_grad_norm: float = 0.0  # 0 disables the clip
    hidden: tuple[int, ...] = (64,)
    num_bins: int = 30  # the size of y (LPG's m)

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.rollout_len)


# --------------------------------------------------------------------------- #
# Network and value transform
# --------------------------------------------------------------------------- #


class MLPTorso(nn.Module):
    """The relu torso. Its class name makes flax call it ``MLPTorso_0``, the family's name
    for its torso: flax derives each layer's init key from its path in the parameter tree,
    so the same tree is what makes one key draw the family's weights."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.orthogonal(np.sqrt(2.0)),
                                 bias_init=nn.initializers.zeros)(x))
        return x


class Network(nn.Module):
    """Policy logits ``[B, A]`` and prediction logits ``[B, num_bins]`` from one relu torso."""

    hidden: tuple[int, ...]
    num_actions: int
    num_bins: int

    @nn.compact
    def __call__(self, x: jax.Array):
        x = MLPTorso(self.hidden)(x)
        return nn.Dense(self.num_actions)(x), nn.Dense(self.num_bins)(x)


def gaussian_bins(x: jax.Array, bins: jax.Array, sigma: float) -> jax.Array:
    """Scalars as discretised Gaussians over ``bins``, centred on ``x``."""
    return jax.nn.softmax(-jnp.square(bins - x[..., None]) / (2.0 * sigma ** 2), axis=-1)


class Transition(NamedTuple):
    obs: jax.Array  # [T, B, obs_dim]
    action: jax.Array  # [T, B]
    reward: jax.Array  # [T, B]
    terminated: jax.Array  # [T, B]
    done: jax.Array  # [T, B]  (terminated | truncated)
    final_obs: jax.Array  # [T, B, obs_dim]  true next obs (before auto-reset)


class RunnerState(NamedTuple):
    params: Any
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


def _setup(config: Config):
    env, env_params = gymnax.make(config.env_name)
    network = Network(tuple(config.hidden), env.action_space(env_params).n, config.num_bins)
    # eps_root as in the family (it keeps Adam differentiable for meta-gradients there).
    tx = {"adam": lambda lr: optax.adam(lr, eps_root=1e-12), "rmsprop": optax.rmsprop,
          "sgd": optax.sgd}[config.optimiser](config.lr)
    if config.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)
    return env, env_params, network, tx


def make_init(config: Config) -> Callable[[jax.Array], RunnerState]:
    """``init(rng) -> RunnerState``: network/optimiser init and env reset."""
    env, env_params, network, tx = _setup(config)

    def init(rng: jax.Array) -> RunnerState:
        # Four keys, the last unused (the family draws env parameters with it): a seed's
        # key then gives the family's weights and resets.
        rng, k_net, k_env, _ = jax.random.split(rng, 4)
        obs0, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_env, config.num_envs), env_params
        )
        obs0 = jax.vmap(_flat_obs)(obs0)
        params = network.init(k_net, jnp.zeros((1,) + obs0.shape[1:], jnp.float32))
        return RunnerState(params, tx.init(params), env_state, obs0,
                           jnp.zeros((config.num_envs,), jnp.float32), rng)

    return init


def make_run(config: Config) -> Callable[[RunnerState], dict]:
    """``run(runner_state) -> metrics``: the full training loop."""
    env, env_params, network, tx = _setup(config)
    n, t_len, m = config.num_envs, config.rollout_len, config.num_bins
    sigma = config.sigma_bins * 2.0 * config.v_max / (m - 1)

    def env_step(rng, env_state, action):
        obs, env_state, reward, terminated, truncated, info = env.step(
            rng, env_state, action, env_params
        )
        return (_flat_obs(obs), env_state, reward.astype(jnp.float32), terminated, truncated,
                _flat_obs(info["final_observation"]))

    v_env_step = jax.vmap(env_step)

    # ---- rollout ---------------------------------------------------------- #
    def rollout_step(carry, _):
        params, env_state, obs, ep_return, rng = carry
        rng, k_act, k_env = jax.random.split(rng, 3)
        logits, _ = network.apply(params, obs)
        action = jax.random.categorical(k_act, logits)
        next_obs, env_state, reward, terminated, truncated, final_obs = v_env_step(
            jax.random.split(k_env, n), env_state, action
        )
        done = jnp.logical_or(terminated, truncated)
        ep_return = ep_return + reward
        finished = (jnp.sum(jnp.where(done, ep_return, 0.0)), jnp.sum(done))
        ep_return = jnp.where(done, 0.0, ep_return)
        transition = Transition(obs, action, reward, terminated, done, final_obs)
        return (params, env_state, next_obs, ep_return, rng), (transition, finished)

    # ---- targets: GAE advantage, a Gaussian over the bins on the lambda-return ---- #
    def targets(traj: Transition, y: jax.Array, y_next: jax.Array):
        bins = jnp.linspace(-config.v_max, config.v_max, m)
        value = y @ bins
        next_value = y_next @ bins
        not_term = 1.0 - traj.terminated.astype(jnp.float32)
        not_done = 1.0 - traj.done.astype(jnp.float32)
        # gamma as a float32 array, as the family hands it to the rule, so the products
        # round the same way.
        gamma = jnp.full(traj.reward.shape, config.gamma, jnp.float32)
        deltas = traj.reward + gamma * not_term * next_value - value
        decay = gamma * config.gae_lambda * not_done

        def step(adv_next, xs):
            delta, k = xs
            adv = delta + k * adv_next
            return adv, adv

        _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[0]), (deltas, decay),
                                     reverse=True)
        ret = jnp.clip(advantages + value, -config.v_max, config.v_max)
        return advantages, gaussian_bins(ret, bins, sigma)

    # ---- agent loss --------------------------------------------------------- #
    def loss_fn(params, traj: Transition, y_next: jax.Array):
        logits, y_logits = network.apply(params, traj.obs.reshape((t_len * n, -1)))
        logits = logits.reshape((t_len, n, -1))
        y = jax.nn.softmax(y_logits.reshape((t_len, n, m)), axis=-1)
        # Targets come from the agent's own outputs but are not differentiated.
        advantages, y_hat = jax.lax.stop_gradient(targets(traj, y, y_next))
        log_probs_all = jax.nn.log_softmax(logits)
        log_prob = jnp.take_along_axis(log_probs_all, traj.action[..., None], axis=-1)[..., 0]
        pg = jnp.mean(log_prob * advantages)
        kl = jnp.mean(jnp.sum(y * (jnp.log(jnp.maximum(y, 1e-30))
                                   - jnp.log(jnp.maximum(y_hat, 1e-30))), axis=-1))
        entropy = jnp.mean(-jnp.sum(jnp.exp(log_probs_all) * log_probs_all, axis=-1))
        return -pg + config.alpha_y * kl - config.ent_coef * entropy

    grad_fn = jax.value_and_grad(loss_fn)

    # ---- one update: rollout, then one gradient step ----------------------- #
    def update_step(runner: RunnerState, _):
        params, opt_state, env_state, obs, ep_return, rng = runner
        (params, env_state, obs, ep_return, rng), (traj, (ret_sum, n_eps)) = jax.lax.scan(
            rollout_step, (params, env_state, obs, ep_return, rng), None, length=t_len
        )
        # y of the true next observations, one batched pass.
        _, y_next_logits = network.apply(params, traj.final_obs.reshape((t_len * n, -1)))
        y_next = jax.nn.softmax(y_next_logits.reshape((t_len, n, m)), axis=-1)
        loss, grads = grad_fn(params, traj, y_next)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"returns_sum": ret_sum.sum(), "episodes": n_eps.sum(), "loss": loss}
        return RunnerState(params, opt_state, env_state, obs, ep_return, rng), metrics

    def run(runner_state: RunnerState) -> dict:
        _, metrics = jax.lax.scan(update_step, runner_state, None, length=config.num_updates)
        return metrics

    return run


def make_train(config: Config) -> Callable[[jax.Array], dict]:
    """``train(rng) -> {"returns_sum", "episodes", "loss"}``, each ``[num_updates]``."""
    init = make_init(config)
    run = make_run(config)

    def train(rng: jax.Array) -> dict:
        return run(init(rng))

    return train
