"""Losses against NumPy references of the published formulas, and their defining properties."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from jaxrlhf import losses
from jaxrlhf.updates.common import clip_by_global_norm
from jaxrlhf.updates.ppo import PPOConfig, update_kl_coef

pytestmark = pytest.mark.fast

# Derandomised and without shrinking: CI reruns are identical and a failure reports fast.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("ci")

RNG = np.random.default_rng(0)
B, T, V = 6, 9, 11


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def ragged_mask(b=B, t=T, seed=0):
    lengths = np.random.default_rng(seed).integers(1, t + 1, size=b)
    return (np.arange(t)[None] < lengths[:, None]).astype(np.float32)


floats = st.floats(-5.0, 5.0, allow_nan=False, width=32)
vectors = hnp.arrays(np.float32, (B,), elements=floats)


# --- NumPy references of the published formulas --------------------------------------------


def test_token_logprobs_and_sft_loss_match_numpy():
    logits, tokens, mask = RNG.normal(size=(B, T, V)), RNG.integers(0, V, (B, T)), ragged_mask()
    logp = logits / 0.7 - np.log(np.exp(logits / 0.7).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_logprobs(logits, tokens, 0.7), want, rtol=1e-5, atol=1e-5)
    nll = -np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.sft_loss(logits, tokens, mask), (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_dpo_ipo_hinge_slic_match_numpy():
    pc, pr, rc, rr, reg = (RNG.normal(size=B) * 3 for _ in range(5))
    beta, eps = 0.3, 0.1
    h = (pc - pr) - (rc - rr)
    dpo = -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)  # Rafailov et al. + cDPO
    np.testing.assert_allclose(losses.preference_loss(pc, pr, rc, rr, beta, "sigmoid", eps), dpo, rtol=1e-5)
    np.testing.assert_allclose(losses.preference_loss(pc, pr, rc, rr, beta, "hinge"), np.maximum(0, 1 - beta * h), rtol=1e-5)
    np.testing.assert_allclose(losses.preference_loss(pc, pr, rc, rr, beta, "ipo"), (h - 1 / (2 * beta)) ** 2, rtol=1e-5)
    slic = np.maximum(0, 0.5 - pc + pr) + 0.2 * reg  # Zhao et al. 2023, eq. (3) with the SFT regulariser
    np.testing.assert_allclose(losses.slic_loss(pc, pr, reg, 0.5, 0.2), slic, rtol=1e-5, atol=1e-6)


def test_reward_losses_match_numpy():
    rc, rr, target = (RNG.normal(size=B) for _ in range(3))
    np.testing.assert_allclose(losses.pairwise_reward_loss(rc, rr, 0.5), np.mean(-np_log_sigmoid(rc - rr - 0.5)), rtol=1e-5)
    np.testing.assert_allclose(losses.regression_loss(rc, target), np.mean((rc - target) ** 2), rtol=1e-5)


def test_kl_estimators_match_numpy():
    lp, ref = RNG.normal(size=(B, T)), RNG.normal(size=(B, T))
    log_r = ref - lp
    for name, want in {"k1": lp - ref, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r, "abs": np.abs(lp - ref)}.items():
        np.testing.assert_allclose(losses.kl_penalty(lp, ref, name), want, rtol=1e-5, atol=1e-6, err_msg=name)


def gae_loop(rewards, values, mask, gamma, lam):
    """TRL's PPO GAE loop, with values and rewards zeroed past each response."""
    rewards, values = rewards * mask, values * mask
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        last = 0.0
        for t in reversed(range(rewards.shape[1])):
            next_value = values[b, t + 1] if t + 1 < rewards.shape[1] else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv * mask, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_equals_a_plain_python_loop(gamma, lam):
    rewards, values, mask = RNG.normal(size=(B, T)), RNG.normal(size=(B, T)), ragged_mask(seed=3)
    adv, ret = losses.gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_ppo_losses_match_trl_formulas():
    lp, old, adv, values, old_values, returns = (RNG.normal(size=(B, T)) * 0.3 for _ in range(6))
    mask, eps = ragged_mask(seed=4), 0.2
    ratio = np.exp(lp - old)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    loss, metrics = losses.ppo_policy_loss(lp, old, adv, mask, eps)
    np.testing.assert_allclose(loss, (pg * mask).sum() / mask.sum(), rtol=1e-5)
    clipfrac = ((-adv * np.clip(ratio, 1 - eps, 1 + eps) > -adv * ratio) * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["policy/clipfrac"], clipfrac, rtol=1e-5)
    np.testing.assert_allclose(metrics["policy/approx_kl"], (0.5 * (lp - old) ** 2 * mask).sum() / mask.sum(), rtol=1e-5)
    v_clipped = old_values + np.clip(values - old_values, -eps, eps)
    vf = 0.5 * np.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    vloss, _ = losses.ppo_value_loss(values, old_values, returns, mask, eps)
    np.testing.assert_allclose(vloss, (vf * mask).sum() / mask.sum(), rtol=1e-5)


def test_adaptive_kl_controller_follows_ziegler():
    config = PPOConfig(kl_coef=0.2, kl_target=6.0, kl_horizon=10000)
    for kl, n in [(12.0, 256), (1.0, 64), (6.3, 128)]:
        error = np.clip(kl / 6.0 - 1, -0.2, 0.2)
        np.testing.assert_allclose(update_kl_coef(jnp.float32(0.2), kl, n, config), 0.2 * (1 + error * n / 10000), rtol=1e-6)
    assert update_kl_coef(jnp.float32(0.2), 50.0, 256, PPOConfig(kl_coef=0.2)) == 0.2  # fixed controller


# --- Properties -------------------------------------------------------------------------------


@given(vectors, vectors, st.floats(0.01, 2.0))
def test_dpo_is_log2_when_policy_equals_reference(pi_c, pi_r, beta):
    np.testing.assert_allclose(losses.preference_loss(pi_c, pi_r, pi_c, pi_r, beta, "sigmoid"), np.log(2.0), rtol=1e-5)


@given(vectors, st.floats(0.05, 2.0), st.floats(0.0, 3.0))
def test_hinge_is_zero_beyond_the_margin(pi_c, beta, extra):
    h = 1.0 / beta + extra + 1e-3  # beta * h > 1
    zeros = np.zeros_like(pi_c)
    np.testing.assert_array_equal(losses.preference_loss(pi_c + h, pi_c, zeros, zeros, beta, "hinge"), 0.0)


@given(vectors, st.floats(0.05, 2.0))
def test_ipo_is_minimal_at_the_target_gap(pi_r, beta):
    def loss(gap):
        zeros = jnp.zeros_like(pi_r)
        return losses.preference_loss(pi_r + gap, pi_r, zeros, zeros, beta, "ipo").sum()

    target = 1.0 / (2.0 * beta)
    assert abs(float(jax.grad(loss)(target))) < 1e-3 * B
    assert loss(target) <= 1e-4 * B and loss(target + 0.3) > loss(target) and loss(target - 0.3) > loss(target)


@given(hnp.arrays(np.float32, (B, T), elements=floats), hnp.arrays(np.float32, (B, T), elements=floats))
def test_k3_is_never_negative(lp, ref):
    assert (np.asarray(losses.kl_penalty(lp, ref, "k3")) >= 0).all()


@given(hnp.arrays(np.float32, (B, T), elements=floats), st.integers(0, 1000))
def test_masked_whiten_gives_mean_0_std_1(x, seed):
    mask = ragged_mask(seed=seed)
    mask[0, :3] = 1  # at least a few valid values
    picked = x[mask > 0]
    if picked.std() < 1e-2:
        return
    out = np.asarray(losses.masked_whiten(x, mask))[mask > 0]
    np.testing.assert_allclose(out.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(ddof=1), 1.0, rtol=1e-3)
    assert (np.asarray(losses.masked_whiten(x, mask))[mask == 0] == 0).all()


def _all_losses(logits, a, b_, c, d, e, tokens, mask):
    adv, ret = losses.gae(a, b_, mask, 0.9, 0.8)
    pg, _ = losses.ppo_policy_loss(a, b_, c, mask, 0.2)
    vf, _ = losses.ppo_value_loss(a, b_, c, mask, 0.2)
    return (losses.sft_loss(logits, tokens, mask) + pg + vf + losses.masked_mean(d, mask)
            + jnp.sum(adv * ret) + jnp.sum(losses.masked_whiten(e, mask) ** 3))


_losses_and_grads = jax.jit(jax.value_and_grad(_all_losses, argnums=tuple(range(6))))


@given(st.integers(0, 1000), st.floats(-1e4, 1e4, allow_nan=False, width=32), st.sampled_from([np.nan, np.inf, None]))
def test_masked_positions_change_neither_losses_nor_gradients(seed, junk, special):
    rng = np.random.default_rng(seed)
    mask = ragged_mask(seed=seed)
    mask[:, 0] = 1
    logits, tokens = rng.normal(size=(B, T, V)).astype(np.float32), rng.integers(0, V, (B, T))
    per_token = [rng.normal(size=(B, T)).astype(np.float32) for _ in range(5)]
    # Padding logits are finite junk; per-token inputs (logprobs, values, advantages) may even
    # be NaN or inf there, as a careless rollout might leave them.
    dirty_logits = np.where(mask[..., None] > 0, logits, np.float32(junk))
    fill = np.float32(junk if special is None else special)
    dirty = [np.where(mask > 0, x, fill) for x in per_token]
    v1, g1 = _losses_and_grads(logits, *per_token, tokens, mask)
    v2, g2 = _losses_and_grads(dirty_logits, *dirty, tokens, mask)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    for x, y in zip(g1, g2):
        chex.assert_trees_all_close(y, x, rtol=1e-5, atol=1e-6)


@given(hnp.arrays(np.float32, (B,), elements=st.floats(-3, 3, width=32)), st.floats(0.05, 0.3))
def test_clipped_side_has_zero_gradient_outside_the_clip_range(adv, eps):
    adv = np.where(np.abs(adv) < 0.1, 0.5, adv).astype(np.float32)[:, None].repeat(T, 1)
    old = np.zeros((B, T), np.float32)
    # Move the ratio beyond the clip range in the direction the advantage favours.
    lp = np.where(adv > 0, np.log1p(eps) + 0.05, np.log1p(-eps) - 0.05).astype(np.float32)
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, np.ones((B, T)), eps)[0])(lp)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # ...while inside the range the gradient is not zero.
    inside = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, np.ones((B, T)), eps)[0])(np.zeros_like(lp))
    assert (np.asarray(inside) != 0).all()


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_gradient_clipping_is_optaxs(max_norm):
    """Our clip (one scalar factor) gives optax's clipped gradients and state; unclipped, the same bits."""
    grads = {"a": jnp.arange(6.0).reshape(2, 3) - 2.5, "b": jnp.full(4, 0.3)}
    ours, ref = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(ref.init(grads))
    got, want = (tx.update(grads, tx.init(grads))[0] for tx in (ours, ref))
    for k in grads:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0 if max_norm > 10 else 1e-7)
        assert max_norm < 10 or np.array_equal(got[k], grads[k])
