"""The TD-loss family: a DQN agent whose loss over Q-values is the rule.

Co-Reyes et al. 2021, "Evolving Reinforcement Learning Algorithms" (ICLR) searched losses of
this form with regularised evolution and found DQNReg and DQNClipped. The agent around the rule
is fixed by the task: epsilon-greedy acting on vectorised gymnax envs, a circular replay buffer
in JAX arrays, online and periodically copied target networks, Adam. Per sampled transition
the rule sees Q-values only (never an observation), and returns a loss that the agent
minimises in batch mean. Targets are computed under ``stop_gradient``: a rule shapes the loss,
not what it is differentiated through.

A rule of this family can also be written as a typed computation graph over the Q-values, the
paper's search space. The graph language lives in this package, one concern per module, and
its public names are re-exported here:

- :mod:`~metabench.families.td_loss.graph`: types, operations, graphs and the type checker;
- :mod:`~metabench.families.td_loss.evaluate`: a graph as a JAX loss (compiled, or through
  the interpreter that runs a whole population in one compiled call);
- :mod:`~metabench.families.td_loss.formula`: a graph printed as an equation;
- :mod:`~metabench.families.td_loss.search`: functional hashes, mutation and random graphs;
- :mod:`~metabench.families.td_loss.yaml_form`: the YAML form and the shipped graphs in
  ``library/`` (DQN, DQNReg, DQNClipped).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metabench import nets
from metabench.families.base import (Check, CheckReport, Family, Trainer, check_config, check_rule,
                                     finite_tree, register_family, update_count)
# The graph language's API, so that ``td_loss.load_graph`` and the like name it from the
# family. The submodules never import this package back (see tests/test_layers.py).
from metabench.families.td_loss.evaluate import (INTERPRETER_OPS, EncodedGraph, compile_graph,
                                                 encode, interpreter_rule, live_size)
from metabench.families.td_loss.formula import equation
from metabench.families.td_loss.graph import (CONSTANTS, INPUTS, OPS, Graph, GraphError,
                                              GraphTypeError, Node, Op, Type, accepts,
                                              input_node, live_nodes, node_types, typecheck)
from metabench.families.td_loss.search import functional_hash, mutate, random_graph
from metabench.families.td_loss.yaml_form import (LIBRARY_DIR, dump_graph, library,
                                                  library_rule, load_graph)
from metabench.rl import episode_returns
from metabench.rules import RuleInfo, UpdateRule, no_params
from metabench.types import Metrics


class Inputs(NamedTuple):
    """What a TD loss sees per sampled transition (``B`` transitions, ``A`` actions)."""

    q_tm1: jax.Array
    """``[B, A]`` online network at s_t (the only input gradients flow through)."""
    a_tm1: jax.Array
    """``[B]`` action taken (int)."""
    r_t: jax.Array
    """``[B]`` reward."""
    discount_t: jax.Array
    """``[B]`` gamma times (1 - terminated): zero only at true terminations."""
    q_t: jax.Array
    """``[B, A]`` online network at s_t+1."""
    q_target_t: jax.Array
    """``[B, A]`` target network at s_t+1."""


@dataclasses.dataclass(frozen=True)
class Config:
    """DQN's fixed hyperparameters (defaults: PureJaxRL's DQN CartPole settings)."""

    num_envs: int = 10
    """Parallel environments per seed; one update steps each once."""
    buffer_size: int = 10_000
    """Replay buffer capacity in transitions."""
    batch_size: int = 128
    """Transitions per gradient step."""
    eps_start: float = 1.0
    """Initial epsilon of epsilon-greedy acting."""
    eps_end: float = 0.05
    """Final epsilon."""
    eps_decay_steps: int = 250_000
    """Env steps over which epsilon decays linearly."""
    target_update_period: int = 500
    """Env steps between copies of the online network into the target network."""
    lr: float = 2.5e-4
    """Adam learning rate."""
    learning_starts: int = 10_000
    """Env steps before the first gradient step."""
    train_every: int = 10
    """Env steps between gradient steps."""
    gamma: float = 0.99
    """Discount."""
    max_grad_norm: float = 0.0
    """Global gradient-norm clip; 0 disables it (PureJaxRL's DQN uses plain Adam)."""
    network: str = "mlp"
    """``mlp`` (flattened observations) or ``cnn`` (MinAtar torso)."""
    hidden: tuple[int, ...] = (120, 84)
    """Hidden layer sizes (relu); for ``cnn`` the last is the dense layer after the conv."""

    def __post_init__(self):
        check_config(self, ("num_envs", "buffer_size", "batch_size", "target_update_period",
                            "lr", "train_every"), {"network": ("mlp", "cnn")})
        if self.batch_size > self.buffer_size:
            raise ValueError(f"batch_size ({self.batch_size}) exceeds buffer_size "
                             f"({self.buffer_size})")


# --- reference rules ---------------------------------------------------------------------


def _q_sa(x: Inputs) -> jax.Array:
    return jnp.take_along_axis(x.q_tm1, x.a_tm1[:, None].astype(jnp.int32), axis=1)[:, 0]


def _target(x: Inputs) -> jax.Array:
    return x.r_t + x.discount_t * jnp.max(x.q_target_t, axis=1)


@functools.lru_cache(maxsize=None)
def dqn() -> UpdateRule:
    """DQN's squared TD error (Mnih et al. 2015): ``(Q(s,a) - Y)^2``,
    ``Y = r + discount max_a Q_target(s', a)``."""
    return UpdateRule(no_params, lambda p, x: (_q_sa(x) - _target(x)) ** 2)


@functools.lru_cache(maxsize=None)
def ddqn() -> UpdateRule:
    """Double DQN (van Hasselt et al. 2016): the online net picks a', the target net values it."""

    def apply(p, x: Inputs):
        a_star = jnp.argmax(x.q_t, axis=1)
        y = x.r_t + x.discount_t * jnp.take_along_axis(x.q_target_t, a_star[:, None], 1)[:, 0]
        return (_q_sa(x) - y) ** 2

    return UpdateRule(no_params, apply)


@functools.lru_cache(maxsize=None)
def dqn_reg(weight: float = 0.1) -> UpdateRule:
    """DQNReg (Co-Reyes et al. 2021): ``delta^2 + weight * Q(s,a)``, penalising large Q."""
    return UpdateRule(no_params,
                      lambda p, x: (_q_sa(x) - _target(x)) ** 2 + weight * _q_sa(x))


@functools.lru_cache(maxsize=None)
def dqn_clipped() -> UpdateRule:
    """DQNClipped (Co-Reyes et al. 2021):
    ``max(Q, delta^2 + Y) + max(Q - Y, discount (max_a Q_target(s',a))^2)``."""

    def apply(p, x: Inputs):
        q, y = _q_sa(x), _target(x)
        return (jnp.maximum(q, (q - y) ** 2 + y)
                + jnp.maximum(q - y, x.discount_t * jnp.max(x.q_target_t, axis=1) ** 2))

    return UpdateRule(no_params, apply)


@functools.lru_cache(maxsize=None)
def cql(beta: float = 0.1) -> UpdateRule:
    """A CQL-style regularised loss (Kumar et al. 2020), as in Co-Reyes et al.'s comparison:
    ``beta (logsumexp_a Q(s, a) - Q(s,a)) + delta^2``."""

    def apply(p, x: Inputs):
        q = _q_sa(x)
        return beta * (jax.nn.logsumexp(x.q_tm1, axis=1) - q) + (q - _target(x)) ** 2

    return UpdateRule(no_params, apply)


@functools.lru_cache(maxsize=None)
def munchausen(alpha: float = 0.9, tau: float = 0.03, clip_min: float = -1.0) -> UpdateRule:
    """Munchausen-DQN (Vieillard et al. 2020, section 3, the M-DQN regression target)::

        y = r + alpha clip(tau log pi(a|s), clip_min, 0)
              + discount sum_a' pi(a'|s') (Q_target(s', a') - tau log pi(a'|s')),

    with ``pi = softmax(Q / tau)``. The clip ``[., l_0, 0]`` (``l_0 = -1``) applies to the
    scaled term ``tau log pi``, not to ``log pi`` itself: with ``tau = 0.03`` clipping
    ``log pi`` would bound the Munchausen term by ``alpha tau = 0.027`` instead of
    ``alpha = 0.9``. The paper takes the log-policy at s from the target net; the family
    hands rules the online net at s, so this uses ``stop_gradient(q_tm1)`` there."""

    def apply(p, x: Inputs):
        log_pi_s = jax.nn.log_softmax(jax.lax.stop_gradient(x.q_tm1) / tau, axis=1)
        log_pi_sa = jnp.take_along_axis(log_pi_s, x.a_tm1[:, None].astype(jnp.int32), 1)[:, 0]
        log_pi_next = jax.nn.log_softmax(x.q_target_t / tau, axis=1)
        soft_v = jnp.sum(jnp.exp(log_pi_next) * (x.q_target_t - tau * log_pi_next), axis=1)
        y = x.r_t + alpha * jnp.clip(tau * log_pi_sa, clip_min, 0.0) + x.discount_t * soft_v
        return (_q_sa(x) - y) ** 2

    return UpdateRule(no_params, apply)


@functools.lru_cache(maxsize=None)
def null_td_loss() -> UpdateRule:
    """A control, not a learning rule: ``0 * Q(s,a)``, a loss whose gradient in Q is exactly
    zero and that never reads the reward, so the agent keeps its initial network. Its score
    is what the family's agent gets from not learning at all (epsilon-greedy on a random
    network); a rule that does no better has learned nothing."""
    return UpdateRule(no_params, lambda p, x: 0.0 * _q_sa(x))


_PAPER = "Co-Reyes et al. 2021, Evolving Reinforcement Learning Algorithms"
REFERENCE_RULES = {
    "dqn": RuleInfo("dqn", "td_loss", dqn, "squared TD error", "Mnih et al. 2015, Nature"),
    "ddqn": RuleInfo("ddqn", "td_loss", ddqn, "double-DQN target",
                     "van Hasselt et al. 2016, Deep RL with Double Q-learning"),
    "dqn_reg": RuleInfo("dqn_reg", "td_loss", dqn_reg, "delta^2 + 0.1 Q(s,a)", _PAPER),
    "dqn_clipped": RuleInfo("dqn_clipped", "td_loss", dqn_clipped,
                            "max(Q, delta^2 + Y) + max(Q - Y, gamma max Q_targ^2)", _PAPER),
    "cql": RuleInfo("cql", "td_loss", cql, "0.1 (logsumexp Q - Q(s,a)) + delta^2",
                    "Kumar et al. 2020, Conservative Q-Learning"),
    "munchausen": RuleInfo("munchausen", "td_loss", munchausen, "Munchausen-DQN target",
                           "Vieillard et al. 2020, Munchausen Reinforcement Learning"),
    "null_td_loss": RuleInfo("null_td_loss", "td_loss", null_td_loss,
                             "control: zero loss, the agent never learns", "metabench control",
                             control=True),
}


# --- the inner loop ----------------------------------------------------------------------


class Buffer(NamedTuple):
    """A circular replay buffer; ``size`` counts valid rows, ``pos`` the next row to write."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    next_obs: jax.Array
    pos: jax.Array
    size: jax.Array


class RunnerState(NamedTuple):
    params: Any
    target_params: Any
    opt_state: Any
    buffer: Buffer
    env_state: Any
    obs: jax.Array
    env_params: Any
    episode_return: jax.Array
    rng: jax.Array
    t: jax.Array  # iterations done


def make_train(env, config: Config, rule: UpdateRule, *, total_timesteps: int,
               sample_params: Callable[[jax.Array], Any] | None = None,
               env_params: Any = None) -> Trainer:
    """DQN on ``env`` with ``rule`` as the loss; one update = one step of every env plus, when
    due, one gradient step and a target copy."""
    if sample_params is None:
        fixed = env.default_params if env_params is None else env_params
        sample_params = lambda _: fixed  # noqa: E731
    probe = sample_params(jax.random.PRNGKey(0))
    space = env.action_space(probe)
    if not hasattr(space, "n"):
        raise ValueError("the td_loss family needs a discrete action space; "
                         f"{getattr(env, 'id', env)} has continuous actions")
    n_actions = int(space.n)
    obs_space = env.observation_space(probe)
    obs_shape = tuple(obs_space.shape)
    # Shapes only: a host-stepped env must not start an env copy just to report its dtype.
    obs_dtype = jax.eval_shape(env.reset, jax.random.PRNGKey(0), probe)[0].dtype
    _, num_updates = update_count(total_timesteps, config.num_envs)
    network = nets.QNetwork(n_actions, torso=config.network, hidden=config.hidden)
    optimiser = optax.adam(config.lr)
    if config.max_grad_norm > 0:
        optimiser = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimiser)
    env_reset = jax.vmap(env.reset, in_axes=(0, None))
    env_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    n = config.num_envs

    def init(rng) -> RunnerState:
        rng, k_net, k_env, k_params = jax.random.split(rng, 4)
        env_params = sample_params(k_params)
        params = network.init(k_net, jnp.zeros((1, *obs_shape), jnp.float32))
        obs, env_state = env_reset(jax.random.split(k_env, n), env_params)
        size = config.buffer_size
        buffer = Buffer(jnp.zeros((size, *obs_shape), obs_dtype), jnp.zeros(size, jnp.int32),
                        jnp.zeros(size), jnp.zeros(size, bool),
                        jnp.zeros((size, *obs_shape), obs_dtype), jnp.int32(0), jnp.int32(0))
        return RunnerState(params, params, optimiser.init(params), buffer, env_state, obs,
                           env_params, jnp.zeros(n), rng, jnp.int32(0))

    def q_values(params, obs):
        return network.apply(params, obs.astype(jnp.float32))

    def loss_fn(params, target_params, meta_params, batch):
        obs, action, reward, term, next_obs = batch
        q_tm1 = q_values(params, obs)
        q_t = jax.lax.stop_gradient(q_values(params, next_obs))
        q_target_t = jax.lax.stop_gradient(q_values(target_params, next_obs))
        x = Inputs(q_tm1, action, reward, config.gamma * (1.0 - term.astype(jnp.float32)),
                   q_t, q_target_t)
        q_sa = jnp.take_along_axis(q_tm1, action[:, None], 1)[:, 0]
        return jnp.mean(rule.apply(meta_params, x)), jnp.mean(q_sa)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: RunnerState, meta_params, i=None) -> tuple[RunnerState, Metrics]:
        rng, k_eps, k_rand, k_env, k_batch = jax.random.split(state.rng, 5)
        # Gates use the scan's update index when given: unbatched under vmap over seeds, so
        # lax.cond skips the gradient step before learning starts instead of computing both.
        steps_before = (state.t if i is None else i) * n
        frac = jnp.clip(steps_before / config.eps_decay_steps, 0.0, 1.0)
        eps = config.eps_start + frac * (config.eps_end - config.eps_start)
        greedy = jnp.argmax(q_values(state.params, state.obs), axis=1)
        explore = jax.random.uniform(k_eps, (n,)) < eps
        action = jnp.where(explore, jax.random.randint(k_rand, (n,), 0, n_actions), greedy)
        next_obs, env_state, reward, term, trunc, info = env_step(
            jax.random.split(k_env, n), state.env_state, action, state.env_params)
        reward = reward.astype(jnp.float32)
        ep_ret, (ret_sum, n_eps) = episode_returns(state.episode_return, reward,
                                                   jnp.logical_or(term, trunc))
        b = state.buffer
        rows = (b.pos + jnp.arange(n)) % config.buffer_size
        buffer = Buffer(b.obs.at[rows].set(state.obs), b.action.at[rows].set(action),
                        b.reward.at[rows].set(reward), b.terminated.at[rows].set(term),
                        b.next_obs.at[rows].set(info["final_observation"]),
                        (b.pos + n) % config.buffer_size,
                        jnp.minimum(b.size + n, config.buffer_size))

        steps = steps_before + n
        due = (steps // config.train_every) > (steps_before // config.train_every)
        train = jnp.logical_and(due, steps >= config.learning_starts)

        def learn(_):
            idx = jax.random.randint(k_batch, (config.batch_size,), 0, buffer.size)
            batch = (buffer.obs[idx], buffer.action[idx], buffer.reward[idx],
                     buffer.terminated[idx], buffer.next_obs[idx])
            (loss, q_mean), grads = grad_fn(state.params, state.target_params, meta_params,
                                            batch)
            updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state, loss, q_mean

        def skip(_):
            return state.params, state.opt_state, jnp.float32(0.0), jnp.float32(0.0)

        params, opt_state, loss, q_mean = jax.lax.cond(train, learn, skip, None)
        copy = (steps // config.target_update_period) > (steps_before
                                                         // config.target_update_period)
        target = jax.lax.cond(copy, lambda: params, lambda: state.target_params)
        new = RunnerState(params, target, opt_state, buffer, env_state, next_obs,
                          state.env_params, ep_ret, rng, state.t + 1)
        return new, Metrics(returns_sum=ret_sum, episodes=n_eps, loss=loss, aux=q_mean)

    return Trainer(init, step, num_updates, n)


# --- conformance -------------------------------------------------------------------------


def random_inputs(key: jax.Array, batch: int = 64, actions: int = 4) -> Inputs:
    """Random transitions; the online and target nets' Q-values at s' are drawn apart, so
    their argmaxes differ (a rule that confuses q_t with q_target_t shows)."""
    k = jax.random.split(key, 6)
    return Inputs(jax.random.normal(k[0], (batch, actions)),
                  jax.random.randint(k[1], (batch,), 0, actions),
                  jax.random.normal(k[2], (batch,)),
                  0.99 * (jax.random.uniform(k[3], (batch,)) > 0.1),
                  jax.random.normal(k[4], (batch, actions)),
                  jax.random.normal(k[5], (batch, actions)))


def check(rule: UpdateRule, meta_params, name: str = "rule", batch: int = 64) -> CheckReport:
    """Finite per-transition losses of shape [B], no recompilation, finite gradients in Q."""

    def shape(outs):
        return (all(np.shape(o) == (batch,) for o in outs),
                f"expected ({batch},), got {np.shape(outs[0])}")

    def gradient(fn, outs, shape_ok):
        x = random_inputs(jax.random.PRNGKey(2), batch)
        grad = jax.grad(lambda q: jnp.mean(rule.apply(meta_params, x._replace(q_tm1=q))))(
            x.q_tm1)
        return [Check("finite_gradient", finite_tree(grad), "d loss / d q_tm1 is finite"),
                Check("depends_on_q", bool(np.abs(np.asarray(grad)).max() > 0),
                      "the loss has a non-zero gradient in q_tm1", required=False)]

    inputs = [random_inputs(jax.random.PRNGKey(seed), batch) for seed in (0, 1)]
    return check_rule("td_loss", name, rule, meta_params, inputs, shape, gradient,
                      finite="losses on random inputs are finite")


FAMILY = register_family(Family(
    name="td_loss",
    description="DQN with the rule as its loss over Q-values (evolved DQN losses)",
    Inputs=Inputs,
    Config=Config,
    make_train=make_train,
    reference_rules=REFERENCE_RULES,
    check=check,
    baseline="dqn",
))
