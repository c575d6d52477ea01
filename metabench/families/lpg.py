"""The LPG family: an agent whose policy and prediction targets come from the rule.

Oh et al. 2020, "Discovering Reinforcement Learning Algorithms" (NeurIPS), meta-learn the
*Learned Policy Gradient*: a backward recurrent network that reads a trajectory of the agent's
own outputs and emits, per step, a policy target ``pi_hat`` and a prediction target ``y_hat``.
The agent has a policy ``pi(a|s)`` and a prediction vector ``y(s)`` in the simplex over
``m = 30`` entries whose meaning is not fixed: the rule decides what ``y`` comes to predict.
The agent's update is fixed (Oh et al. 2020, eq. 2)::

    theta <- theta + lr * E[ grad log pi(a|s) * pi_hat  -  alpha_y * grad KL(y(s) || y_hat) ]

(with an optional entropy bonus set by the task, equal for every rule). The rule sees, per
step, ``[r_t, d_t, gamma, pi(a_t|s_t), y(s_t), y(s_t+1)]`` (time-major ``[T, N]``), never an
observation or an action id, so it transfers across observation and action spaces.

Reference rules in the slot:

- ``lpg``: the paper's network (an embedding ``phi`` of ``y``, an LSTM run backwards in time
  and reset at episode ends, heads for ``pi_hat`` and ``y_hat``); parameters from
  ``metabench discover lpg``, else an untrained initialisation that says so.
- ``actor_critic``: hand-designed A2C in the same slot: ``y`` is read as a categorical value
  distribution over fixed bins, ``pi_hat`` is the GAE advantage and ``y_hat`` a discretised
  Gaussian centred on the lambda-return (whose KL minimiser reads out the mean return), so
  A2C is scored through exactly the same agent.

The rule's targets are computed from the agent's outputs *outside* the agent's gradient: the
agent treats ``pi_hat`` and ``y_hat`` as constants, but a meta-gradient through several
updates (``metabench discover lpg``) follows them back through the agent's earlier updates,
which is the only path by which the rule learns what ``y`` should predict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metabench import nets
from metabench.envs.api import capability
from metabench.families.base import (Check, CheckReport, Family, Trainer, check_config, check_rule,
                                     register_family, update_count)
from metabench.params_io import shipped_params
from metabench.rl import episode_returns, truncated_gae
from metabench.rules import RuleInfo, UpdateRule
from metabench.types import Metrics

PRED_DIM = 30
"""``m``, the size of the prediction vector (Oh et al. 2020)."""


class Inputs(NamedTuple):
    """What the rule sees for a rollout, time-major (``T`` steps, ``N`` envs, ``m`` = y size)."""

    reward: jax.Array
    """``[T, N]`` r_t."""
    terminated: jax.Array
    """``[T, N]`` 1.0 where the episode ended in a terminal state at t (the paper's d_t)."""
    done: jax.Array
    """``[T, N]`` 1.0 where the episode ended at t for any reason (terminal or time limit):
    what comes after belongs to another episode."""
    gamma: jax.Array
    """``[T, N]`` the discount."""
    pi_a: jax.Array
    """``[T, N]`` pi(a_t | s_t) of the action taken."""
    y: jax.Array
    """``[T, N, m]`` y(s_t)."""
    y_next: jax.Array
    """``[T, N, m]`` y(s_t+1) of the true next state (before any auto-reset)."""


class Outputs(NamedTuple):
    pi_hat: jax.Array
    """``[T, N]`` the policy target (a scalar weight on grad log pi(a_t|s_t))."""
    y_hat: jax.Array
    """``[T, N, m]`` the prediction target, a distribution (KL(y || y_hat) is minimised)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The LPG agent's fixed hyperparameters (a task sets them per environment family)."""

    num_envs: int = 16
    """Parallel environments per seed (the paper's agents use a batch of trajectories)."""
    rollout_len: int = 20
    """Steps per environment per update (the rule's window, T)."""
    lr: float = 1e-3
    """Agent learning rate."""
    optimiser: str = "adam"
    """``adam``, ``rmsprop`` or ``sgd``."""
    alpha_y: float = 0.5
    """Weight of the prediction update KL(y || y_hat)."""
    ent_coef: float = 0.0
    """Entropy bonus on the policy (0 is the paper's agent update)."""
    gamma: float = 0.99
    """Discount handed to the rule."""
    max_grad_norm: float = 0.0
    """Global gradient-norm clip; 0 disables it."""
    network: str = "tabular"
    """``tabular`` (a linear map without bias of the flattened observation: a table per state
    for one-hot observations, as in the paper's tabular grids), ``mlp`` or ``cnn`` (MinAtar)."""
    hidden: tuple[int, ...] = (64,)
    """Hidden layer sizes of the ``mlp`` torso (relu); for ``cnn`` the last is the dense layer."""

    def __post_init__(self):
        check_config(self, ("num_envs", "rollout_len", "lr"),
                     {"optimiser": ("adam", "rmsprop", "sgd"), "network": ("tabular", "mlp", "cnn")})


# --- reference rules ---------------------------------------------------------------------


def two_hot(x: jax.Array, bins: jax.Array) -> jax.Array:
    """Scalars ``[...]`` as distributions ``[..., m]`` over sorted ``bins`` whose mean is
    ``clip(x, bins[0], bins[-1])`` (mass split between the two nearest bins)."""
    x = jnp.clip(x, bins[0], bins[-1])
    hi = jnp.clip(jnp.searchsorted(bins, x, side="right"), 1, len(bins) - 1)
    lo = hi - 1
    w_hi = (x - bins[lo]) / (bins[hi] - bins[lo])
    return (jax.nn.one_hot(lo, len(bins)) * (1.0 - w_hi)[..., None]
            + jax.nn.one_hot(hi, len(bins)) * w_hi[..., None])


def gaussian_bins(x: jax.Array, bins: jax.Array, sigma: float) -> jax.Array:
    """Scalars ``[...]`` as distributions ``[..., m]`` over evenly spaced ``bins``:
    ``softmax(-(bins - x)^2 / (2 sigma^2))``, a discretised Gaussian centred on ``x``.

    Its log is, up to a normaliser that is constant for ``x`` away from the edges, linear in
    ``x``. That is why :func:`actor_critic` uses it: the family's prediction loss is
    KL(y || y_hat), whose minimiser over noisy targets is the normalised *geometric* mean
    ``exp(E[log y_hat])``; for these targets that is again a discretised Gaussian, centred
    on ``E[x]``, so the value read-out stays unbiased (a two-hot target's geometric mean is
    not: targets 0 and 10 with probabilities 0.3/0.7 read out 3.4, not 7)."""
    return jax.nn.softmax(-jnp.square(bins - x[..., None]) / (2.0 * sigma ** 2), axis=-1)


def value_bins(v_max: float, m: int = PRED_DIM) -> jax.Array:
    """The ``m`` evenly spaced value bins on ``[-v_max, v_max]`` that :func:`actor_critic`
    reads ``y`` over."""
    return jnp.linspace(-v_max, v_max, m)


@functools.lru_cache(maxsize=None)
def actor_critic(gae_lambda: float = 0.95, v_max: float = 100.0,
                 sigma_bins: float = 0.75) -> UpdateRule:
    """A2C in the LPG slot (Mnih et al. 2016, the hand-designed rule of Oh et al. 2020):
    ``y`` is a categorical value distribution over ``m`` bins evenly spaced on
    ``[-v_max, v_max]``, read as the value ``v = E_y[bin]``; ``pi_hat`` is the GAE(lambda)
    advantage and ``y_hat`` a discretised Gaussian (:func:`gaussian_bins`, ``sigma_bins``
    bin widths wide) centred on the lambda-return, so that the family's KL(y || y_hat)
    update makes ``y`` read out the expected return within bin resolution. Truncated
    episodes bootstrap from ``y(s_t+1)``; terminated ones do not.

    ``v_max = 100`` is ``r_max / (1 - gamma)`` for rewards in [-1, 1] at gamma = 0.99, the
    largest value any LPG grid or chain can have, so no value is clipped; bins are 6.9
    apart, and the read-out is a continuous mean, so values far below a bin width are
    still represented (the Gaussian's mean moves smoothly with its centre)."""

    if not v_max > 0:
        raise ValueError(f"v_max must be positive, got {v_max}")
    if not sigma_bins > 0:
        raise ValueError(f"sigma_bins must be positive, got {sigma_bins}")

    def apply(meta_params, x: Inputs) -> Outputs:
        m = x.y.shape[-1]
        bins = value_bins(v_max, m)
        sigma = sigma_bins * 2.0 * v_max / (m - 1)
        v = x.y @ bins
        v_next = x.y_next @ bins
        term = x.terminated > 0.5
        trunc = jnp.logical_and(x.done > 0.5, ~term)
        adv, target = truncated_gae(x.reward, v, v_next, term, trunc, x.gamma, gae_lambda)
        return Outputs(adv, gaussian_bins(jnp.clip(target, -v_max, v_max), bins, sigma))

    return UpdateRule(lambda _: {}, apply)


@functools.lru_cache(maxsize=None)
def null_lpg() -> UpdateRule:
    """A control, not a rule to use: ``pi_hat = 0`` (no policy gradient) and ``y_hat = y(s)``
    (KL(y || y_hat) is at its minimum, so no prediction gradient); the agent gets no signal
    from rewards, and only the entropy bonus moves its policy (towards uniform)."""

    def apply(meta_params, x: Inputs) -> Outputs:
        del meta_params
        return Outputs(jnp.zeros_like(x.reward), x.y)

    return UpdateRule(lambda _: {}, apply)


class _Phi(nn.Module):
    embed: int

    @nn.compact
    def __call__(self, y):
        return nn.Dense(1)(nn.relu(nn.Dense(self.embed)(y)))


@functools.lru_cache(maxsize=None)
def lpg(hidden: int = 32, embed: int = 16) -> UpdateRule:
    """The Learned Policy Gradient network (Oh et al. 2020): ``phi`` (a 2-layer MLP with
    ``embed`` then 1 unit, shared between y(s_t) and y(s_t+1)), an LSTM of ``hidden`` units
    run backwards in time and reset where an episode ends, and linear heads for ``pi_hat``
    and the logits of ``y_hat``. The paper uses 256 LSTM units; the default here is a
    CPU-sized 32, the size of the shipped parameters."""
    phi = _Phi(embed)
    cell = nn.LSTMCell(hidden)
    pi_head, y_head = nn.Dense(1), nn.Dense(PRED_DIM)

    def features(phi_params, x: Inputs) -> jax.Array:
        e, e_next = phi.apply(phi_params, x.y)[..., 0], phi.apply(phi_params, x.y_next)[..., 0]
        return jnp.stack([x.reward, x.terminated, x.gamma, x.pi_a, e, e_next], axis=-1)

    def init(rng):
        k = jax.random.split(rng, 4)
        phi_params = phi.init(k[0], jnp.zeros((1, PRED_DIM)))
        carry = cell.initialize_carry(k[1], (1, 6))
        cell_params = cell.init(k[1], carry, jnp.zeros((1, 6)))
        return {"phi": phi_params, "lstm": cell_params,
                "pi": pi_head.init(k[2], jnp.zeros((1, hidden))),
                "y": y_head.init(k[3], jnp.zeros((1, hidden)))}

    def apply(meta_params, x: Inputs) -> Outputs:
        feats = features(meta_params["phi"], x)  # [T, N, 6]
        n = feats.shape[1]
        zeros = (jnp.zeros((n, hidden), feats.dtype), jnp.zeros((n, hidden), feats.dtype))

        def backward(carry, inp):
            f, done = inp
            # The carry holds the future; after an episode end it is another episode's.
            carry = jax.tree_util.tree_map(lambda c: jnp.where(done[:, None] > 0.5, 0.0, c),
                                           carry)
            carry, h = cell.apply(meta_params["lstm"], carry, f)
            return carry, h

        _, hs = jax.lax.scan(backward, zeros, (feats, x.done), reverse=True)
        pi_hat = pi_head.apply(meta_params["pi"], hs)[..., 0]
        y_hat = jax.nn.softmax(y_head.apply(meta_params["y"], hs), axis=-1)
        return Outputs(pi_hat, y_hat)

    return UpdateRule(init, apply)


def _lpg_default_params(rule: UpdateRule):
    return shipped_params("lpg", rule, "untrained: LPG at a random initialisation")


REFERENCE_RULES = {
    "lpg": RuleInfo("lpg", "lpg", lpg, "Learned Policy Gradient: backward LSTM emitting the "
                    "agent's policy and prediction targets", "Oh et al. 2020",
                    default_params=_lpg_default_params),
    "actor_critic": RuleInfo("actor_critic", "lpg", actor_critic,
                             "A2C in the LPG slot: GAE advantage, and a Gaussian over value "
                             "bins centred on the lambda-return", "Mnih et al. 2016; Oh et al. 2020"),
    "null_lpg": RuleInfo("null_lpg", "lpg", null_lpg,
                         "control: pi_hat = 0 and y_hat = y, so no learning signal",
                         "metabench control", control=True),
}


# --- the agent ---------------------------------------------------------------------------


class LPGNetwork(nn.Module):
    """Policy logits ``[N, A]`` and prediction logits ``[N, m]`` from one torso."""

    action_dim: int
    torso: str = "tabular"
    hidden: tuple[int, ...] = (64,)
    one_hot: bool = False
    """The observations are exactly one-hot (``env.one_hot_obs``): a tabular head then looks
    its row up instead of multiplying by the one-hot vector."""

    @nn.compact
    def __call__(self, obs):
        x, dense = agent_torso(obs, self.torso, self.hidden, self.one_hot)
        return dense(self.action_dim)(x), dense(PRED_DIM)(x)


class TableLookup(nn.Module):
    """``x @ kernel`` for exactly one-hot ``x`` ``[N, S]``, computed as the row lookup
    ``kernel[argmax x]``: the same parameters (``kernel [S, out]``, zeros), the same outputs
    and gradients, without the ``N x S x out`` product, which dominates the tabular agent's
    cost on grids with thousands of states."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features))
        return jnp.take(kernel, jnp.argmax(x, axis=-1), axis=0)


def agent_torso(obs, kind: str, hidden: tuple[int, ...], one_hot: bool = False):
    """``(features, head)`` for the LPG agent's networks, called inside a compact module:
    ``tabular`` is the flattened observation with zero-initialised heads without bias (a
    table per state for one-hot observations, looked up when ``one_hot``: uniform outputs at
    initialisation), ``mlp`` / ``cnn`` a relu torso with dense heads."""
    if kind == "tabular":
        x = obs.reshape((obs.shape[0], -1))
        if one_hot:
            return x, TableLookup
        return x, functools.partial(nn.Dense, use_bias=False, kernel_init=nn.initializers.zeros)
    x = (nets.MinAtarTorso(hidden=hidden[-1])(obs) if kind == "cnn"
         else nets.MLPTorso(hidden=hidden, activation="relu")(obs))
    return x, nn.Dense


class Rollout(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array


class RunnerState(NamedTuple):
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    env_params: Any
    episode_return: jax.Array
    rng: jax.Array


class Agent(NamedTuple):
    """The LPG agent's pure pieces, shared by training and by ``discover lpg``."""

    network: LPGNetwork
    optimiser: optax.GradientTransformation
    init: Callable[[jax.Array], RunnerState]
    rollout: Callable[[RunnerState], tuple[RunnerState, Rollout, tuple]]
    """``rollout(state) -> (state, traj [T, N], (returns_sum, episodes))``."""
    rule_inputs: Callable[[Any, Rollout], Inputs]
    """``rule_inputs(params, traj) -> Inputs``: what the rule sees of the agent's outputs."""
    targets: Callable[[Any, Any, Rollout], Outputs]
    """``targets(params, meta_params, traj) -> Outputs``: the rule applied to them."""
    loss: Callable[..., jax.Array]
    """``loss(params, target, traj, alpha_y=None) -> agent loss`` for fixed ``target``
    (``alpha_y`` defaults to the config's). Differentiate it in ``params`` only with
    ``target`` computed outside (as ``update`` does), so the agent never follows its
    gradient through its own targets."""
    update: Callable[[RunnerState, Any, Rollout], tuple[RunnerState, jax.Array, Outputs]]
    """One agent update on a rollout; differentiable in ``meta_params``."""


def make_agent(env, config: Config, rule: UpdateRule, *,
               sample_params: Callable[[jax.Array], Any]) -> Agent:
    probe = sample_params(jax.random.PRNGKey(0))
    space = env.action_space(probe)
    if not hasattr(space, "n"):
        raise ValueError("the lpg family needs a discrete action space; "
                         f"{getattr(env, 'id', env)} has continuous actions")
    n_actions = int(space.n)
    obs_shape = tuple(env.observation_space(probe).shape)
    network = LPGNetwork(n_actions, config.network, config.hidden,
                         one_hot=capability(env, "one_hot_obs"))
    # eps_root keeps Adam differentiable where a gradient is exactly zero (sqrt'(0) is
    # infinite), which meta-gradients through the update need; 1e-12 leaves it unchanged.
    optimiser = {"adam": lambda lr: optax.adam(lr, eps_root=1e-12), "rmsprop": optax.rmsprop,
                 "sgd": optax.sgd}[config.optimiser](config.lr)
    if config.max_grad_norm > 0:
        optimiser = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimiser)
    n = config.num_envs
    env_reset = jax.vmap(env.reset, in_axes=(0, None))
    env_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def apply(params, obs):
        return network.apply(params, obs.astype(jnp.float32))

    def init(rng) -> RunnerState:
        rng, k_net, k_env, k_params = jax.random.split(rng, 4)
        env_params = sample_params(k_params)
        params = network.init(k_net, jnp.zeros((1, *obs_shape), jnp.float32))
        obs, env_state = env_reset(jax.random.split(k_env, n), env_params)
        return RunnerState(params, optimiser.init(params), env_state, obs, env_params,
                           jnp.zeros(n), rng)

    def env_step_fn(carry, _):
        params, env_state, obs, env_params, ep_ret, rng = carry
        rng, k_act, k_env = jax.random.split(rng, 3)
        logits, _ = apply(params, obs)
        action = jax.random.categorical(k_act, logits)
        next_obs, env_state, reward, term, trunc, info = env_step(
            jax.random.split(k_env, n), env_state, action, env_params)
        reward = reward.astype(jnp.float32)
        ep_ret, finished = episode_returns(ep_ret, reward, jnp.logical_or(term, trunc))
        t = Rollout(obs, action, reward, term, trunc, info["final_observation"])
        return (params, env_state, next_obs, env_params, ep_ret, rng), (t, finished)

    def rollout(state: RunnerState):
        carry = (state.params, state.env_state, state.obs, state.env_params,
                 state.episode_return, state.rng)
        carry, (traj, (ret_sum, n_eps)) = jax.lax.scan(env_step_fn, carry, None,
                                                       length=config.rollout_len)
        _, env_state, obs, env_params, ep_ret, rng = carry
        state = state._replace(env_state=env_state, obs=obs, episode_return=ep_ret, rng=rng)
        return state, traj, (jnp.sum(ret_sum), jnp.sum(n_eps))

    def outputs(params, traj: Rollout):
        flat = lambda x: x.reshape((-1, *obs_shape))  # noqa: E731
        logits, y_logits = apply(params, flat(traj.obs))
        tn = traj.reward.shape
        logits = logits.reshape(tn + (n_actions,))
        y = jax.nn.softmax(y_logits.reshape(tn + (PRED_DIM,)), axis=-1)
        return logits, y

    def rule_inputs(params, traj: Rollout) -> Inputs:
        logits, y = outputs(params, traj)
        _, y_next_logits = apply(params, traj.final_obs.reshape((-1, *obs_shape)))
        y_next = jax.nn.softmax(y_next_logits.reshape(y.shape), axis=-1)
        pi_a = jnp.exp(nets.log_prob(logits, traj.action, False))
        term = traj.terminated.astype(jnp.float32)
        done = jnp.logical_or(traj.terminated, traj.truncated).astype(jnp.float32)
        return Inputs(traj.reward, term, done, jnp.full_like(term, config.gamma), pi_a, y,
                      y_next)

    def targets(params, meta_params, traj: Rollout) -> Outputs:
        return rule.apply(meta_params, rule_inputs(params, traj))

    def loss(params, target: Outputs, traj: Rollout, alpha_y=None):
        logits, y = outputs(params, traj)
        logp = nets.log_prob(logits, traj.action, False)
        pg = jnp.mean(logp * target.pi_hat)
        kl = jnp.mean(jnp.sum(y * (jnp.log(jnp.maximum(y, 1e-30))
                                   - jnp.log(jnp.maximum(target.y_hat, 1e-30))), axis=-1))
        ent = jnp.mean(nets.entropy(logits, False))
        alpha_y = config.alpha_y if alpha_y is None else alpha_y
        return -pg + alpha_y * kl - config.ent_coef * ent

    grad_fn = jax.value_and_grad(loss)

    def update(state: RunnerState, meta_params, traj: Rollout):
        # The targets are computed outside the agent's gradient: the agent treats them as
        # constants (Oh et al. 2020, eq. 2), while a meta-gradient still follows them back
        # through ``state.params`` to earlier updates, and so to the y_hat head of the rule.
        target = targets(state.params, meta_params, traj)
        value, grads = grad_fn(state.params, target, traj)
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state), value, target

    return Agent(network, optimiser, init, rollout, rule_inputs, targets, loss, update)


def make_train(env, config: Config, rule: UpdateRule, *, total_timesteps: int,
               sample_params: Callable[[jax.Array], Any] | None = None,
               env_params: Any = None) -> Trainer:
    """The LPG agent on ``env``: one update = a rollout of ``rollout_len`` steps in each of
    ``num_envs`` envs, then one agent update with the rule's targets."""
    if sample_params is None:
        fixed = env.default_params if env_params is None else env_params
        sample_params = lambda _: fixed  # noqa: E731
    steps_per_update, num_updates = update_count(total_timesteps, config.num_envs,
                                                 config.rollout_len)
    agent = make_agent(env, config, rule, sample_params=sample_params)

    def step(state: RunnerState, meta_params, i=None) -> tuple[RunnerState, Metrics]:
        del i
        state, traj, (ret_sum, n_eps) = agent.rollout(state)
        state, loss, target = agent.update(state, meta_params, traj)
        return state, Metrics(returns_sum=ret_sum, episodes=n_eps, loss=loss,
                              aux=jnp.mean(target.pi_hat))

    return Trainer(agent.init, step, num_updates, steps_per_update)


# --- conformance -------------------------------------------------------------------------


def random_inputs(key: jax.Array, t: int = 12, n: int = 4, m: int = PRED_DIM) -> Inputs:
    k = jax.random.split(key, 6)
    term = (jax.random.uniform(k[1], (t, n)) < 0.1).astype(jnp.float32)
    done = jnp.maximum(term, (jax.random.uniform(k[2], (t, n)) < 0.05).astype(jnp.float32))
    return Inputs(jax.random.normal(k[0], (t, n)), term, done, jnp.full((t, n), 0.99),
                  jax.random.uniform(k[3], (t, n), minval=0.05, maxval=1.0),
                  jax.nn.softmax(jax.random.normal(k[4], (t, n, m))),
                  jax.nn.softmax(jax.random.normal(k[5], (t, n, m))))


def check(rule: UpdateRule, meta_params, name: str = "rule") -> CheckReport:
    """Outputs of the right shapes, finite, ``y_hat`` a distribution, no recompilation
    (required); whether targets at t ignore later episodes (reported)."""
    t, n = 12, 4
    want = ((t, n), (t, n, PRED_DIM))

    def shapes(o):
        return ((np.shape(o.pi_hat), np.shape(o.y_hat)) if isinstance(o, tuple) and len(o) == 2
                else None)

    def shape(outs):
        return (all(shapes(o) == want for o in outs),
                f"expected (pi_hat, y_hat) of shapes {want}, got {shapes(outs[0])}")

    def targets(fn, outs, shape_ok):
        x = random_inputs(jax.random.PRNGKey(2), t, n)
        x = x._replace(done=x.done.at[5, 0].set(1.0))
        # Perturb only what follows the episode end at t=5 in env 0.
        a, b = fn(meta_params, x), fn(meta_params, x._replace(reward=x.reward.at[6:, 0].add(3.0)))
        if not shape_ok:
            return []
        y_hat = np.asarray(outs[0][1])
        dist = bool(np.all(y_hat >= 0) and np.allclose(y_hat.sum(-1), 1.0, atol=1e-4))
        same = bool(np.allclose(np.asarray(a[0])[:6, 0], np.asarray(b[0])[:6, 0], atol=1e-6)
                    and np.allclose(np.asarray(a[1])[:6, 0], np.asarray(b[1])[:6, 0],
                                    atol=1e-6))
        return [Check("y_hat_distribution", dist,
                      "y_hat is non-negative and sums to one over its last axis"),
                Check("episode_boundaries", same,
                      "targets up to an episode end do not depend on the next episode",
                      required=False)]

    inputs = [random_inputs(jax.random.PRNGKey(s), t, n) for s in (0, 1)]
    return check_rule("lpg", name, rule, meta_params, inputs, shape, targets)


FAMILY = register_family(Family(
    name="lpg",
    description="LPG agent (policy + prediction vector); the rule emits their targets",
    Inputs=Inputs,
    Config=Config,
    make_train=make_train,
    reference_rules=REFERENCE_RULES,
    Outputs=Outputs,
    check=check,
    baseline="actor_critic",
))
