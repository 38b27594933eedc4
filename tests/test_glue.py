"""The glue: how update functions and stages assemble rewards, advantages, pairs, batches and
metrics out of the pieces, each compared with an independent computation (NumPy, a hand-worked
example, or the model applied directly), never with the code under test.

A consistently wrong assembly passes "the loss falls", "the value is finite" and "two runs of
the same code agree"; these tests are the ones that notice it. Models are tiny and noisy (their
weights plus Gaussian noise), so a policy differs from its reference, values are not zero and
scores vary: a swapped or misplaced term then changes the numbers well beyond the tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.parallel import jit_step
from jaxrlhf.ppo import PPOConfig, make_ppo_update
from jaxrlhf.steps import TrainState, make_dpo_step, make_reward_step
from tests.test_steps import B, pair_batch, policy, reward_model, rollout_batch


def noisy(tree, seed: int, std: float):
    """`tree` plus Gaussian noise of `std` on every leaf."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + std * rng.normal(size=x.shape), jnp.float32), tree)


# The model applied directly (compiled once per model and shape).
forward = jax.jit(lambda apply_fn, params, *inputs: apply_fn({"params": params}, *inputs), static_argnums=0)


def next_token_logps(module, params, ids_BxT, mask_BxT) -> np.ndarray:
    """log p(token t + 1 | tokens <= t) under the model applied directly, in float64 -> `[B, T - 1]`."""
    logits = np.asarray(forward(module.apply, params, ids_BxT, mask_BxT).logits, np.float64)[:, :-1]
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return np.take_along_axis(logits, np.asarray(ids_BxT)[:, 1:, None], -1)[..., 0] - log_z


def assert_params_close(got, want, atol=2e-5):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def sgd_step(params, loss_fn, lr):
    """What one plain SGD step on `loss_fn` makes of `params`."""
    return jax.tree.map(lambda p, g: p - lr * g, params, jax.jit(jax.grad(loss_fn))(params))


# --- PPO: per-token rewards, GAE, whitening, the first gradient -------------------------------


def numpy_gae(rewards_BxN, values_BxN, lengths_B, gamma, lam):
    """GAE by the recursion A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t,
    each row ending (V = 0 after it) at its last real token -> (advantages, returns), 0 after."""
    advantages = np.zeros_like(rewards_BxN)
    for b, n in enumerate(lengths_B):
        following = 0.0
        for t in reversed(range(n)):
            next_value = values_BxN[b, t + 1] if t + 1 < n else 0.0
            following = rewards_BxN[b, t] + gamma * next_value - values_BxN[b, t] + gamma * lam * following
            advantages[b, t] = following
    real_BxN = np.arange(rewards_BxN.shape[1])[None] < np.asarray(lengths_B)[:, None]
    return advantages, (advantages + values_BxN) * real_BxN


def test_ppo_update_equals_a_numpy_derivation_of_rewards_advantages_and_the_first_step():
    """Rewards are -kl_coef * (logp - ref_logp) on every response token plus the score on each
    row's last *real* token (rows end early here); then GAE, whitened advantages, and the
    clipped losses, whose gradient at ratio 1 is the unclipped one. All re-derived from the
    model applied directly; the reported value loss (which sees the returns) and the params
    after one epoch of one minibatch of plain SGD must match. A KL of about 2 nats a token
    makes the KL term's sign count, ragged lengths make the score's position count."""
    module, params0, _ = policy(value_head=True)
    params, ref_params = noisy(params0, 1, 0.3), noisy(params0, 2, 0.3)
    batch = rollout_batch(seed=2)
    config, kl_coef, lr = PPOConfig(epochs=1, gamma=0.9, lam=0.8, vf_coef=0.5), 0.3, 1.0
    seq, attn, resp = batch["sequences"], batch["attention_mask"], batch["response_mask"]
    p, lengths = seq.shape[1] - resp.shape[1], resp.sum(1)
    assert (lengths < resp.shape[1]).sum() >= 4, "rows that end early make the score's position matter"

    logps = next_token_logps(module, params, seq, attn)[:, p - 1:]
    kl = (logps - next_token_logps(module, ref_params, seq, attn)[:, p - 1:]) * resp
    rewards = -kl_coef * kl
    rewards[np.arange(B), lengths - 1] += batch["scores"]
    values = np.asarray(forward(module.apply, params, seq, attn).values, np.float64)[:, p - 1:-1] * resp
    advantages, returns = numpy_gae(rewards, values, lengths, config.gamma, config.lam)
    real = resp == 1
    whitened = (advantages - advantages[real].mean()) / np.sqrt(advantages[real].var(ddof=1) + 1e-8) * resp

    def surrogate(params):
        out = module.apply({"params": params}, seq, attn)
        lp = jnp.take_along_axis(jax.nn.log_softmax(out.logits[:, p - 1:-1]), seq[:, p:, None], -1)[..., 0]
        policy_loss = -jnp.sum(whitened * jnp.exp(lp - logps) * resp) / resp.sum()
        value_loss = 0.5 * jnp.sum((out.values[:, p - 1:-1] - returns) ** 2 * resp) / resp.sum()
        return policy_loss + config.vf_coef * value_loss

    want_params = sgd_step(params, surrogate, lr)
    state = TrainState.create(module, params, optax.sgd(lr), ref_params=ref_params, kl_coef=jnp.float32(kl_coef))
    state, metrics = jit_step(make_ppo_update(config))(state, batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["objective/kl"], kl.sum(1).mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["value/loss"], 0.5 * np.sum((values - returns) ** 2) / resp.sum(),
                               rtol=1e-4, err_msg="value loss: the returns (rewards + GAE) differ")
    assert_params_close(state.params, want_params)


# --- Reward model and preference steps: which score is whose -----------------------------------


def rm_scores(module, params, ids_BxT, mask_BxT) -> jax.Array:
    """The reward model applied directly: its one output per row -> `[B]`."""
    return forward(module.apply, params, ids_BxT, mask_BxT)[:, 0]


def test_pairwise_reward_step_is_bradley_terry_on_chosen_minus_rejected():
    """Loss mean(-log sigmoid(r_chosen - r_rejected - margin)), accuracy mean(r_chosen >
    r_rejected) and the SGD step on that loss, with r_chosen and r_rejected the model applied
    to the chosen and the rejected rows separately. Swapping the two leaves the step's own
    accuracy at 1.0 as it learns; it cannot match scores computed outside it."""
    module, params0, _ = reward_model()
    params, lr = noisy(params0, 3, 0.2), 0.5
    batch = {k: v for k, v in pair_batch().items() if "loss_mask" not in k}
    batch["margin"] = np.linspace(0.0, 0.7, B).astype(np.float32)

    def bradley_terry(params):
        chosen = rm_scores(module, params, batch["chosen_ids"], batch["chosen_mask"])
        rejected = rm_scores(module, params, batch["rejected_ids"], batch["rejected_mask"])
        return jnp.mean(jnp.logaddexp(0.0, -(chosen - rejected - batch["margin"])))

    r_chosen = np.asarray(rm_scores(module, params, batch["chosen_ids"], batch["chosen_mask"]), np.float64)
    r_rejected = np.asarray(rm_scores(module, params, batch["rejected_ids"], batch["rejected_mask"]), np.float64)
    want_params = sgd_step(params, bradley_terry, lr)
    state, metrics = jit_step(make_reward_step("pairwise"))(
        TrainState.create(module, params, optax.sgd(lr)), batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["loss"], np.mean(np.logaddexp(0, -(r_chosen - r_rejected - batch["margin"]))),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["reward/margin"], np.mean(r_chosen - r_rejected), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["reward/accuracy"], np.mean(r_chosen > r_rejected))
    assert_params_close(state.params, want_params)


def response_logps(module, params, batch, side, average=False) -> np.ndarray:
    """Summed (or length-averaged) logprobs of a side's response tokens (`loss_mask`), the
    model applied directly -> `[B]`."""
    ids, mask, loss_mask = (batch[f"{side}_{k}"] for k in ("ids", "mask", "loss_mask"))
    scored = (loss_mask * mask)[:, 1:]
    total = np.sum(next_token_logps(module, params, ids, mask) * scored, axis=1)
    return total / scored.sum(1) if average else total


def preference_formula(loss_type, pi_c, pi_r, ref_c, ref_r, n_chosen, beta, delta=1.0, reg_weight=0.1):
    """Per-pair losses as the papers write them, and the step's margin (what accuracy counts)."""
    h = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":  # DPO, Rafailov et al.
        return np.logaddexp(0.0, -beta * h), beta * h
    if loss_type == "hinge":  # TRL's reference-normalised hinge
        return np.maximum(0.0, 1.0 - beta * h), beta * h
    if loss_type == "ipo":  # Azar et al., on length-averaged logprobs
        return (h - 1.0 / (2.0 * beta)) ** 2, beta * h
    # SLiC-HF, Zhao et al.: rank hinge on the policy alone + the chosen response's mean token NLL
    return np.maximum(0.0, delta - pi_c + pi_r) + reg_weight * (-pi_c / n_chosen), pi_c - pi_r


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "slic"])
def test_preference_step_loss_and_metrics_follow_the_papers_on_the_model_applied_directly(loss_type):
    """The step's loss and every metric, from sequence logprobs of the chosen and rejected
    responses under the policy and a reference that differs from it, computed outside the
    step. A swap of chosen and rejected, a reference scored with the policy's params, or a
    missing length average for IPO all change them."""
    module, params0, _ = policy()
    params, ref_params, beta = noisy(params0, 5, 0.2), noisy(params0, 6, 0.2), 0.5
    batch, average = pair_batch(), loss_type == "ipo"
    pi_c, pi_r, ref_c, ref_r = (response_logps(module, p, batch, side, average)
                                for p in (params, ref_params) for side in ("chosen", "rejected"))
    n_chosen = (batch["chosen_loss_mask"] * batch["chosen_mask"])[:, 1:].sum(1)
    per_pair, margin = preference_formula(loss_type, pi_c, pi_r, ref_c, ref_r, n_chosen, beta)
    want = {"loss": per_pair.mean(), "logps/chosen": pi_c.mean(), "logps/rejected": pi_r.mean(),
            "rewards/margins": margin.mean(), "rewards/accuracies": np.mean(margin > 0)}
    if loss_type != "slic":
        want |= {"rewards/chosen": beta * np.mean(pi_c - ref_c), "rewards/rejected": beta * np.mean(pi_r - ref_r)}
    state = TrainState.create(module, params, optax.sgd(0.1), ref_params=ref_params)
    _, metrics = jit_step(make_dpo_step(loss_type, beta))(state, batch, jax.random.key(0))
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
