"""Reference minimal DQN: a single-file, end-to-end jitted DQN (PureJaxRL style).

This module is deliberately standalone (it imports nothing from ``metabench``):
it is the yardstick against which the benchmark's general training harness is
timed for the DQN inner loop. The whole training run -- epsilon-greedy acting,
replay-buffer insertion and sampling, Q-learning updates, target-network
updates and episode-return logging -- is one ``jax.jit``-compiled
``lax.scan`` over iterations.

Algorithm (kept identical to the harness so the timing comparison is fair):

* gymnax 1.0 environments, vmapped over ``num_envs``; auto-reset, with
  ``info["final_observation"]`` giving the true next observation.
  Observations are flattened (``obs.reshape(-1)``) so MinAtar works too.
* One iteration = one vectorised step of all ``num_envs`` environments, so
  after iteration ``i`` (0-based) the env-step counter is
  ``t = (i + 1) * num_envs``; ``num_updates = total_timesteps // num_envs``.
* Acting: epsilon-greedy on the online Q-network, epsilon annealed linearly
  from ``eps_start`` to ``eps_end`` over ``eps_decay_steps`` env steps,
  evaluated at the env-step count *before* the step (``i * num_envs``).
* Circular replay buffer of JAX arrays (``buffer_size`` transitions of
  ``(obs, action, reward, terminated, next_obs=final_observation)``); the
  ``num_envs`` new transitions are inserted every iteration, and a batch of
  ``batch_size`` is sampled uniformly (with replacement) from the filled part.
* One gradient step in every iteration in which ``t`` crosses a multiple of
  ``train_every`` (i.e. ``t // train_every > (t - num_envs) // train_every``;
  with the defaults, every iteration), provided ``t >= learning_starts`` and
  the buffer holds at least ``batch_size`` transitions.
* Loss ``mean(0.5 * (Q(s, a) - y)^2)`` with
  ``y = stop_gradient(r + gamma * (1 - terminated) * max_a' Q_target(s', a'))``;
  truncated episodes are bootstrapped because ``s'`` is the true final
  observation and only ``terminated`` cuts the bootstrap.
  Plain adam, as PureJaxRL's DQN and the td_loss family's default (``max_grad_norm = 0``);
  ``optax.clip_by_global_norm(max_grad_norm)`` before it when ``max_grad_norm > 0``.
* Target update ``target <- tau * online + (1 - tau) * target`` (``tau=1``:
  hard copy) in every iteration in which ``t`` crosses a multiple of
  ``target_update_period``, after that iteration's gradient step.

All gates are functions of the (unbatched) scan iteration index, so under a
``vmap`` over seeds the ``lax.cond`` s stay real conditionals.
"""

from __future__ import annotations

import dataclasses
import time
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
    num_envs: int = 10
    buffer_size: int = 10_000
    batch_size: int = 128
    total_timesteps: int = 500_000
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_steps: int = 250_000  # env steps, linear
    target_update_period: int = 500  # env steps
    lr: float = 2.5e-4
    learning_starts: int = 10_000  # env steps
    train_every: int = 10  # env steps per gradient step
    gamma: float = 0.99
    hidden: Sequence[int] = (120, 84)
    max_grad_norm: float = 0.0  # 0 disables the clip: PureJaxRL's DQN uses plain adam
    tau: float = 1.0

    @property
    def num_updates(self) -> int:
        """Number of iterations (vectorised env steps) of the training scan."""
        return self.total_timesteps // self.num_envs


# --------------------------------------------------------------------------- #
# Network, replay buffer, state
# --------------------------------------------------------------------------- #


class QNetwork(nn.Module):
    """ReLU MLP Q-network (PureJaxRL's DQN: 120-84), default flax init."""

    hidden: Sequence[int]
    num_actions: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_actions)(x)


class ReplayBuffer(NamedTuple):
    obs: jax.Array  # [N, obs_dim]
    action: jax.Array  # [N] int32
    reward: jax.Array  # [N] float32
    terminated: jax.Array  # [N] float32 (1.0 = true terminal)
    next_obs: jax.Array  # [N, obs_dim]  true next obs (before auto-reset)
    pos: jax.Array  # [] int32, next insertion index
    size: jax.Array  # [] int32, number of valid entries


class RunnerState(NamedTuple):
    params: Any
    target_params: Any
    opt_state: Any
    buffer: ReplayBuffer
    env_state: Any
    obs: jax.Array  # [B, obs_dim]
    ep_return: jax.Array  # [B] running undiscounted episode return
    rng: jax.Array


def _flat_obs(obs: jax.Array) -> jax.Array:
    return obs.reshape(-1).astype(jnp.float32)


def _buffer_init(size: int, obs_dim: int) -> ReplayBuffer:
    return ReplayBuffer(
        obs=jnp.zeros((size, obs_dim), jnp.float32),
        action=jnp.zeros((size,), jnp.int32),
        reward=jnp.zeros((size,), jnp.float32),
        terminated=jnp.zeros((size,), jnp.float32),
        next_obs=jnp.zeros((size, obs_dim), jnp.float32),
        pos=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32),
    )


def _buffer_add(buf: ReplayBuffer, obs, action, reward, terminated, next_obs) -> ReplayBuffer:
    capacity = buf.obs.shape[0]
    n = obs.shape[0]
    idx = (buf.pos + jnp.arange(n, dtype=jnp.int32)) % capacity
    return ReplayBuffer(
        obs=buf.obs.at[idx].set(obs),
        action=buf.action.at[idx].set(action.astype(jnp.int32)),
        reward=buf.reward.at[idx].set(reward),
        terminated=buf.terminated.at[idx].set(terminated.astype(jnp.float32)),
        next_obs=buf.next_obs.at[idx].set(next_obs),
        pos=(buf.pos + n) % capacity,
        size=jnp.minimum(buf.size + n, capacity),
    )


def _buffer_sample(buf: ReplayBuffer, rng: jax.Array, batch_size: int):
    idx = jax.random.randint(rng, (batch_size,), 0, jnp.maximum(buf.size, 1))
    return (buf.obs[idx], buf.action[idx], buf.reward[idx],
            buf.terminated[idx], buf.next_obs[idx])


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def _setup(config: Config):
    env, env_params = gymnax.make(config.env_name)
    num_actions = env.action_space(env_params).n
    network = QNetwork(tuple(config.hidden), num_actions)
    tx = optax.adam(config.lr)
    if config.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)
    return env, env_params, network, tx, num_actions


def make_init(config: Config) -> Callable[[jax.Array], RunnerState]:
    """``init(rng) -> RunnerState``: network/optimiser/buffer init and env reset."""
    env, env_params, network, tx, _ = _setup(config)

    def init(rng: jax.Array) -> RunnerState:
        rng, k_net, k_env = jax.random.split(rng, 3)
        obs0, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(k_env, config.num_envs), env_params
        )
        obs0 = jax.vmap(_flat_obs)(obs0)
        obs_dim = obs0.shape[1]
        params = network.init(k_net, jnp.zeros((obs_dim,), jnp.float32))
        return RunnerState(
            params=params,
            target_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            buffer=_buffer_init(config.buffer_size, obs_dim),
            env_state=env_state,
            obs=obs0,
            ep_return=jnp.zeros((config.num_envs,), jnp.float32),
            rng=rng,
        )

    return init


def make_run(config: Config) -> Callable[[RunnerState], dict]:
    """``run(runner_state) -> metrics``: the full training loop."""
    env, env_params, network, tx, num_actions = _setup(config)
    num_envs = config.num_envs

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

    def epsilon(env_steps):
        frac = jnp.minimum(env_steps / config.eps_decay_steps, 1.0)
        return config.eps_start + frac * (config.eps_end - config.eps_start)

    def loss_fn(params, target_params, batch):
        obs, action, reward, terminated, next_obs = batch
        q = network.apply(params, obs)
        q_sa = jnp.take_along_axis(q, action[:, None], axis=-1)[:, 0]
        q_next = network.apply(target_params, next_obs).max(-1)
        y = jax.lax.stop_gradient(reward + config.gamma * (1.0 - terminated) * q_next)
        return 0.5 * jnp.mean(jnp.square(q_sa - y))

    grad_fn = jax.grad(loss_fn)

    def learn(operand):
        params, target_params, opt_state, buffer, rng = operand
        batch = _buffer_sample(buffer, rng, config.batch_size)
        grads = grad_fn(params, target_params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def no_learn(operand):
        params, _, opt_state, _, _ = operand
        return params, opt_state

    def crossed(t, period):
        """True iff env-step count ``t`` passed a multiple of ``period`` this iteration."""
        return (t // period) > ((t - num_envs) // period)

    def iteration(runner: RunnerState, i):
        params, target_params, opt_state, buffer, env_state, obs, ep_return, rng = runner
        rng, k_explore, k_rand, k_env, k_sample = jax.random.split(rng, 5)

        # ---- act (epsilon-greedy, online network) ------------------------ #
        greedy = jnp.argmax(network.apply(params, obs), axis=-1)
        random_action = jax.random.randint(k_rand, (num_envs,), 0, num_actions)
        explore = jax.random.uniform(k_explore, (num_envs,)) < epsilon(i * num_envs)
        action = jnp.where(explore, random_action, greedy)

        # ---- env step + store ------------------------------------------ #
        next_obs, env_state, reward, terminated, truncated, final_obs = v_env_step(
            jax.random.split(k_env, num_envs), env_state, action
        )
        buffer = _buffer_add(buffer, obs, action, reward, terminated, final_obs)

        done = jnp.logical_or(terminated, truncated)
        ep_return = ep_return + reward
        finished_return = jnp.where(done, ep_return, 0.0)
        ep_return = jnp.where(done, 0.0, ep_return)

        # ---- learn (gates depend only on the unbatched iteration index) -- #
        t = (i + 1) * num_envs
        filled = jnp.minimum(t, config.buffer_size)
        do_learn = (
            (t >= config.learning_starts)
            & (filled >= config.batch_size)
            & crossed(t, config.train_every)
        )
        params, opt_state = jax.lax.cond(
            do_learn, learn, no_learn,
            (params, target_params, opt_state, buffer, k_sample),
        )
        target_params = jax.lax.cond(
            crossed(t, config.target_update_period),
            lambda: optax.incremental_update(params, target_params, config.tau),
            lambda: target_params,
        )

        metrics = {
            "returns_sum": finished_return.sum(),
            "episodes": done.sum().astype(jnp.int32),
        }
        runner = RunnerState(params, target_params, opt_state, buffer, env_state,
                             next_obs, ep_return, rng)
        return runner, metrics

    def run(runner_state: RunnerState) -> dict:
        _, metrics = jax.lax.scan(
            iteration, runner_state, jnp.arange(config.num_updates, dtype=jnp.int32)
        )
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
    """Mean over seeds of the average episode return in the last 5% of iterations."""
    returns_sum = np.asarray(metrics["returns_sum"], dtype=np.float64)
    episodes = np.asarray(metrics["episodes"], dtype=np.float64)
    if returns_sum.ndim == 1:
        returns_sum, episodes = returns_sum[None], episodes[None]
    n = max(1, returns_sum.shape[-1] // 20)
    per_seed = returns_sum[:, -n:].sum(-1) / np.maximum(episodes[:, -n:].sum(-1), 1.0)
    return float(per_seed.mean())


def benchmark(config: Config, seeds: int = 1, repeats: int = 2) -> dict:
    """Compile once, run ``repeats`` times, report best wall time and env steps/s.

    Initialisation is done per seed with ``lax.map`` (never vmapped: batched
    initialisers can deadlock on CPU); only the training loop is vmapped over
    seeds.
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
        "env_steps_per_s": seeds * config.num_updates * config.num_envs / run_s,
        "final_return": final_return(metrics),
    }


if __name__ == "__main__":
    print(benchmark(Config()))
