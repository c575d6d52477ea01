"""The EPG family: a policy-gradient agent trained by a learned loss over a buffer of its
recent experience.

Houthooft et al. 2018, "Evolved Policy Gradients" (NeurIPS; arXiv 1802.04821), evolve a *loss
function*: a network that reads a buffer of the agent's most recent steps, the policy's outputs
on them and the output of an agent-side *memory unit*, and returns a loss that the agent
minimises by ordinary SGD. The agent around the rule is fixed by the task: an actor with a
value head (MLP or MinAtar CNN), ``epochs`` passes of Adam after each rollout of
``rollout_len`` steps, minibatches split over the env axis so that every minibatch keeps
whole time series (the loss network convolves along time).

**The buffer.** Each env keeps its ``buffer_len`` (N) most recent steps across updates in the
runner state (fixed-size arrays, shifted by ``rollout_len`` (T) after every rollout), as the
paper's inner loop keeps a buffer of the N most recent steps that its temporal convolutions
slide over (the public code, github.com/openai/EPG, ``rollout.py``: a ``deque(maxlen=
inner_buffer_size)`` with ``inner_buffer_size = 8 * inner_opt_freq``, zero-padded at the front
until it fills). The default N = 128 is 4 rollouts of the quick tasks' T = 32 (half the
code's ratio, for the CPU: see :attr:`Config.buffer_len`). The rule sees the buffer as the
newest rollout (:class:`Inputs`, ``[B, T]``, where its per-step loss is emitted) and the
N - T steps before it (:attr:`Inputs.history`, ``[B, N - T]``, with a ``valid`` flag that is 0
until the buffer has filled). The older steps reach the loss through the convolutions and
the context pooled over the buffer, and the gradient flows back through them; the per-step
loss covers the newest T steps, as the code evaluates its per-step head on
``inner_opt_freq`` rows per update (``agents.py``, ``traj[idx]``; its indices, below
``inner_opt_freq``, pick the buffer's first rows, the oldest once it is full, which looks
unintended next to its PPO term on the newest rows).

**Old steps are re-evaluated.** A buffer's old steps were taken by older policies. As in the
paper's code (``agents.py``: ``_process_trajectory`` runs the *current* policy ``_pi_f`` over
every stored observation, differentiably, at every update), the buffer stores observations and
actions, and ``log pi(a|s)``, the entropy and ``V(s)`` of every buffered step are recomputed with
the current parameters (differentiable), ``V(s')`` with the parameters before the update
(stop-gradient); nothing the loss sees is a stale number from an old policy. A rule that does
not read the history (``reinforce``) costs what it did before: the history's network passes
are dead code and are compiled away.

**Policy-gradient guidance.** The paper meta-trains with ``(1 - alpha) L_phi + alpha L_PPO``,
alpha annealed from 1 to 0 over the first outer-loop epochs, and tests the learned loss alone
(public code, ``evolution.py``: ``ppo_factor_schedule = PiecewiseSchedule([(0, 1.),
(int(outer_n_epoch / 8), 0.)], outside_value=0.)`` in ``train``, ``ppo_factor=0.`` in
``test``; ``agents.py``: ``epg_surr_loss * (1 - ppo_factor) + ppo_surr_loss * ppo_factor``, the
PPO term on the newest ``inner_opt_freq`` steps only). :func:`guided` builds that mixture with
the weight as an explicit meta-parameter leaf, ``{"loss": phi, "guidance": alpha}``, so one
compiled call serves every alpha; ``metabench discover epg`` anneals it (see
``discover/es.py``), and the reference rule ``epg`` that is scored is the learned loss alone.
The guide is the family's baseline ``reinforce`` on the newest rollout (with one Adam pass per
rollout PPO's clipped ratio is 1 and its surrogate's gradient is this advantage-weighted
policy gradient; the paper's PPO term also fits its separate value network).

**Deviations from the paper.** The rule never sees an observation or an action: per step it
gets ``[reward, done, log pi(a|s), entropy, V(s), sg V(s'), memory]``, as ``[B, T]`` arrays,
plus the same for the history. The paper's loss also reads the observations, the actions and
the policy's output parameters; they are left out so that a loss found on one environment
applies to another with other observation and action spaces (the point of the transfer
tasks). Its memory unit here is a learned vector (state-independent). The value head is the
agent's own and gets a gradient only through what the loss does with ``V`` (the paper trains a
separate value network by its PPO term). Networks are CPU-sized.

The reference rules in the slot (``REFERENCE_RULES``): ``reinforce`` (the baseline and the
guide), ``epg`` (the loss network alone, from ``metabench discover epg``), ``null_epg`` (the
control, a loss identically zero).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metabench import nets
from metabench.families.base import (Check, CheckReport, Family, Trainer, actor_critic_rollout,
                                     check_config, check_rule, env_info, finite_tree,
                                     register_family, update_count)
from metabench.params_io import shipped_params
from metabench.rules import RuleInfo, UpdateRule, no_params
from metabench.types import Metrics

MEMORY_DIM = 8
"""Size of the memory unit's output. A contract constant (like LPG's prediction size) rather
than an agent setting: the loss network's weights depend on it, so a task that changed it
would break every discovered loss."""


class History(NamedTuple):
    """The buffer's ``H = buffer_len - rollout_len`` steps before the newest rollout, oldest
    first, ``[B, H]`` per env (the same envs as the rollout's rows). Every quantity of the
    policy is recomputed with the agent's current parameters, as for the newest rollout; the
    differentiable fields carry the gradient to them."""

    reward: jax.Array
    """``[B, H]`` r_t."""
    done: jax.Array
    """``[B, H]`` 1.0 where the episode ended after step t."""
    log_prob: jax.Array
    """``[B, H]`` log pi(a_t | s_t) under the current policy, differentiable."""
    entropy: jax.Array
    """``[B, H]`` the current policy's entropy at s_t, differentiable."""
    value: jax.Array
    """``[B, H]`` the current V(s_t), differentiable."""
    bootstrap: jax.Array
    """``[B, H]`` stop-gradient V(s_t+1) (before this update), 0.0 after a terminal step."""
    valid: jax.Array
    """``[B, H]`` 1.0 for a step taken, 0.0 for the zero padding of a buffer not yet full
    (every field is 0 there)."""


class Inputs(NamedTuple):
    """What the loss sees for a minibatch of ``B`` envs: the newest rollout's ``T`` contiguous
    steps (``T`` = rollout_len), batch-major ``[B, T]``, where its per-step loss is emitted,
    and the buffer's older steps in ``history``. The differentiable fields carry the gradient
    to the agent's parameters; the others are data. There is no observation and no action."""

    reward: jax.Array
    """``[B, T]`` r_t."""
    done: jax.Array
    """``[B, T]`` 1.0 where the episode ended after step t (terminal or time limit): what
    follows belongs to another episode."""
    log_prob: jax.Array
    """``[B, T]`` log pi(a_t | s_t) of the action taken, differentiable."""
    entropy: jax.Array
    """``[B, T]`` the policy's entropy at s_t, differentiable."""
    value: jax.Array
    """``[B, T]`` the agent's baseline head V(s_t), differentiable."""
    memory: jax.Array
    """``[B, T, MEMORY_DIM]`` the memory unit's output: a learned vector of agent parameters
    (not state-dependent) broadcast over steps, differentiable, so that the loss can shape a
    persistent agent state (Houthooft et al. 2018, section 3)."""
    bootstrap: jax.Array
    """``[B, T]`` stop-gradient V(s_t+1) of the true next observation (before any auto-reset),
    0.0 where the episode terminated at t: what a return cut at t continues with, at a
    time-limit truncation or at the rollout's last step."""
    history: History | None = None
    """The buffer's older steps (see :class:`History`); the trainer always passes it (with
    ``H = 0`` when ``buffer_len == rollout_len``), None only in hand-built inputs."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The EPG agent's fixed hyperparameters (defaults: REINFORCE learns CartPole in ~1e5
    env steps)."""

    num_envs: int = 16
    """Parallel environments per seed (B of a rollout)."""
    rollout_len: int = 32
    """Steps per environment between updates (T: the steps the per-step loss covers)."""
    buffer_len: int = 128
    """Steps per environment in the loss's buffer (N >= rollout_len): the newest rollout and
    the ``N - T`` steps before it, across updates. 128 = 4 rollouts of 32: the paper's code
    keeps 8 update periods (``inner_buffer_size = inner_opt_freq * 8``); half that keeps
    meta-training on a CPU affordable, since every update re-evaluates the whole buffer
    (a forward and backward pass over N steps instead of T: about 3x the cost of a
    rollout-only loss at 128, 9x at 256). Only a loss that reads ``Inputs.history`` pays for
    it; ``buffer_len = rollout_len`` gives the loss the newest rollout only."""
    epochs: int = 1
    """Passes over each rollout (1 keeps REINFORCE on-policy)."""
    minibatches: int = 1
    """Minibatches per epoch, split over envs; must divide num_envs."""
    lr: float = 3e-3
    """Adam learning rate."""
    anneal_lr: bool = False
    """Linearly anneal the learning rate to zero over training."""
    max_grad_norm: float = 0.0
    """Global gradient-norm clip; 0 disables it (the loss sets its own scale)."""
    network: str = "mlp"
    """``mlp`` (flattened observations) or ``cnn`` (MinAtar torso)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes (for ``cnn``, the last is the dense layer after the conv)."""
    activation: str = "tanh"
    """``tanh`` or ``relu`` for the MLP."""

    def __post_init__(self):
        check_config(self, ("num_envs", "rollout_len", "buffer_len", "epochs", "minibatches",
                            "lr"), {"network": ("mlp", "cnn"), "activation": ("tanh", "relu")})
        if self.buffer_len < self.rollout_len:
            raise ValueError(f"buffer_len ({self.buffer_len}) must be at least rollout_len "
                             f"({self.rollout_len}): the buffer holds the newest rollout")
        if self.num_envs % self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide num_envs "
                             f"({self.num_envs}): minibatches are whole envs' time series")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be non-negative, got {self.max_grad_norm!r}")
        if not self.hidden:
            raise ValueError("hidden must name at least one layer size")


# --- reference rules ---------------------------------------------------------------------


def returns_to_go(reward: jax.Array, done: jax.Array, bootstrap: jax.Array,
                  gamma: float) -> jax.Array:
    """Discounted returns ``[B, T]`` within the rollout: ``G_t = r_t + gamma G_t+1``, except
    where the trajectory is cut at t (an episode end, or the rollout's last step), where
    ``G_t = r_t + gamma bootstrap_t`` (zero after a terminal state by the contract)."""
    cut = (done > 0.5).at[:, -1].set(True)

    def backward(g_next, xs):
        r, c, boot = xs
        g = r + gamma * jnp.where(c, boot, g_next)
        return g, g

    _, g = jax.lax.scan(backward, jnp.zeros_like(reward[:, 0]),
                        (reward.T, cut.T, bootstrap.T), reverse=True)
    return g.T


@functools.lru_cache(maxsize=None)
def reinforce(gamma: float = 0.99, ent_coef: float = 0.01, vf_coef: float = 0.5) -> UpdateRule:
    """REINFORCE with a learned baseline (Williams 1992) on the newest rollout: per step
    ``-(G_t - sg V_t) log pi(a_t|s_t) + vf_coef (G_t - V_t)^2 - ent_coef H_t``, with ``G_t``
    the discounted return to go of :func:`returns_to_go`. It never reads the history (old
    steps are off-policy for it)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")

    def apply(meta_params, x: Inputs) -> jax.Array:
        del meta_params
        g = jax.lax.stop_gradient(returns_to_go(x.reward, x.done, x.bootstrap, gamma))
        adv = g - jax.lax.stop_gradient(x.value)
        return -adv * x.log_prob + vf_coef * (g - x.value) ** 2 - ent_coef * x.entropy

    return UpdateRule(no_params, apply)


@functools.lru_cache(maxsize=None)
def null_epg() -> UpdateRule:
    """A control: the per-step loss is identically zero, so no agent parameter ever gets a
    gradient (Adam then leaves them where they are) and the agent keeps its initial policy.
    It reads nothing but the shape of the newest rollout (not even the reward)."""

    def apply(meta_params, x: Inputs) -> jax.Array:
        del meta_params
        return jnp.zeros(jnp.shape(x.log_prob), jnp.float32)

    return UpdateRule(no_params, apply)


NUM_FEATURES = 7 + MEMORY_DIM
"""Channels per buffered step the loss network reads (see :func:`epg_features`)."""


def epg_features(x: Inputs) -> tuple[jax.Array, jax.Array]:
    """The loss network's inputs over the whole buffer, oldest step first: ``([B, N,
    NUM_FEATURES] features, [B, N] valid)``. Per step ``asinh`` of the reward, the log-prob,
    the entropy, V and sg V' (linear near 0, logarithmic far out, so that one loss sees
    CartPole's returns of hundreds and MinAtar's of tens on a similar scale), ``done``, the
    ``valid`` flag and the memory unit's output; zero on the padding of a buffer not yet
    full."""
    h = x.history if x.history is not None else History(
        *[jnp.zeros((jnp.shape(x.reward)[0], 0), jnp.float32)] * len(History._fields))

    def scalars(reward, done, log_prob, entropy, value, bootstrap, valid):
        return jnp.stack([jnp.arcsinh(reward), done, jnp.arcsinh(log_prob),
                          jnp.arcsinh(entropy), jnp.arcsinh(value), jnp.arcsinh(bootstrap),
                          valid], axis=-1)

    new = scalars(x.reward, x.done, x.log_prob, x.entropy, x.value, x.bootstrap,
                  jnp.ones_like(x.reward))
    old = scalars(h.reward, h.done, h.log_prob, h.entropy, h.value, h.bootstrap, h.valid)
    old = jnp.where(h.valid[..., None] > 0.5, old, 0.0)
    mem = x.memory[:, :1]
    old_mem = jnp.broadcast_to(mem, (*h.valid.shape, MEMORY_DIM)) * h.valid[..., None]
    feats = jnp.concatenate([jnp.concatenate([old, old_mem], axis=-1),
                             jnp.concatenate([new, x.memory], axis=-1)], axis=1)
    valid = jnp.concatenate([h.valid, jnp.ones_like(x.reward)], axis=1)
    return feats, valid


class LossNet(nn.Module):
    """EPG's loss network: 1-D convolutions along the buffer over the per-step features, whose
    output is pooled over the buffer's valid steps into a context vector; an MLP then reads,
    per step of the newest ``t`` steps, the features, the convolution's output at that step
    and the context, and returns a scalar."""

    channels: int
    kernel: int
    hidden: int
    causal: bool

    @nn.compact
    def __call__(self, feats, valid, t: int):
        padding = "CAUSAL" if self.causal else "SAME"
        h = feats
        for _ in range(2):
            h = nn.tanh(nn.Conv(self.channels, (self.kernel,), padding=padding)(h))
        w = valid[..., None]
        context = jnp.sum(h * w, axis=1, keepdims=True) / jnp.maximum(
            jnp.sum(w, axis=1, keepdims=True), 1.0)
        z = jnp.concatenate([feats[:, -t:], h[:, -t:],
                             jnp.broadcast_to(context, h[:, -t:].shape)], axis=-1)
        z = nn.tanh(nn.Dense(self.hidden)(z))
        return nn.Dense(1)(z)[..., 0]


@functools.lru_cache(maxsize=None)
def epg(hidden: int = 32, channels: int = 16, kernel: int = 8,
        causal: bool = False) -> UpdateRule:
    """EPG's learned loss (Houthooft et al. 2018) alone: ``f(features)`` with ``f`` a
    :class:`LossNet` (two convolutions of ``channels`` x ``kernel`` along the buffer,
    ``causal`` or centred, and a ``hidden``-unit MLP), one value per step of the newest
    rollout. No hand-designed term: meta-training mixes in the policy-gradient guide with
    :func:`guided` and anneals it away. Flax's default initialisation (the paper's network is
    larger; these defaults are CPU-sized)."""
    for name, v in (("hidden", hidden), ("channels", channels), ("kernel", kernel)):
        if int(v) < 1:
            raise ValueError(f"{name} must be at least 1, got {v!r}")
    net = LossNet(int(channels), int(kernel), int(hidden), bool(causal))

    def init(rng):
        k = int(kernel)
        return net.init(rng, jnp.zeros((1, k, NUM_FEATURES)), jnp.ones((1, k)), k)

    def apply(meta_params, x: Inputs) -> jax.Array:
        feats, valid = epg_features(x)
        return net.apply(meta_params, feats, valid, jnp.shape(x.reward)[1])

    return UpdateRule(init, apply)


def guided(rule: UpdateRule, guide: UpdateRule | None = None) -> UpdateRule:
    """``rule`` mixed with a policy-gradient ``guide`` (default: :func:`reinforce`), as EPG
    meta-trains: per step ``(1 - alpha) rule + alpha guide``. Its meta-parameters are
    ``{"loss": rule's, "guidance": alpha}``: the weight is an explicit input of the loss (a
    scalar leaf, per candidate under a population's vmap), not a constant, so one compiled
    training call serves every alpha of a schedule. ``alpha = 0`` is ``rule`` exactly;
    ``alpha = 1`` is the guide exactly."""
    guide = reinforce() if guide is None else guide

    def init(rng):
        return {"loss": rule.init(rng), "guidance": jnp.asarray(1.0, jnp.float32)}

    def apply(meta_params, x: Inputs) -> jax.Array:
        alpha = meta_params["guidance"]
        return ((1.0 - alpha) * rule.apply(meta_params["loss"], x)
                + alpha * guide.apply({}, x))

    return UpdateRule(init, apply)


def _epg_default_params(rule: UpdateRule):
    return shipped_params("epg", rule, "untrained: EPG's loss at its random initialisation")


REFERENCE_RULES = {
    "reinforce": RuleInfo("reinforce", "epg", reinforce,
                          "REINFORCE with a learned baseline and an entropy bonus",
                          "Williams 1992; Houthooft et al. 2018"),
    "epg": RuleInfo("epg", "epg", epg, "Evolved Policy Gradients' loss network alone "
                    "(temporal convolutions over a buffer across updates + MLP)",
                    "Houthooft et al. 2018, Evolved Policy Gradients",
                    default_params=_epg_default_params),
    "null_epg": RuleInfo("null_epg", "epg", null_epg, "control: a loss identically zero "
                         "(no gradient, no learning; reads no reward)", "metabench control",
                         control=True),
}


# --- the inner loop ----------------------------------------------------------------------


class Steps(NamedTuple):
    """Buffered steps, batch-major ``[B, T or H, ...]``: what is needed to re-evaluate them
    with the current parameters. ``next_obs`` is the true next observation (before any
    auto-reset)."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    done: jax.Array
    terminated: jax.Array
    next_obs: jax.Array
    valid: jax.Array


def push(buffer: Steps, new: Steps) -> Steps:
    """The ``H`` most recent steps of ``buffer`` (``[B, H]``) followed by ``new``
    (``[B, T]``): the buffer after a rollout, oldest step first."""
    h = buffer.reward.shape[1]
    return jax.tree_util.tree_map(
        lambda a, b: jnp.concatenate([a, b], axis=1)[:, b.shape[1]:] if h else a,
        buffer, new)


class RunnerState(NamedTuple):
    params: Any
    """``{"net": actor-critic parameters, "memory": [MEMORY_DIM] memory unit}``."""
    opt_state: Any
    env_state: Any
    obs: jax.Array
    env_params: Any
    episode_return: jax.Array
    rng: jax.Array
    buffer: Steps
    """The ``buffer_len - rollout_len`` most recent steps per env (``[B, H, ...]``), oldest
    first; ``valid`` is 0 on the zero padding until that many steps were taken."""


def make_train(env, config: Config, rule: UpdateRule, *, total_timesteps: int,
               sample_params: Callable[[jax.Array], Any] | None = None,
               env_params: Any = None) -> Trainer:
    """The EPG agent on ``env`` with ``rule`` as its loss; see :class:`Trainer`."""
    sample_params, continuous, action_dim, low, high, obs_shape = env_info(
        env, sample_params, env_params)

    n, t_len = config.num_envs, config.rollout_len
    h_len = config.buffer_len - t_len
    steps_per_update, num_updates = update_count(total_timesteps, n, t_len)
    mb_envs = n // config.minibatches

    network = nets.ActorCritic(action_dim=action_dim, continuous=continuous,
                               torso=config.network, hidden=config.hidden,
                               activation=config.activation)
    lr = (optax.linear_schedule(config.lr, 0.0, num_updates * config.epochs * config.minibatches)
          if config.anneal_lr else config.lr)
    optimiser = optax.adam(lr, eps=1e-5)
    if config.max_grad_norm > 0:
        optimiser = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimiser)

    env_reset = jax.vmap(env.reset, in_axes=(0, None))

    def forward(net_params, obs):
        return network.apply(net_params, obs.astype(jnp.float32))

    def value_of(net_params, obs):
        return network.apply(net_params, obs.astype(jnp.float32), method=network.value)

    rollout = actor_critic_rollout(env, lambda p, o: forward(p["net"], o), n, t_len,
                                   continuous, low, high)

    def init(rng) -> RunnerState:
        rng, k_net, k_mem, k_env, k_params = jax.random.split(rng, 5)
        env_params = sample_params(k_params)
        params = {"net": network.init(k_net, jnp.zeros((1, *obs_shape), jnp.float32)),
                  "memory": jax.random.normal(k_mem, (MEMORY_DIM,))}
        obs, env_state = env_reset(jax.random.split(k_env, n), env_params)
        # An empty buffer: zeros of the rollout's own shapes and dtypes, none of them valid.
        traj = jax.eval_shape(rollout, params, env_state, obs, env_params, jnp.zeros(n),
                              rng)[1]
        like = Steps(traj.obs, traj.action, traj.reward, traj.reward, traj.terminated,
                     traj.final_obs, traj.reward)
        buffer = jax.tree_util.tree_map(
            lambda s: jnp.zeros((n, h_len, *s.shape[2:]), s.dtype), like)
        return RunnerState(params, optimiser.init(params), env_state, obs, env_params,
                           jnp.zeros(n), rng, buffer)

    def evaluate(params, steps: Steps, b: int, length: int):
        """log pi(a|s), entropy and V(s) ``[b, length]`` of buffered steps, recomputed."""
        if length == 0:  # no history (buffer_len == rollout_len)
            return (jnp.zeros((b, 0)),) * 3
        out, value = forward(params["net"], steps.obs.reshape((b * length, *obs_shape)))
        out = out.reshape((b, length, -1))
        return (nets.log_prob(out, steps.action, continuous), nets.entropy(out, continuous),
                value.reshape((b, length)))

    def loss_fn(params, meta_params, mb):
        new, boot, old, old_boot = mb
        b = new.reward.shape[0]
        log_prob, ent, value = evaluate(params, new, b, t_len)
        # The memory unit: tanh keeps what the loss reads bounded however far it is pushed.
        memory = jnp.broadcast_to(jnp.tanh(params["memory"]), (b, t_len, MEMORY_DIM))
        # The older steps, re-evaluated by the current policy (dead code, compiled away, for
        # a rule that does not read them).
        old_lp, old_ent, old_v = evaluate(params, old, b, h_len)
        ok = old.valid
        history = History(old.reward, old.done, old_lp * ok, old_ent * ok, old_v * ok,
                          old_boot * ok, ok)
        x = Inputs(new.reward, new.done, log_prob, ent, value, memory, boot, history)
        return jnp.mean(rule.apply(meta_params, x)), jnp.mean(ent)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: RunnerState, meta_params, i=None) -> tuple[RunnerState, Metrics]:
        del i  # no schedule beyond optax's own step count
        (env_state, obs, ep_ret, rng), traj, ret_sum, n_eps = rollout(
            state.params, state.env_state, state.obs, state.env_params, state.episode_return,
            state.rng)
        # One critic pass over the true next observations: truncations and the rollout's
        # end bootstrap from V(s'); terminal states do not.
        next_value = value_of(state.params["net"], traj.final_obs.reshape(
            (-1, *obs_shape))).reshape(traj.reward.shape)
        bootstrap = jnp.swapaxes(jnp.where(traj.terminated, 0.0, next_value), 0, 1)
        done = jnp.logical_or(traj.terminated, traj.truncated).astype(jnp.float32)
        new = jax.tree_util.tree_map(
            lambda x: jnp.swapaxes(x, 0, 1),
            Steps(traj.obs, traj.action, traj.reward, done, traj.terminated, traj.final_obs,
                  jnp.ones_like(traj.reward)))
        old = state.buffer
        old_next = value_of(state.params["net"], old.next_obs.reshape(
            (n * h_len, *obs_shape))).reshape((n, h_len)) if h_len else jnp.zeros((n, 0))
        old_boot = jnp.where(old.terminated, 0.0, old_next)
        batch = (new, bootstrap, old, old_boot)

        def epoch(c, key):
            perm = jax.random.permutation(key, n)
            mbs = jax.tree_util.tree_map(
                lambda x: x[perm].reshape((config.minibatches, mb_envs, *x.shape[1:])), batch)

            def minibatch(c, mb):
                params, opt_state = c
                (loss, ent), grads = grad_fn(params, meta_params, mb)
                updates, opt_state = optimiser.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), (loss, ent)

            return jax.lax.scan(minibatch, c, mbs)

        rng, k_epochs = jax.random.split(rng)
        (params, opt_state), (loss, ent) = jax.lax.scan(
            epoch, (state.params, state.opt_state), jax.random.split(k_epochs, config.epochs))
        new_state = RunnerState(params, opt_state, env_state, obs, state.env_params, ep_ret,
                                rng, push(old, new))
        metrics = Metrics(returns_sum=jnp.sum(ret_sum), episodes=jnp.sum(n_eps),
                          loss=jnp.mean(loss), aux=jnp.mean(ent))
        return new_state, metrics

    return Trainer(init, step, num_updates, steps_per_update)


# --- conformance -------------------------------------------------------------------------


def random_inputs(key: jax.Array, b: int = 4, t: int = 16, h: int = 16) -> Inputs:
    """Plausible random inputs: CartPole-scale rewards and values, some episode ends, zero
    bootstrap after terminal states, a rollout-long memory vector per batch, and a history
    of ``h`` older steps whose first quarter is the padding of a buffer not yet full."""
    k = jax.random.split(key, 8)
    n = t + h
    done = (jax.random.uniform(k[0], (b, n)) < 0.1).astype(jnp.float32)
    terminal = done * (jax.random.uniform(k[1], (b, n)) < 0.7)
    logits = jax.random.normal(k[2], (b, n, 3))
    action = jax.random.categorical(k[3], logits)
    memory = jnp.broadcast_to(jnp.tanh(jax.random.normal(k[4], (MEMORY_DIM,))),
                              (b, t, MEMORY_DIM))
    value = 10.0 * jax.random.normal(k[5], (b, n))
    reward = jax.random.uniform(k[6], (b, n), minval=-1.0, maxval=1.0)
    log_prob = nets.log_prob(logits, action, False)
    entropy = nets.entropy(logits, False)
    bootstrap = jnp.where(terminal > 0, 0.0, value + 1.0)
    valid = (jnp.arange(h) >= h // 4).astype(jnp.float32) * jnp.ones((b, 1))
    old = History(*(jnp.where(valid > 0, a[:, :h], 0.0) for a in (
        reward, done, log_prob, entropy, value, bootstrap)), valid)
    return Inputs(reward[:, h:], done[:, h:], log_prob[:, h:], entropy[:, h:], value[:, h:],
                  memory, bootstrap[:, h:], old)


_DIFFERENTIABLE = ("log_prob", "entropy", "value", "memory")


def check(rule: UpdateRule, meta_params, name: str = "rule") -> CheckReport:
    """A per-step loss of shape ``[B, T]`` (the newest rollout), finite, with finite gradients
    to the agent's side (the newest steps' and the history's), no recompilation (required);
    whether the loss has a gradient w.r.t. log pi at all (reported, ``gradients_flow``:
    without it the policy learns only through the entropy, or not at all)."""
    b, t = 4, 16
    xs = [random_inputs(jax.random.PRNGKey(s), b, t) for s in (0, 1)]

    def mean_loss(diff, x):
        hist = x.history._replace(**diff["history"])
        return jnp.mean(rule.apply(meta_params, x._replace(history=hist, **diff["new"])))

    def shape(outs):
        return (all(np.shape(o) == (b, t) for o in outs),
                f"expected a per-step loss of shape ({b}, {t}), got {np.shape(outs[0])}")

    def gradients(fn, outs, shape_ok):
        diff = {"new": {k: getattr(xs[0], k) for k in _DIFFERENTIABLE},
                "history": {k: getattr(xs[0].history, k) for k in _DIFFERENTIABLE[:3]}}
        grads = jax.jit(jax.grad(mean_loss))(diff, xs[0])
        g = np.asarray(grads["new"]["log_prob"])
        flows = bool(np.all(np.isfinite(g)) and np.any(g != 0))
        return [Check("finite_gradients", finite_tree(grads),
                      "gradients of the mean loss w.r.t. log_prob, entropy, value and memory "
                      "(newest steps and history) are finite"),
                Check("gradients_flow", flows,
                      f"max |d loss / d log_prob| {float(np.max(np.abs(g))):.3g}"
                      + ("" if flows else " (reported, not required)"), required=False)]

    return check_rule("epg", name, rule, meta_params, xs, shape, gradients,
                      finite="losses on random inputs are finite")


FAMILY = register_family(Family(
    name="epg",
    description="policy-gradient agent trained by a learned loss over a buffer of its recent "
                "steps (EPG)",
    Inputs=Inputs,
    Config=Config,
    make_train=make_train,
    reference_rules=REFERENCE_RULES,
    check=check,
    baseline="reinforce",
))
