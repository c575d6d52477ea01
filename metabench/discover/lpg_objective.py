"""The meta-objective of ``metabench discover lpg`` (see :mod:`metabench.discover.lpg` for
the whole procedure): a per-lifetime meta-critic, never seen by the agent or the rule, whose
bootstrapped advantages carry consequences beyond the validation window to eta, and the
objective ``J`` with the paper's four regularisers (Oh et al. 2020, eq. 2).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from metabench.families import lpg as lpg_family
from metabench.rl import truncated_gae


class Critic(nn.Module):
    """The meta-critic: the agent's torso kind with a scalar head (a table for tabular
    agents, zero-initialised)."""

    torso: str = "tabular"
    hidden: tuple[int, ...] = (64,)
    one_hot: bool = False

    @nn.compact
    def __call__(self, obs):
        x, dense = lpg_family.agent_torso(obs, self.torso, self.hidden, self.one_hot)
        return dense(1)(x)[:, 0]


def critic_values(critic: Critic, params, traj: lpg_family.Rollout):
    """``(V(s_t), V(s_t+1))``, each ``[T, N]``, with ``s_t+1`` the true next observation."""
    t, n = traj.reward.shape
    flat = lambda o: o.reshape((t * n, *o.shape[2:])).astype(jnp.float32)  # noqa: E731
    v = critic.apply(params, flat(traj.obs)).reshape(t, n)
    v_next = critic.apply(params, flat(traj.final_obs)).reshape(t, n)
    return v, v_next


def critic_advantage(critic: Critic, params, traj: lpg_family.Rollout, gamma: float,
                     lambda_: float):
    """GAE with the critic, bootstrapped at truncations and at the end of the window, not
    at terminations: ``(advantages, lambda-returns)``, each ``[T, N]``, both constants."""
    v, v_next = critic_values(critic, jax.lax.stop_gradient(params), traj)
    adv, target = truncated_gae(traj.reward, v, v_next, traj.terminated, traj.truncated,
                                gamma, lambda_)
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(target)


def critic_loss(critic: Critic, params, traj: lpg_family.Rollout, target: jax.Array):
    v, _ = critic_values(critic, params, traj)
    return 0.5 * jnp.mean(jnp.square(target - v))


def critic_step(critic: Critic, opt: optax.GradientTransformation, params, opt_state,
                traj: lpg_family.Rollout, gamma: float, lambda_: float):
    """One optimiser step of the critic towards its own lambda-returns on ``traj``:
    ``(params, opt_state, loss before the step)``."""
    _, target = critic_advantage(critic, params, traj, gamma, lambda_)
    loss, grad = jax.value_and_grad(critic_loss, argnums=1)(critic, params, traj, target)
    updates, opt_state = opt.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def meta_objective(logits, y_logits, actions, adv, pi_hat_sq, y_hat_sq,
                   cfg):
    """``J`` of the module docstring for one batch of the updated agent's outputs
    (``logits [N, A]``, ``y_logits [N, m]``, ``actions [N]``, advantages ``[N]``, treated as
    constants) and the mean squares of the rule's outputs; ``cfg`` carries the four
    regularisers' weights (an ``LPGDiscoverConfig``). Returns ``(J, (pg, H(pi), H(y)))``."""
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, actions[:, None].astype(jnp.int32), 1)[:, 0]
    pg = jnp.mean(logp * jax.lax.stop_gradient(adv))
    pi_ent = -jnp.mean(jnp.sum(jnp.exp(logp_all) * logp_all, -1))
    log_y = jax.nn.log_softmax(y_logits)
    y_ent = -jnp.mean(jnp.sum(jnp.exp(log_y) * log_y, -1))
    objective = (pg + cfg.beta_pi_entropy * pi_ent + cfg.beta_y_entropy * y_ent
                 - cfg.beta_pi_hat * pi_hat_sq - cfg.beta_y_hat * y_hat_sq)
    return objective, (pg, pi_ent, y_ent)
