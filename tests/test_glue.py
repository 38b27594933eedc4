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

from jaxrlhf.config import DataConfig, RewardSource, TrainConfig
from jaxrlhf.parallel import jit_step
from jaxrlhf.stages.online_dpo import trl_metrics
from jaxrlhf.updates.ppo import PPOConfig, make_ppo_update
from jaxrlhf.updates import TrainState, make_dpo_step, make_reward_step
from tests.test_steps import B, pair_batch, policy, reward_model, rollout_batch

pytestmark = pytest.mark.fast


def noisy(tree, seed: int, std: float):
    """`tree` plus Gaussian noise of `std` on every leaf."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + std * rng.normal(size=x.shape), jnp.float32), tree)


# The model applied directly (compiled once per model and shape).
forward = jax.jit(lambda apply_fn, params, *inputs: apply_fn({"params": params}, *inputs), static_argnums=0)


def next_token_logps(module, params, ids_BxT, mask_BxT, temperature: float = 1.0) -> np.ndarray:
    """log p(token t + 1 | tokens <= t) under the model applied directly, its logits divided by
    `temperature`, in float64 -> `[B, T - 1]`."""
    logits = np.asarray(forward(module.apply, params, ids_BxT, mask_BxT).logits, np.float64)[:, :-1] / temperature
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return np.take_along_axis(logits, np.asarray(ids_BxT)[:, 1:, None], -1)[..., 0] - log_z


def assert_params_close(got, want, atol=2e-5):
    """Leaf by leaf, each named in the failure message."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def sgd_step(params, loss_fn, lr):
    """What one plain SGD step on `loss_fn` makes of `params`."""
    return sgd_steps(params, loss_fn, lr, 1)[-1]


def sgd_steps(params, loss_fn, lr, steps):
    """The params after each of `steps` plain SGD steps on `loss_fn` (its gradient compiled once)."""
    grad, out = jax.jit(jax.grad(loss_fn)), []
    for _ in range(steps):
        params = jax.tree.map(lambda p, g: p - lr * g, params, grad(params))
        out.append(params)
    return out


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


def numpy_whiten(x_BxN, real_BxN, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) over the real entries (var with Bessel's correction, as
    TRL's `masked_whiten`), the mean added back unless `shift_mean`; 0 elsewhere."""
    mean, var = x_BxN[real_BxN].mean(), x_BxN[real_BxN].var(ddof=1)
    return ((x_BxN - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)) * real_BxN


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_update_equals_a_numpy_derivation_of_rewards_advantages_and_the_first_step(whiten_rewards):
    """Rewards are -kl_coef * (logp - ref_logp) on every response token plus the score on each
    row's last *real* token (rows end early here); with `whiten_rewards` they are scaled to std
    1 over the response tokens, their mean kept (TRL's shift_mean=False); then GAE, whitened
    advantages, and the clipped losses, whose gradient at ratio 1 is the unclipped one. All
    re-derived from the model applied directly; the reported value loss (which sees the returns)
    and the params after one epoch of one minibatch of plain SGD must match. A reference that
    differs by about half a nat a token makes the KL term's sign count; scores of a few units on
    rows that mostly end early make the score's position count (each moves the value loss ~20%),
    and make the rewards' mean far from 0, so removing it would move the returns."""
    module, params0, _ = policy(value_head=True)
    params, ref_params = noisy(params0, 1, 0.3), noisy(params0, 2, 0.3)
    batch = rollout_batch(seed=2)
    batch["scores"] = np.array([3.0, -2.0, 2.5, -3.0, 1.0, 2.0, -1.0, 3.0], np.float32)
    config = PPOConfig(epochs=1, gamma=0.9, lam=0.8, vf_coef=0.5, whiten_rewards=whiten_rewards)
    kl_coef, lr = 0.5, 1.0
    seq, attn, resp = batch["sequences"], batch["attention_mask"], batch["response_mask"]
    p, lengths = seq.shape[1] - resp.shape[1], resp.sum(1)
    assert (lengths < resp.shape[1]).sum() >= 4, "rows that end early make the score's position matter"

    logps = next_token_logps(module, params, seq, attn)[:, p - 1:]
    kl = (logps - next_token_logps(module, ref_params, seq, attn)[:, p - 1:]) * resp
    rewards = -kl_coef * kl
    rewards[np.arange(B), lengths - 1] += batch["scores"]
    real = resp == 1
    if whiten_rewards:
        rewards = numpy_whiten(rewards, real, shift_mean=False)
    values = np.asarray(forward(module.apply, params, seq, attn).values, np.float64)[:, p - 1:-1] * resp
    advantages, returns = numpy_gae(rewards, values, lengths, config.gamma, config.lam)
    whitened = numpy_whiten(advantages, real)

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
    # TRL's objective/entropy: (-logprobs).sum(1).mean() over the response tokens, not a per-token entropy.
    np.testing.assert_allclose(metrics["objective/entropy"], -(logps * resp).sum(1).mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["value/loss"], 0.5 * np.sum((values - returns) ** 2) / resp.sum(),
                               rtol=1e-4, err_msg="value loss: the returns (rewards + GAE) differ")
    assert_params_close(state.params, want_params)


def test_ppo_kl_past_the_response_is_masked_out_even_where_a_logprob_is_minus_inf():
    """A token after EOS that the policy gives probability 0 (logprob -inf, so KL inf there,
    and inf * 0 = NaN in a masked product) changes no metric, no param and not the adaptive
    KL coefficient: all stay finite and equal to the update on a batch whose padding is benign."""
    module, params, _ = policy(value_head=True)
    batch = rollout_batch(seed=2)
    resp = batch["response_mask"]
    assert (resp == 0).any()

    def minus_inf_after_eos(variables, ids_BxT, mask_BxT, **kwargs):
        out = module.apply(variables, ids_BxT, mask_BxT, **kwargs)
        n = out.logits.shape[1]  # the update's head_slice scores the last n tokens
        hit = jax.nn.one_hot(ids_BxT[:, -n:], out.logits.shape[-1], dtype=bool) & (mask_BxT[:, -n:] == 0)[..., None]
        return out._replace(logits=jnp.where(hit, -jnp.inf, out.logits))

    config = PPOConfig(epochs=1, kl_target=0.01, kl_horizon=100)
    results = []
    for apply_fn in (module.apply, minus_inf_after_eos):
        state = TrainState.create(module, jax.tree.map(jnp.array, params), optax.sgd(0.1),
                                  ref_params=noisy(params, 1, 0.3), kl_coef=jnp.float32(0.1))
        state = state.replace(apply_fn=apply_fn)
        results.append(jit_step(make_ppo_update(config))(state, batch, jax.random.key(0)))
    (want_state, want), (state, got) = results
    for name in want:
        assert np.isfinite(got[name]), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isfinite(state.kl_coef)
    np.testing.assert_allclose(state.kl_coef, want_state.kl_coef, rtol=1e-6)
    assert_params_close(state.params, want_state.params, atol=1e-6)


def test_adaptive_kl_refuses_a_horizon_that_could_make_the_coefficient_nonpositive():
    """Ziegler et al.'s factor 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon is <= 0 once
    n / horizon >= 5: such a horizon is a config error (in the update and in the stage's
    config, before any work); one just above the limit keeps the coefficient positive."""
    from jaxrlhf.errors import ConfigError
    from jaxrlhf.updates.ppo import update_kl_coef
    from jaxrlhf.stages.ppo import PPOStageConfig

    module, params, _ = policy(value_head=True)
    state = TrainState.create(module, params, optax.sgd(0.1), ref_params=jax.tree.map(jnp.array, params),
                              kl_coef=jnp.float32(0.1))
    with pytest.raises(ConfigError, match="kl_horizon"):  # B = 8 rollouts, 8 / 1 >= 5
        jit_step(make_ppo_update(PPOConfig(epochs=1, kl_target=1.0, kl_horizon=1)))(
            state, rollout_batch(), jax.random.key(0))
    sections = dict(policy="p", reward=RewardSource(function="m:f"), prompts=DataConfig(path="x.jsonl"))
    with pytest.raises(ConfigError, match="kl_horizon"):
        PPOStageConfig(**sections, ppo=PPOConfig(kl_target=1.0, kl_horizon=6), train=TrainConfig(batch_size=32))
    PPOStageConfig(**sections, ppo=PPOConfig(kl_target=1.0, kl_horizon=7), train=TrainConfig(batch_size=32))
    # At the limit allowed (32 / 7 < 5) and the largest downward error (kl = 0): still > 0.
    assert update_kl_coef(jnp.float32(0.1), jnp.float32(0.0), 32, PPOConfig(kl_target=1.0, kl_horizon=7)) > 0


# --- Reward model and preference steps: which score is whose -----------------------------------


def rm_scores(module, params, ids_BxT, mask_BxT) -> jax.Array:
    """The reward model applied directly: its one output per row -> `[B]`."""
    return forward(module.apply, params, ids_BxT, mask_BxT)[:, 0]


def test_pairwise_reward_step_is_bradley_terry_on_chosen_minus_rejected():
    """Loss mean(-log sigmoid(r_chosen - r_rejected - margin)), accuracy and margin metrics,
    and the SGD step on that loss, with r_chosen and r_rejected the model applied to the chosen
    and the rejected rows separately. Each pair is ordered so that the model scores its chosen
    text higher: a step that swapped the two would see every difference change sign (its own
    accuracy, computed on the swapped values, still reads 1.0 once it has learned)."""
    module, params0, _ = reward_model()
    params, lr = noisy(params0, 6, 0.5), 0.5
    pairs = pair_batch()
    higher = (rm_scores(module, params, pairs["chosen_ids"], pairs["chosen_mask"])
              > rm_scores(module, params, pairs["rejected_ids"], pairs["rejected_mask"]))[:, None]
    batch = {"margin": np.linspace(0.0, 0.7, B).astype(np.float32)}
    for k in ("ids", "mask"):
        first, second = pairs[f"chosen_{k}"], pairs[f"rejected_{k}"]
        batch |= {f"chosen_{k}": np.where(higher, first, second), f"rejected_{k}": np.where(higher, second, first)}

    def bradley_terry(params):
        chosen = rm_scores(module, params, batch["chosen_ids"], batch["chosen_mask"])
        rejected = rm_scores(module, params, batch["rejected_ids"], batch["rejected_mask"])
        return jnp.mean(jnp.logaddexp(0.0, -(chosen - rejected - batch["margin"])))

    r_chosen = np.asarray(rm_scores(module, params, batch["chosen_ids"], batch["chosen_mask"]), np.float64)
    r_rejected = np.asarray(rm_scores(module, params, batch["rejected_ids"], batch["rejected_mask"]), np.float64)
    assert np.all(r_chosen - r_rejected > 0.1), "every pair must have a clear order"
    want_params = sgd_step(params, bradley_terry, lr)
    state, metrics = jit_step(make_reward_step("pairwise"))(
        TrainState.create(module, params, optax.sgd(lr)), batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["reward/accuracy"], np.mean(r_chosen > r_rejected))
    np.testing.assert_allclose(metrics["reward/margin"], np.mean(r_chosen - r_rejected), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.mean(np.logaddexp(0, -(r_chosen - r_rejected - batch["margin"]))),
                               rtol=1e-5)
    assert_params_close(state.params, want_params)


def response_logps(module, params, batch, side) -> np.ndarray:
    """Summed logprobs of a side's response tokens (`loss_mask`), the model applied directly
    -> `[B]`."""
    ids, mask, loss_mask = (batch[f"{side}_{k}"] for k in ("ids", "mask", "loss_mask"))
    return np.sum(next_token_logps(module, params, ids, mask) * (loss_mask * mask)[:, 1:], axis=1)


def preference_formula(loss_type, pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta, delta=1.0, reg_weight=0.1):
    """Per-pair losses as the papers (and TRL) write them, from summed sequence logprobs and
    the response lengths `n_c`, `n_r`."""
    h = (pi_c - pi_r) - (ref_c - ref_r)
    if loss_type == "sigmoid":  # DPO, Rafailov et al.
        return np.logaddexp(0.0, -beta * h)
    if loss_type == "hinge":  # TRL's reference-normalised hinge
        return np.maximum(0.0, 1.0 - beta * h)
    if loss_type == "ipo":  # Azar et al., on each side's log ratio over its length, as TRL
        return ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1.0 / (2.0 * beta)) ** 2
    hinge = np.maximum(0.0, delta - pi_c + pi_r)  # SLiC-HF, Zhao et al.: rank hinge on the policy alone
    if loss_type == "slic":  # ... + the sequence NLL of the SFT target (the chosen response)
        return hinge + reg_weight * -pi_c
    return hinge + reg_weight * (-pi_c / n_c)  # "slic-token_mean": that NLL per token


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "slic", "slic-token_mean"])
def test_preference_step_loss_and_metrics_follow_the_papers_on_the_model_applied_directly(loss_type):
    """The step's loss and every metric, from sequence logprobs of the chosen and rejected
    responses under the policy and a reference that differs from it, computed outside the
    step. A swap of chosen and rejected, a reference scored with the policy's params, a
    missing length average in the IPO loss, or metrics from averaged logprobs (TRL logs sums:
    `logps/*` the summed logprobs, `rewards/*` beta times the summed log ratios) all change
    them; so does SLiC's regulariser per token where the paper sums over the sequence. Online
    DPO's TRL metrics come from these step metrics (the pairs are the 2B sampled replies, each
    chosen or rejected once): `objective/kl` the mean over the replies of the summed log ratio
    policy / reference, `objective/non_score_reward` -beta times it, `objective/rlhf_reward`
    the mean score plus that."""
    module, params0, _ = policy()
    params, ref_params, beta = noisy(params0, 5, 0.2), noisy(params0, 6, 0.2), 0.5
    batch = pair_batch()
    pi_c, pi_r, ref_c, ref_r = (response_logps(module, p, batch, side)
                                for p in (params, ref_params) for side in ("chosen", "rejected"))
    n_c, n_r = ((batch[f"{side}_loss_mask"] * batch[f"{side}_mask"])[:, 1:].sum(1) for side in ("chosen", "rejected"))
    assert len(set(n_c) | set(n_r)) > 1, "ragged lengths make the IPO average and SLiC's sum count"
    per_pair = preference_formula(loss_type, pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta)
    margin = pi_c - pi_r if loss_type.startswith("slic") else beta * ((pi_c - ref_c) - (pi_r - ref_r))
    want = {"loss": per_pair.mean(), "logps/chosen": pi_c.mean(), "logps/rejected": pi_r.mean(),
            "rewards/margins": margin.mean(), "rewards/accuracies": np.mean(margin > 0)}
    if not loss_type.startswith("slic"):
        want |= {"rewards/chosen": beta * np.mean(pi_c - ref_c), "rewards/rejected": beta * np.mean(pi_r - ref_r)}
    state = TrainState.create(module, params, optax.sgd(0.1), ref_params=ref_params)
    kind, _, regularizer = loss_type.partition("-")
    step = make_dpo_step(kind, beta, **({"slic_regularizer": regularizer} if regularizer else {}))
    _, metrics = jit_step(step)(state, batch, jax.random.key(0))
    if kind in ("sigmoid", "ipo"):  # online DPO's losses (and hinge)
        scores = np.concatenate([np.linspace(1.0, 3.0, B), np.linspace(-1.0, 0.5, B)])  # the first replies chosen
        metrics |= trl_metrics(metrics, scores, np.ones(B, bool), np.ones(2 * B, bool), beta)
        kl = np.mean(np.concatenate([pi_c - ref_c, pi_r - ref_r]))
        want |= {"objective/kl": kl, "objective/non_score_reward": -beta * kl,
                 "objective/rlhf_reward": np.mean(scores) - beta * kl,
                 "objective/entropy": -np.mean(np.concatenate([pi_c, pi_r]))}
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
