"""RLOO's and GRPO's advantages and losses against NumPy references of the papers' and TRL's
formulas on random inputs, and the properties that define them."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import group_losses as gl

pytestmark = pytest.mark.fast

RNG = np.random.default_rng(0)


def numpy_std(x, axis=None):
    return np.std(x, axis=axis, ddof=1)


def ragged_mask(b, t, rng):
    lengths = rng.integers(1, t + 1, size=b)
    return (np.arange(t)[None] < lengths[:, None]).astype(np.float32)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_rloo_advantages_are_reward_minus_the_mean_of_the_others_and_sum_to_zero_per_group(k):
    rewards = RNG.normal(size=6 * k).astype(np.float32) * 3
    want = np.empty_like(rewards)
    for i in range(len(rewards)):  # the paper's formula, one sample at a time
        group = range(i // k * k, i // k * k + k)
        want[i] = rewards[i] - np.mean([rewards[j] for j in group if j != i])
    got = np.asarray(gl.rloo_advantages(jnp.asarray(rewards), k))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.reshape(-1, k).sum(1), 0.0, atol=1e-5)
    # TRL's normalize_advantages: whitened over the batch, (a - mean) / (std + 1e-4).
    normalized = np.asarray(gl.rloo_advantages(jnp.asarray(rewards), k, normalize=True))
    np.testing.assert_allclose(normalized, (want - want.mean()) / (numpy_std(want) + 1e-4), rtol=1e-4, atol=1e-5)


def test_a_leave_one_out_baseline_needs_two_samples_and_whole_groups():
    with pytest.raises(ValueError, match="k >= 2"):
        gl.rloo_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        gl.rloo_advantages(jnp.zeros(4), 3)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_follow_trl_and_are_zero_mean_per_group(scale):
    k = 4
    rewards = (RNG.normal(size=5 * k) * np.repeat(RNG.uniform(0.1, 3, size=5), k)).astype(np.float32)
    grouped = rewards.reshape(-1, k)
    centred = (grouped - grouped.mean(1, keepdims=True)).reshape(-1)
    std = {"group": np.repeat(numpy_std(grouped, 1), k), "batch": np.full_like(rewards, numpy_std(rewards)),
           "none": np.ones_like(rewards) - 1e-4}[scale]
    got = np.asarray(gl.group_advantages(jnp.asarray(rewards), k, scale))
    np.testing.assert_allclose(got, centred / (std + 1e-4), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.reshape(-1, k).mean(1), 0.0, atol=1e-5)
    if scale == "group":  # each group then has std ~1 (the 1e-4 aside)
        np.testing.assert_allclose(numpy_std(got.reshape(-1, k), 1), 1.0, rtol=1e-3)


def trl_nanstd(x, axis=None):
    """TRL's `nanstd`: Bessel-corrected over the non-NaN entries, NaN under 2."""
    count = np.sum(~np.isnan(x), axis=axis)
    var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=True)) ** 2, axis=axis) * count / (count - 1)
    return np.where(count > 1, np.sqrt(var), np.nan)


# Groups of 4: one unscored reply; one with a single scored reply; none scored; all scored.
UNSCORED = np.array([1.0, np.nan, 3.0, 0.5, np.nan, 2.0, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan,
                     -1.0, 2.0, 0.0, 4.0], np.float32)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_leaves_an_unscored_reply_out_of_its_group_as_trl(scale):
    """TRL 1.16's GRPOTrainer, transcribed: a NaN reward (no source scored the reply) is left out
    of nanmean / nanstd, and every NaN advantage (that reply's, or a lone scored reply's whose
    group std is undefined) becomes 0."""
    k, r = 4, UNSCORED.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's mean of an empty group
        mean = np.repeat(np.nanmean(r.reshape(-1, k), 1), k)
        std = np.repeat(trl_nanstd(r.reshape(-1, k), 1), k) if scale != "batch" else np.full_like(r, trl_nanstd(r))
    want = r - mean if scale == "none" else (r - mean) / (std + 1e-4)
    got = np.asarray(gl.group_advantages(jnp.asarray(UNSCORED), k, scale))
    np.testing.assert_allclose(got, np.nan_to_num(want, nan=0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[np.isnan(UNSCORED)], 0.0)
    np.testing.assert_allclose(gl.group_std(jnp.asarray(UNSCORED), k, scale if scale != "none" else "group"),
                               std, rtol=1e-5)  # NaN where under 2 replies are scored
    np.testing.assert_allclose(gl.frac_zero_std(gl.group_std(jnp.asarray(UNSCORED), k)), 0.0)  # NaN is not 0


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_leaves_an_unscored_reply_out_of_the_baselines_as_trl(normalize):
    """TRL 1.16's RLOOTrainer, transcribed: the leave-one-out baseline is the nansum of the others
    over (scored count - 1); normalising whitens over the non-NaN advantages; NaN advantages
    (the unscored reply's, a lone scored reply's 0 / 0) become 0."""
    k = 4
    r = UNSCORED.astype(np.float64).reshape(-1, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0 / 0 for a lone scored reply
        counts = np.sum(~np.isnan(r), 1, keepdims=True)
        want = (r - (np.nansum(r, 1, keepdims=True) - r) / (counts - 1)).reshape(-1)
        if normalize:
            want = (want - np.nanmean(want)) / (trl_nanstd(want) + 1e-4)
    got = np.asarray(gl.rloo_advantages(jnp.asarray(UNSCORED), k, normalize))
    np.testing.assert_allclose(got, np.nan_to_num(want, nan=0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[np.isnan(UNSCORED)], 0.0)


def test_frac_reward_zero_std_counts_the_groups_with_no_signal():
    rewards = jnp.asarray([1.0, 1.0, 0.0, 2.0, 3.0, 3.0], jnp.float32)
    np.testing.assert_allclose(gl.frac_zero_std(gl.group_std(rewards, 2)), 2 / 3)


def numpy_grpo(logp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, level, max_len, num_items,
               bias_correction):
    """TRL's GRPOTrainer._compute_loss (trl 1.16), transcribed in NumPy."""
    log_ratio = logp - old
    if level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0))[:, None]
    coef_1 = np.exp(log_w)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv[:, None]
    per_token = -np.minimum(coef_1 * a, coef_2 * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    if bias_correction:  # use_bias_correction_kl
        kl = kl * coef_1
    per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / max(mask.sum(), 1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_len)
    else:  # dapo
        loss = (per_token * mask).sum() / num_items
    low = (coef_1 < 1 - eps_low) & (a < 0)
    high = (coef_1 > 1 + eps_high) & (a > 0)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum()

    metrics = {"kl": global_masked_mean(kl), "clip_ratio/low_mean": global_masked_mean(low.astype(float)),
               "clip_ratio/high_mean": global_masked_mean(high.astype(float)),
               "clip_ratio/region_mean": global_masked_mean((low | high).astype(float))}
    return loss, metrics


def random_logps(b, t, rng, spread=0.4):
    old = -rng.uniform(0.2, 3.0, size=(b, t))
    return old + rng.normal(size=(b, t)) * spread, old, old + rng.normal(size=(b, t)) * spread


@pytest.mark.parametrize("loss_type", gl.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", gl.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("bias_correction", [True, False])
def test_grpo_loss_its_gradient_and_metrics_equal_trls_formula(loss_type, level, bias_correction):
    """TRL's default multiplies the k3 KL by the importance weight (`use_bias_correction_kl`);
    off, the KL term is beta * k3. The default must be TRL's."""
    rng = np.random.default_rng(1)
    b, t = 8, 7
    logp, old, ref = random_logps(b, t, rng)
    adv, mask = rng.normal(size=b), ragged_mask(b, t, rng)
    kwargs = dict(eps_low=0.2, eps_high=0.28, beta=0.07, loss_type=loss_type, level=level, max_len=t,
                  num_items=mask.sum() * 0.75, bias_correction=bias_correction)
    off = {} if bias_correction else {"use_bias_correction_kl": False}  # on: the default
    want_loss, want_metrics = numpy_grpo(logp, old, ref, adv, mask, **kwargs)
    # Junk past the mask (even inf) must not reach the loss.
    junk = np.where(mask > 0, logp, -np.inf)

    def loss(logp_):
        return gl.grpo_loss(logp_, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                            clip_eps=0.2, clip_eps_high=0.28, beta=0.07, loss_type=loss_type,
                            importance_sampling_level=level, max_completion_length=t,
                            num_items=kwargs["num_items"], **off)

    got_loss, got_metrics = loss(jnp.asarray(junk, jnp.float32))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(got_metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert 0 < want_metrics["clip_ratio/region_mean"] < 1, "some ratios must be clipped for the test to mean anything"
    # The gradient, by central differences of the NumPy loss on a few real tokens.
    grad = np.asarray(jax.grad(lambda x: loss(x)[0])(jnp.asarray(logp, jnp.float32)))
    assert np.all(grad[mask == 0] == 0)
    for i, j in list(zip(*np.nonzero(mask)))[:6]:
        hi, lo = logp.copy(), logp.copy()
        hi[i, j] += 1e-5
        lo[i, j] -= 1e-5
        numeric = (numpy_grpo(hi, old, ref, adv, mask, **kwargs)[0]
                   - numpy_grpo(lo, old, ref, adv, mask, **kwargs)[0]) / 2e-5
        np.testing.assert_allclose(grad[i, j], numeric, rtol=2e-3, atol=1e-5)


def test_dapo_defaults_to_the_batch_tokens_and_bnpo_is_that_mean():
    rng = np.random.default_rng(2)
    logp, old, ref = (jnp.asarray(x, jnp.float32) for x in random_logps(6, 5, rng))
    adv, mask = jnp.asarray(rng.normal(size=6), jnp.float32), jnp.asarray(ragged_mask(6, 5, rng))
    dapo, _ = gl.grpo_loss(logp, old, ref, adv, mask, loss_type="dapo")
    bnpo, _ = gl.grpo_loss(logp, old, ref, adv, mask, loss_type="bnpo")
    np.testing.assert_allclose(dapo, bnpo, rtol=1e-6)
    # With beta = 0 the reference is never read.
    np.testing.assert_allclose(gl.grpo_loss(logp, old, None, adv, mask)[0], dapo, rtol=1e-6)


def numpy_rloo(logp, old, adv, mask, eps_low, eps_high):
    """TRL's RLOOTrainer._compute_loss (trl 1.16), transcribed in NumPy."""
    log_ratio = (logp * mask).sum(1) - (old * mask).sum(1)
    coef_1 = np.exp(log_ratio)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    loss = -np.minimum(coef_1 * adv, coef_2 * adv).mean()
    low, high = (coef_1 < 1 - eps_low) & (adv < 0), (coef_1 > 1 + eps_high) & (adv > 0)
    return loss, {"clip_ratio/low_mean": low.mean(), "clip_ratio/high_mean": high.mean(),
                  "clip_ratio/region_mean": (low | high).mean()}


def test_rloo_loss_equals_trls_clipped_sequence_ratio_loss():
    rng = np.random.default_rng(3)
    b, t = 16, 5
    logp, old, _ = random_logps(b, t, rng, spread=0.15)
    adv, mask = rng.normal(size=b), ragged_mask(b, t, rng)
    want_loss, want_metrics = numpy_rloo(logp, old, adv, mask, 0.2, 0.3)
    got_loss, got_metrics = gl.rloo_loss(jnp.asarray(np.where(mask > 0, logp, np.nan), jnp.float32),
                                         jnp.asarray(old, jnp.float32), jnp.asarray(adv, jnp.float32),
                                         jnp.asarray(mask), clip_eps=0.2, clip_eps_high=0.3)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(got_metrics[name], value, atol=1e-7, err_msg=name)
    assert 0 < want_metrics["clip_ratio/region_mean"] < 1, "some ratios must be clipped for the test to mean anything"


def test_plain_rloo_is_reinforce_and_the_kl_in_the_loss_is_the_summed_k3():
    rng = np.random.default_rng(4)
    b, t = 6, 5
    logp, old, ref = (jnp.asarray(x, jnp.float32) for x in random_logps(b, t, rng))
    adv, mask = jnp.asarray(rng.normal(size=b), jnp.float32), jnp.asarray(ragged_mask(b, t, rng))
    m = np.asarray(mask)
    plain, _ = gl.rloo_loss(logp, old, adv, mask, clip_eps=None)
    np.testing.assert_allclose(plain, np.mean(-np.asarray(adv) * (np.asarray(logp) * m).sum(1)), rtol=1e-5)
    # REINFORCE's gradient is the clipped loss's at ratio 1 (old = current).
    g_plain = jax.grad(lambda x: gl.rloo_loss(x, x, adv, mask, clip_eps=None)[0])(logp)
    g_clip = jax.grad(lambda x: gl.rloo_loss(x, jax.lax.stop_gradient(x), adv, mask)[0])(logp)
    np.testing.assert_allclose(g_plain, g_clip, rtol=1e-5, atol=1e-7)
    with_kl, metrics = gl.rloo_loss(logp, old, adv, mask, clip_eps=None, ref_logprobs_BxT=ref, beta=0.3)
    lr = np.asarray(ref) - np.asarray(logp)
    k3 = (np.exp(lr) - lr - 1) * m
    np.testing.assert_allclose(with_kl, plain + 0.3 * k3.sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], k3.sum() / m.sum(), rtol=1e-5)


@pytest.mark.parametrize("loss_type", gl.GRPO_LOSS_TYPES)
def test_grpo_loss_shares_over_devices_sum_to_the_one_device_loss(loss_type):
    rng = np.random.default_rng(5)
    b, t = 8, 6
    logp, old, ref = (jnp.asarray(x, jnp.float32) for x in random_logps(b, t, rng))
    adv, mask = jnp.asarray(rng.normal(size=b), jnp.float32), jnp.asarray(ragged_mask(b, t, rng))
    kw = dict(beta=0.1, loss_type=loss_type, max_completion_length=t, num_items=11.0)
    one, one_metrics = gl.grpo_loss(logp, old, ref, adv, mask, **kw)
    shards = [x.reshape(4, b // 4, *x.shape[1:]) for x in (logp, old, ref, adv, mask)]
    four, four_metrics = jax.pmap(lambda *xs: gl.grpo_loss(*xs, **kw, axis_name="d"), axis_name="d")(*shards)
    np.testing.assert_allclose(np.sum(four), one, rtol=1e-5)
    for name in one_metrics:
        np.testing.assert_allclose(np.sum(four_metrics[name]), one_metrics[name], rtol=1e-5, err_msg=name)
