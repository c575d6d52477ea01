"""The EPG family: a policy-gradient agent trained by a learned loss over its own rollouts.

Houthooft et al. 2018, "Evolved Policy Gradients" (NeurIPS), evolve a *loss function*: a
network that reads the agent's recent experience, the log-probabilities of the actions it
took and the output of an agent-side *memory unit*, and returns a loss that the agent
minimises by ordinary SGD. The agent around the rule is fixed by the task: an actor with a
value head (MLP or MinAtar CNN), ``epochs`` passes of Adam over each rollout, minibatches
split over the env axis so that every minibatch keeps whole ``[T]`` time series (the loss
network convolves along time).

The rule sees, per step, ``[reward, done, log pi(a|s), entropy, V(s), V(s') (stop-gradient),
memory]`` as ``[B, T]`` arrays, never an observation or an action id, so that a loss found on
one environment can be applied to another with other observation and action spaces.

Reference rules in the slot:

- ``reinforce``: REINFORCE with a learned baseline, the loss EPG's search starts from and
  the family's baseline.
- ``epg``: EPG's loss network (temporal convolutions along the buffer, a context vector pooled
  over time, a per-step MLP) added to REINFORCE's loss with its output layer at zero, so at
  initialisation it *is* REINFORCE; parameters from ``metabench discover epg``.
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
from metabench.families.base import (Check, CheckReport, Family, Trainer,
                                     actor_critic_rollout, count_traces, env_info, finite_tree, register_family, shipped_params)
from metabench.rules import RuleInfo, UpdateRule, no_params
from metabench.types import Metrics

MEMORY_DIM = 8
"""Size of the memory unit's output. A contract constant (like LPG's prediction size) rather
than an agent setting: the loss network's weights depend on it, so a task that changed it
would break every discovered loss."""


class Inputs(NamedTuple):
    """What the loss sees for a minibatch: ``B`` envs by ``T`` contiguous steps (``T`` =
    rollout_len), batch-major ``[B, T]``. The differentiable fields carry the gradient to the
    agent's parameters; the others are data."""

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


@dataclasses.dataclass(frozen=True)
class Config:
    """The EPG agent's fixed hyperparameters (defaults: REINFORCE learns CartPole in ~1e5
    env steps)."""

    num_envs: int = 16
    """Parallel environments per seed (B of a rollout)."""
    rollout_len: int = 32
    """Steps per environment between updates (T, the loss's window)."""
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
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        for name in ("num_envs", "rollout_len", "epochs", "minibatches", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.num_envs % self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide num_envs "
                             f"({self.num_envs}): minibatches are whole envs' time series")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be non-negative, got {self.max_grad_norm!r}")
        if self.network not in ("mlp", "cnn"):
            raise ValueError(f"network must be 'mlp' or 'cnn', got {self.network!r}")
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {self.activation!r}")
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
    """REINFORCE with a learned baseline (Williams 1992): per step
    ``-(G_t - sg V_t) log pi(a_t|s_t) + vf_coef (G_t - V_t)^2 - ent_coef H_t``, with ``G_t``
    the discounted return to go of :func:`returns_to_go`."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")

    def apply(meta_params, x: Inputs) -> jax.Array:
        del meta_params
        g = jax.lax.stop_gradient(returns_to_go(x.reward, x.done, x.bootstrap, gamma))
        adv = g - jax.lax.stop_gradient(x.value)
        return -adv * x.log_prob + vf_coef * (g - x.value) ** 2 - ent_coef * x.entropy

    return UpdateRule(no_params, apply)


def epg_features(x: Inputs) -> jax.Array:
    """The loss network's per-step inputs ``[B, T, 6 + MEMORY_DIM]``. Unbounded quantities go
    through ``asinh`` (linear near 0, logarithmic far out) so that one loss sees CartPole's
    returns of hundreds and MinAtar's of tens on a similar scale."""
    scalars = jnp.stack([jnp.arcsinh(x.reward), x.done, jnp.arcsinh(x.log_prob),
                         jnp.arcsinh(x.entropy), jnp.arcsinh(x.value),
                         jnp.arcsinh(x.bootstrap)], axis=-1)
    return jnp.concatenate([scalars, x.memory], axis=-1)


class LossNet(nn.Module):
    """EPG's loss network: 1-D convolutions along time over the per-step features, whose
    output is pooled over the buffer into a context vector; an MLP then reads, per step, the
    features, the convolution's output at that step and the context, and returns a scalar."""

    channels: int
    kernel: int
    hidden: int
    causal: bool

    @nn.compact
    def __call__(self, feats):
        padding = "CAUSAL" if self.causal else "SAME"
        h = feats
        for _ in range(2):
            h = nn.tanh(nn.Conv(self.channels, (self.kernel,), padding=padding)(h))
        context = jnp.broadcast_to(jnp.mean(h, axis=1, keepdims=True), h.shape)
        z = nn.tanh(nn.Dense(self.hidden)(jnp.concatenate([feats, h, context], axis=-1)))
        # Zero output layer: the learned term starts at exactly 0, so the rule starts as
        # REINFORCE (the paper adds a policy-gradient term to bootstrap its search).
        out = nn.Dense(1, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
        return out(z)[..., 0]


@functools.lru_cache(maxsize=None)
def epg(hidden: int = 32, channels: int = 16, kernel: int = 8, causal: bool = False,
        gamma: float = 0.99, ent_coef: float = 0.01, vf_coef: float = 0.5) -> UpdateRule:
    """EPG's learned loss (Houthooft et al. 2018): ``reinforce(gamma, ent_coef, vf_coef) +
    f(features)`` with ``f`` a :class:`LossNet` (two convolutions of ``channels`` x
    ``kernel`` along time, ``causal`` or centred, and a ``hidden``-unit MLP). ``f``'s output
    layer starts at zero, so at initialisation the rule is REINFORCE exactly; the paper's
    network is larger, these defaults are CPU-sized."""
    for name, v in (("hidden", hidden), ("channels", channels), ("kernel", kernel)):
        if int(v) < 1:
            raise ValueError(f"{name} must be at least 1, got {v!r}")
    base = reinforce(gamma, ent_coef, vf_coef)
    net = LossNet(int(channels), int(kernel), int(hidden), bool(causal))

    def init(rng):
        return net.init(rng, jnp.zeros((1, int(kernel), 6 + MEMORY_DIM)))

    def apply(meta_params, x: Inputs) -> jax.Array:
        return base.apply({}, x) + net.apply(meta_params, epg_features(x))

    return UpdateRule(init, apply)


def _epg_default_params(rule: UpdateRule):
    return shipped_params("epg", rule, "untrained: EPG at its REINFORCE initialisation")


REFERENCE_RULES = {
    "reinforce": RuleInfo("reinforce", "epg", reinforce,
                          "REINFORCE with a learned baseline and an entropy bonus",
                          "Williams 1992; Houthooft et al. 2018"),
    "epg": RuleInfo("epg", "epg", epg, "Evolved Policy Gradients' loss network (temporal "
                    "convolutions + MLP) added to REINFORCE",
                    "Houthooft et al. 2018, Evolved Policy Gradients",
                    default_params=_epg_default_params),
}


# --- the inner loop ----------------------------------------------------------------------


class Batch(NamedTuple):
    """The learner's view of a rollout, batch-major ``[B, T, ...]``."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    done: jax.Array
    bootstrap: jax.Array


class RunnerState(NamedTuple):
    params: Any
    """``{"net": actor-critic parameters, "memory": [MEMORY_DIM] memory unit}``."""
    opt_state: Any
    env_state: Any
    obs: jax.Array
    env_params: Any
    episode_return: jax.Array
    rng: jax.Array


def make_train(env, config: Config, rule: UpdateRule, *, total_timesteps: int,
               sample_params: Callable[[jax.Array], Any] | None = None,
               env_params: Any = None) -> Trainer:
    """The EPG agent on ``env`` with ``rule`` as its loss; see :class:`Trainer`."""
    sample_params, continuous, action_dim, low, high, obs_shape = env_info(
        env, sample_params, env_params)

    n, t_len = config.num_envs, config.rollout_len
    steps_per_update = n * t_len
    num_updates = int(total_timesteps) // steps_per_update
    if num_updates < 1:
        raise ValueError(f"total_timesteps ({total_timesteps}) is smaller than one update "
                         f"({steps_per_update} = num_envs x rollout_len)")
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

    rollout = actor_critic_rollout(env, lambda p, o: forward(p["net"], o), n, t_len,
                                   continuous, low, high)

    def init(rng) -> RunnerState:
        rng, k_net, k_mem, k_env, k_params = jax.random.split(rng, 5)
        env_params = sample_params(k_params)
        params = {"net": network.init(k_net, jnp.zeros((1, *obs_shape), jnp.float32)),
                  "memory": jax.random.normal(k_mem, (MEMORY_DIM,))}
        obs, env_state = env_reset(jax.random.split(k_env, n), env_params)
        return RunnerState(params, optimiser.init(params), env_state, obs, env_params,
                           jnp.zeros(n), rng)

    def loss_fn(params, meta_params, mb: Batch):
        b = mb.reward.shape[0]
        out, value = forward(params["net"], mb.obs.reshape((b * t_len, *obs_shape)))
        out = out.reshape((b, t_len, -1))
        # The memory unit: tanh keeps what the loss reads bounded however far it is pushed.
        memory = jnp.broadcast_to(jnp.tanh(params["memory"]), (b, t_len, MEMORY_DIM))
        ent = nets.entropy(out, continuous)
        x = Inputs(mb.reward, mb.done, nets.log_prob(out, mb.action, continuous), ent,
                   value.reshape((b, t_len)), memory, mb.bootstrap)
        return jnp.mean(rule.apply(meta_params, x)), jnp.mean(ent)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: RunnerState, meta_params, i=None) -> tuple[RunnerState, Metrics]:
        del i  # no schedule beyond optax's own step count
        (env_state, obs, ep_ret, rng), traj, ret_sum, n_eps = rollout(
            state.params, state.env_state, state.obs, state.env_params, state.episode_return,
            state.rng)
        # One critic pass over the true next observations: truncations and the rollout's
        # end bootstrap from V(s'); terminal states do not.
        next_value = network.apply(state.params["net"],
                                   traj.final_obs.reshape((-1, *obs_shape)).astype(jnp.float32),
                                   method=network.value).reshape(traj.reward.shape)
        bootstrap = jnp.where(traj.terminated, 0.0, next_value)
        done = jnp.logical_or(traj.terminated, traj.truncated).astype(jnp.float32)
        batch = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1),
                                       Batch(traj.obs, traj.action, traj.reward, done,
                                             bootstrap))

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
                                rng)
        metrics = Metrics(returns_sum=jnp.sum(ret_sum), episodes=jnp.sum(n_eps),
                          loss=jnp.mean(loss), aux=jnp.mean(ent))
        return new_state, metrics

    return Trainer(init, step, num_updates, steps_per_update)


# --- conformance -------------------------------------------------------------------------


def random_inputs(key: jax.Array, b: int = 4, t: int = 16) -> Inputs:
    """Plausible random inputs: CartPole-scale rewards and values, some episode ends, zero
    bootstrap after terminal states, and a rollout-long memory vector per batch."""
    k = jax.random.split(key, 7)
    done = (jax.random.uniform(k[0], (b, t)) < 0.1).astype(jnp.float32)
    terminal = done * (jax.random.uniform(k[1], (b, t)) < 0.7)
    logits = jax.random.normal(k[2], (b, t, 3))
    action = jax.random.categorical(k[3], logits)
    memory = jnp.broadcast_to(jnp.tanh(jax.random.normal(k[4], (MEMORY_DIM,))),
                              (b, t, MEMORY_DIM))
    value = 10.0 * jax.random.normal(k[5], (b, t))
    return Inputs(jax.random.uniform(k[6], (b, t), minval=-1.0, maxval=1.0), done,
                  nets.log_prob(logits, action, False), nets.entropy(logits, False), value,
                  memory, jnp.where(terminal > 0, 0.0, value + 1.0))


def check(rule: UpdateRule, meta_params, name: str = "rule") -> CheckReport:
    """A per-step loss of shape ``[B, T]``, finite, with finite gradients to the agent's
    side, no recompilation (required); whether the loss has a gradient w.r.t. log pi at all
    (reported, ``gradients_flow``: without it the policy learns only through the entropy)."""
    b, t = 4, 16
    wrapped, traces = count_traces(rule.apply)
    fn = jax.jit(wrapped)

    def mean_loss(diff, x):
        return jnp.mean(rule.apply(meta_params, x._replace(**diff)))

    keys = ("log_prob", "entropy", "value", "memory")
    grad = jax.jit(jax.grad(mean_loss))
    try:
        xs = [random_inputs(jax.random.PRNGKey(s), b, t) for s in (0, 1)]
        outs = [jax.block_until_ready(fn(meta_params, x)) for x in xs]
        grads = grad({k: getattr(xs[0], k) for k in keys}, xs[0])
    except Exception as e:  # a submitted rule may fail in any way; report it, don't crash
        return CheckReport(name, "epg", (Check("runs", False, f"{type(e).__name__}: {e}"),))
    checks = []
    shape_ok = all(np.shape(o) == (b, t) for o in outs)
    checks.append(Check("output_shape", shape_ok,
                        f"expected a per-step loss of shape ({b}, {t}), got {np.shape(outs[0])}"))
    checks.append(Check("finite", all(finite_tree(o) for o in outs),
                        "losses on random inputs are finite"))
    checks.append(Check("finite_gradients", finite_tree(grads),
                        "gradients of the mean loss w.r.t. log_prob, entropy, value and memory "
                        "are finite"))
    checks.append(Check("no_recompilation", traces[0] == 1,
                        f"traced {traces[0]} time(s) for two calls of the same shapes"))
    g = np.asarray(grads["log_prob"])
    flows = bool(np.all(np.isfinite(g)) and np.any(g != 0))
    checks.append(Check("gradients_flow", flows,
                        f"max |d loss / d log_prob| {float(np.max(np.abs(g))):.3g}"
                        + ("" if flows else " (reported, not required)"), required=False))
    return CheckReport(name, "epg", tuple(checks))


FAMILY = register_family(Family(
    name="epg",
    description="policy-gradient agent trained by a learned loss over its rollouts (EPG)",
    Inputs=Inputs,
    Config=Config,
    make_train=make_train,
    reference_rules=REFERENCE_RULES,
    check=check,
    baseline="reinforce",
))
