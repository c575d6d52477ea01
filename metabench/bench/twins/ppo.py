"""Reference minimal PPO: a single-file, end-to-end jitted PPO (PureJaxRL style).

This module is deliberately standalone (it imports nothing from ``metabench``):
it is the yardstick against which the benchmark's general training harness is
timed. The whole training run -- environment rollouts, GAE, minibatch PPO
updates and episode-return logging -- is one ``jax.jit``-compiled function.

Algorithm (kept identical to the harness so the timing comparison is fair):

* gymnax 1.0 environments, vmapped over ``num_envs``; auto-reset, with
  ``info["final_observation"]`` giving the true next observation.
* Separate actor / critic tanh MLPs, orthogonal init, categorical policy.
* Rollout of ``num_steps`` via ``lax.scan``; bootstrap values for every
  ``final_observation`` computed afterwards in one batched critic pass.
* GAE with truncation handled correctly:
  ``delta_t = r_t + gamma * (1 - terminated_t) * V(final_obs_t) - V(s_t)``,
  ``A_t = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}``.
* ``update_epochs`` x ``num_minibatches`` clipped-surrogate PPO updates with
  per-minibatch advantage normalisation, clipped value loss, entropy bonus.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Config:
    env_name: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 500_000
    update_epochs: int = 4
    num_minibatches: int = 4
    lr: float = 2.5e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.num_steps)

    @property
    def minibatch_size(self) -> int:
        return (self.num_envs * self.num_steps) // self.num_minibatches


# --------------------------------------------------------------------------- #
# Networks
# --------------------------------------------------------------------------- #


class MLPHead(nn.Module):
    """Two tanh hidden layers followed by a linear head."""

    hidden: int
    out_dim: int
    head_scale: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden_init = nn.initializers.orthogonal(np.sqrt(2.0))
        zeros = nn.initializers.zeros
        x = nn.tanh(nn.Dense(self.hidden, kernel_init=hidden_init, bias_init=zeros)(x))
        x = nn.tanh(nn.Dense(self.hidden, kernel_init=hidden_init, bias_init=zeros)(x))
        return nn.Dense(
            self.out_dim,
            kernel_init=nn.initializers.orthogonal(self.head_scale),
            bias_init=zeros,
        )(x)


class Transition(NamedTuple):
    obs: jax.Array  # [T, B, obs_dim]
    action: jax.Array  # [T, B]
    log_prob: jax.Array  # [T, B]
    value: jax.Array  # [T, B]
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
    num_actions = env.action_space(env_params).n
    actor = MLPHead(config.hidden, num_actions, 0.01)
    critic = MLPHead(config.hidden, 1, 1.0)

    num_updates = config.num_updates
    if config.anneal_lr:
        lr = optax.linear_schedule(
            init_value=config.lr,
            end_value=0.0,
            transition_steps=num_updates * config.num_minibatches * config.update_epochs,
        )
    else:
        lr = config.lr
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adam(lr, eps=1e-5),
    )
    return env, env_params, actor, critic, tx


def make_init(config: Config) -> Callable[[jax.Array], RunnerState]:
    """``init(rng) -> RunnerState``: network/optimiser init and env reset."""
    env, env_params, actor, critic, tx = _setup(config)

    def init(rng: jax.Array) -> RunnerState:
        rng, k_actor, k_critic, k_env = jax.random.split(rng, 4)
        obs0, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_env, config.num_envs), env_params
        )
        obs0 = jax.vmap(_flat_obs)(obs0)
        dummy = jnp.zeros(obs0.shape[1:], jnp.float32)
        params = {
            "actor": actor.init(k_actor, dummy),
            "critic": critic.init(k_critic, dummy),
        }
        opt_state = tx.init(params)
        return RunnerState(
            params=params,
            opt_state=opt_state,
            env_state=env_state,
            obs=obs0,
            ep_return=jnp.zeros((config.num_envs,), jnp.float32),
            rng=rng,
        )

    return init


def make_run(config: Config) -> Callable[[RunnerState], dict]:
    """``run(runner_state) -> metrics``: the full training loop."""
    env, env_params, actor, critic, tx = _setup(config)
    num_updates = config.num_updates
    batch_size = config.num_envs * config.num_steps

    def env_step(rng, env_state, action):
        obs, env_state, reward, terminated, truncated, info = env.step(
            rng, env_state, action, env_params
        )
        return (
            _flat_obs(obs),
            env_state,
            reward.astype(jnp.float32),
            terminated,
            truncated,
            _flat_obs(info["final_observation"]),
        )

    v_env_step = jax.vmap(env_step)

    def critic_value(critic_params, obs):
        return critic.apply(critic_params, obs)[..., 0]

    # ---- rollout ---------------------------------------------------------- #
    def rollout_step(carry, _):
        params, env_state, obs, ep_return, rng = carry
        rng, k_act, k_env = jax.random.split(rng, 3)
        logits = actor.apply(params["actor"], obs)
        value = critic_value(params["critic"], obs)
        action = jax.random.categorical(k_act, logits)
        log_prob = jnp.take_along_axis(
            jax.nn.log_softmax(logits), action[:, None], axis=-1
        )[:, 0]
        next_obs, env_state, reward, terminated, truncated, final_obs = v_env_step(
            jax.random.split(k_env, config.num_envs), env_state, action
        )
        done = jnp.logical_or(terminated, truncated)
        ep_return = ep_return + reward
        finished_return = jnp.where(done, ep_return, 0.0)
        ep_return = jnp.where(done, 0.0, ep_return)
        transition = Transition(
            obs=obs,
            action=action,
            log_prob=log_prob,
            value=value,
            reward=reward,
            terminated=terminated,
            done=done,
            final_obs=final_obs,
        )
        return (params, env_state, next_obs, ep_return, rng), (transition, finished_return)

    # ---- GAE -------------------------------------------------------------- #
    def compute_gae(traj: Transition, next_value: jax.Array):
        not_term = 1.0 - traj.terminated.astype(jnp.float32)
        not_done = 1.0 - traj.done.astype(jnp.float32)
        deltas = traj.reward + config.gamma * not_term * next_value - traj.value

        def step(adv_next, xs):
            delta, nd = xs
            adv = delta + config.gamma * config.gae_lambda * nd * adv_next
            return adv, adv

        _, advantages = jax.lax.scan(
            step, jnp.zeros_like(deltas[0]), (deltas, not_done), reverse=True
        )
        return advantages, advantages + traj.value

    # ---- PPO loss --------------------------------------------------------- #
    def loss_fn(params, mb):
        obs, action, old_log_prob, old_value, advantages, targets = mb
        logits = actor.apply(params["actor"], obs)
        value = critic_value(params["critic"], obs)
        log_probs_all = jax.nn.log_softmax(logits)
        log_prob = jnp.take_along_axis(log_probs_all, action[:, None], axis=-1)[:, 0]

        v_clipped = old_value + jnp.clip(
            value - old_value, -config.clip_eps, config.clip_eps
        )
        value_loss = 0.5 * jnp.maximum(
            jnp.square(value - targets), jnp.square(v_clipped - targets)
        ).mean()

        adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        ratio = jnp.exp(log_prob - old_log_prob)
        surr1 = ratio * adv
        surr2 = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps) * adv
        actor_loss = -jnp.minimum(surr1, surr2).mean()

        entropy = -(jnp.exp(log_probs_all) * log_probs_all).sum(-1).mean()
        return actor_loss + config.vf_coef * value_loss - config.ent_coef * entropy

    grad_fn = jax.grad(loss_fn)

    def minibatch_update(carry, mb):
        params, opt_state = carry
        grads = grad_fn(params, mb)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), None

    def epoch_update(carry, _):
        params, opt_state, batch, rng = carry
        rng, k_perm = jax.random.split(rng)
        perm = jax.random.permutation(k_perm, batch_size)
        minibatches = jax.tree.map(
            lambda x: jnp.take(x, perm, axis=0).reshape(
                (config.num_minibatches, -1) + x.shape[1:]
            ),
            batch,
        )
        (params, opt_state), _ = jax.lax.scan(
            minibatch_update, (params, opt_state), minibatches
        )
        return (params, opt_state, batch, rng), None

    # ---- one PPO update ---------------------------------------------------- #
    def update_step(runner: RunnerState, _):
        params, opt_state, env_state, obs, ep_return, rng = runner
        (params, env_state, obs, ep_return, rng), (traj, finished) = jax.lax.scan(
            rollout_step,
            (params, env_state, obs, ep_return, rng),
            None,
            length=config.num_steps,
        )
        # Bootstrap values of the true next observations, one batched pass.
        next_value = critic_value(params["critic"], traj.final_obs)
        advantages, targets = compute_gae(traj, next_value)

        def flat(x):
            return x.reshape((batch_size,) + x.shape[2:])

        batch = (
            flat(traj.obs),
            flat(traj.action),
            flat(traj.log_prob),
            flat(traj.value),
            flat(advantages),
            flat(targets),
        )
        rng, k_upd = jax.random.split(rng)
        (params, opt_state, _, _), _ = jax.lax.scan(
            epoch_update, (params, opt_state, batch, k_upd), None,
            length=config.update_epochs,
        )
        metrics = {
            "returns_sum": finished.sum(),
            "episodes": traj.done.sum().astype(jnp.int32),
        }
        return RunnerState(params, opt_state, env_state, obs, ep_return, rng), metrics

    def run(runner_state: RunnerState) -> dict:
        _, metrics = jax.lax.scan(update_step, runner_state, None, length=num_updates)
        return metrics

    return run


def make_train(config: Config) -> Callable[[jax.Array], dict]:
    """``train(rng) -> {"returns_sum": [num_updates], "episodes": [num_updates]}``."""
    init = make_init(config)
    run = make_run(config)

    def train(rng: jax.Array) -> dict:
        return run(init(rng))

    return train


def final_return(metrics: dict) -> float:
    """Mean over seeds of the average episode return in the last 5% of updates."""
    returns_sum = np.asarray(metrics["returns_sum"], dtype=np.float64)
    episodes = np.asarray(metrics["episodes"], dtype=np.float64)
    if returns_sum.ndim == 1:
        returns_sum, episodes = returns_sum[None], episodes[None]
    n = max(1, returns_sum.shape[-1] // 20)
    per_seed = returns_sum[:, -n:].sum(-1) / np.maximum(episodes[:, -n:].sum(-1), 1.0)
    return float(per_seed.mean())


def benchmark(config: Config, seeds: int = 1, repeats: int = 2) -> dict:
    """Compile once, run ``repeats`` times, report best wall time and env steps/s.

    Network initialisation is done per seed with ``lax.map`` (never vmapped:
    batched QR from the orthogonal initialiser can deadlock on CPU); only the
    training loop itself is vmapped over seeds.
    """
    init = make_init(config)
    run = make_run(config)
    fn = jax.jit(lambda rngs: jax.vmap(run)(jax.lax.map(init, rngs)))
    rngs = jax.random.split(jax.random.PRNGKey(0), seeds)

    t0 = time.perf_counter()
    compiled = fn.lower(rngs).compile()
    compile_s = time.perf_counter() - t0

    run_s = float("inf")
    metrics = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        metrics = jax.block_until_ready(compiled(rngs))
        run_s = min(run_s, time.perf_counter() - t0)

    return {
        "compile_s": compile_s,
        "run_s": run_s,
        "env_steps_per_s": seeds * config.num_updates * config.num_envs * config.num_steps / run_s,
        "final_return": final_return(metrics),
    }


if __name__ == "__main__":
    print(benchmark(Config()))
