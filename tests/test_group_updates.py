"""The RLOO and GRPO updates: their glue (KL-shaped rewards, group advantages over the global
batch, the loss normalisations, the first step) against an independent NumPy derivation on
the model applied directly, and 4 devices (pmap or the mesh) give the one-device update."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import cli, parallel
from jaxrlhf import config as cfg
from jaxrlhf.errors import ConfigError
from jaxrlhf.parallel import AXIS, jit_step, pmap_step, replicate, shard, unreplicate
from jaxrlhf.updates import GRPOConfig, RLOOConfig, TrainState, make_grpo_update, make_rloo_update
from tests.test_glue import assert_params_close, next_token_logps, noisy, sgd_step, sgd_steps
from tests.conftest import TINY
from tests.test_steps import B, policy, rollout_batch


def setup(seed=2):
    module, params0, _ = policy()
    params, ref_params = noisy(params0, 1, 0.3), noisy(params0, 2, 0.3)
    batch = rollout_batch(seed=seed)
    batch["scores"] = np.array([3.0, -2.0, 2.5, -3.0, 1.0, 2.0, -1.0, 3.0], np.float32)
    seq, attn, resp = batch["sequences"], batch["attention_mask"], batch["response_mask"]
    p = seq.shape[1] - resp.shape[1]
    logps = next_token_logps(module, params, seq, attn)[:, p - 1:]
    ref_logps = next_token_logps(module, ref_params, seq, attn)[:, p - 1:]
    return module, params, ref_params, batch, logps, ref_logps


def response_logps(module, params, batch):
    seq, resp = batch["sequences"], batch["response_mask"]
    p = seq.shape[1] - resp.shape[1]
    logits = module.apply({"params": params}, seq, batch["attention_mask"]).logits[:, p - 1:-1]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), seq[:, p:, None], -1)[..., 0]


@pytest.mark.fast
def test_rloo_update_equals_a_numpy_derivation_of_shaped_rewards_advantages_and_the_first_step():
    """Rewards are score - beta * sum over the response of (logp - ref_logp); each row's
    advantage is its reward minus the mean of the other k - 1 of its group (k = 4: two
    groups); the loss is TRL's clipped sequence-ratio loss, whose gradient at ratio 1 is
    -mean(A * grad of the summed logprobs). A reference half a nat a token away makes the
    KL's sign count; groups of 4 make the grouping of rows count."""
    module, params, ref_params, batch, logps, ref_logps = setup()
    resp = batch["response_mask"]
    beta, k, lr = 0.5, 4, 1.0
    kl = (logps - ref_logps) * resp
    rewards = batch["scores"] - beta * kl.sum(1)
    grouped = rewards.reshape(-1, k)
    advantages = (grouped - (grouped.sum(1, keepdims=True) - grouped) / (k - 1)).reshape(-1)

    def surrogate(params):
        lp = response_logps(module, params, batch)
        return -jnp.mean(advantages * jnp.exp(jnp.sum((lp - logps) * resp, 1)))

    want = sgd_step(params, surrogate, lr)
    state = TrainState.create(module, params, optax.sgd(lr), ref_params=ref_params)
    state, metrics = jit_step(make_rloo_update(RLOOConfig(num_generations=k, beta=beta)))(
        state, batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["kl"], kl.sum() / resp.sum(), rtol=1e-4)  # TRL's: mean k1 per token
    np.testing.assert_allclose(metrics["reward"], batch["scores"].mean(), rtol=1e-6)  # the score, unshaped
    np.testing.assert_allclose(metrics["reward_std"], batch["scores"].std(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(metrics["completions/mean_length"], resp.sum(1).mean(), rtol=1e-6)
    assert_params_close(state.params, want, atol=1e-4)  # float32 steps of size ~1


@pytest.mark.fast
@pytest.mark.parametrize("scale,level,bias_correction,epochs", [("group", "token", True, 2),
                                                                ("batch", "sequence", True, 1),
                                                                ("none", "token", False, 2)])
def test_grpo_update_equals_a_numpy_derivation_of_group_advantages_the_k3_kl_and_the_rollouts_steps(
        scale, level, bias_correction, epochs):
    """Advantages: the score minus its group's mean, over the group's (or the batch's) std +
    1e-4, or not scaled; the loss TRL's dapo over the rollout's tokens: -min(A w, A clip(w)),
    w the ratio to the rollout's logprobs (per token or per sequence), + beta * k3(pi, ref),
    times w by default (TRL's `use_bias_correction_kl`). The first step is at w = 1, where w's
    gradient still moves the KL term; a second epoch over the rollout steps where w is not 1."""
    module, params, ref_params, batch, logps, ref_logps = setup()
    seq, attn, resp = batch["sequences"], batch["attention_mask"], batch["response_mask"]
    beta, k, lr = 0.3, 4, 0.2
    grouped = batch["scores"].astype(np.float64).reshape(-1, k)
    centred = (grouped - grouped.mean(1, keepdims=True)).reshape(-1)
    std = {"group": np.repeat(grouped.std(1, ddof=1), k), "batch": np.full(B, batch["scores"].std(ddof=1)),
           "none": np.full(B, 1.0 - 1e-4)}[scale]
    advantages = (centred / (std + 1e-4))[:, None]

    def kl_and_ratio(lp):
        if level == "token":
            ratio = jnp.exp(lp - logps)
        else:
            ratio = jnp.exp(jnp.sum((lp - logps) * resp, 1, keepdims=True) / resp.sum(1, keepdims=True))
        k3 = jnp.exp(ref_logps - lp) - (ref_logps - lp) - 1
        return (k3 * ratio if bias_correction else k3), ratio

    def surrogate(params):
        kl, ratio = kl_and_ratio(response_logps(module, params, batch))
        policy = -jnp.minimum(advantages * ratio, advantages * jnp.clip(ratio, 0.8, 1.2))
        return jnp.sum((policy + beta * kl) * resp) / resp.sum()

    steps = sgd_steps(params, surrogate, lr, epochs)
    kls = [np.sum(kl_and_ratio(next_token_logps(module, p, seq, attn)[:, -resp.shape[1]:])[0] * resp) / resp.sum()
           for p in [params, *steps[:-1]]]  # the KL term at each step's params, before its update
    state = TrainState.create(module, params, optax.sgd(lr), ref_params=ref_params)
    config = GRPOConfig(num_generations=k, beta=beta, scale_rewards=scale, importance_sampling_level=level,
                        epochs=epochs, **({} if bias_correction else {"use_bias_correction_kl": False}))  # on: default
    state, metrics = jit_step(make_grpo_update(config))(state, batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["kl"], np.mean(kls), rtol=1e-4)  # TRL's: the KL term's mean per token
    np.testing.assert_allclose(metrics["reward"], batch["scores"].mean(), rtol=1e-6)
    assert_params_close(state.params, steps[-1], atol=1e-4)


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_an_unscored_reply_moves_nothing_and_leaves_its_group_as_trl(kind):
    """A NaN score (no reward source scored the reply; a missing-EOS penalty keeps it NaN):
    the update is the NumPy derivation's with TRL's advantages, the reply left out of its
    group's mean and std (GRPO) or leave-one-out baselines (RLOO), its own advantage 0, its
    tokens still counted; the loss is finite, so the NaN guard skips nothing; `reward` and
    `reward_std` are over the scored replies."""
    module, params, ref_params, batch, logps, ref_logps = setup()
    resp = batch["response_mask"]
    batch["scores"][1] = np.nan
    k, lr = 4, 0.5
    if kind == "grpo":
        grouped = batch["scores"].astype(np.float64).reshape(-1, k)
        mean = np.nanmean(grouped, 1, keepdims=True)
        std = np.sqrt(np.nansum((grouped - mean) ** 2, 1, keepdims=True) / (np.sum(~np.isnan(grouped), 1,
                                                                                   keepdims=True) - 1))
        advantages = np.nan_to_num(((grouped - mean) / (std + 1e-4)).reshape(-1), nan=0.0)
        config, make = GRPOConfig(num_generations=k), make_grpo_update
    else:
        beta = 0.5
        grouped = (batch["scores"] - beta * ((logps - ref_logps) * resp).sum(1)).reshape(-1, k)
        counts = np.sum(~np.isnan(grouped), 1, keepdims=True)
        advantages = np.nan_to_num((grouped - (np.nansum(grouped, 1, keepdims=True) - grouped) / (counts - 1))
                                   .reshape(-1), nan=0.0)
        config, make = RLOOConfig(num_generations=k, beta=beta), make_rloo_update
    assert advantages[1] == 0.0 and np.count_nonzero(advantages) == B - 1

    def surrogate(params):  # at ratio 1, without a KL term: the advantage-weighted logprobs
        lp = response_logps(module, params, batch)
        if kind == "grpo":  # dapo: over every token of the rollout, the unscored reply's too
            return -jnp.sum(advantages[:, None] * jnp.exp(lp - logps) * resp) / resp.sum()
        return -jnp.mean(advantages * jnp.exp(jnp.sum((lp - logps) * resp, 1)))

    want = sgd_step(params, surrogate, lr)
    state = TrainState.create(module, params, optax.sgd(lr), ref_params=ref_params, skip_nonfinite=True)
    state, metrics = jit_step(make(config))(state, batch, jax.random.key(0))
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0
    scored = np.delete(batch["scores"], 1)
    np.testing.assert_allclose(metrics["reward"], scored.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_std"], scored.std(ddof=1), rtol=1e-5)
    assert_params_close(state.params, want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_losses_over_two_minibatches_keep_their_whole_rollout_normaliser(loss_type):
    """With the params held still (lr 0), the mean loss over 2 minibatches of 4 is the whole
    rollout's: dapo divides each minibatch's token sum by half the rollout's tokens (TRL's
    normaliser for 2 optimizer steps per generation), dr_grpo by rows x max_new_tokens, grpo
    averages per-sequence means; at ratio 1 the per-token loss is -A + beta k3."""
    module, params, ref_params, batch, logps, ref_logps = setup()
    resp, n = batch["response_mask"], batch["response_mask"].shape[1]
    beta, k = 0.3, 2
    grouped = batch["scores"].astype(np.float64).reshape(-1, k)
    advantages = ((grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4))
    lr_ = ref_logps - logps
    per_token = (-advantages.reshape(-1)[:, None] + beta * (np.exp(lr_) - lr_ - 1)) * resp
    want = {"dapo": per_token.sum() / resp.sum(), "dr_grpo": per_token.sum() / (B * n),
            "grpo": np.mean(per_token.sum(1) / resp.sum(1))}[loss_type]
    state = TrainState.create(module, params, optax.sgd(0.0), ref_params=ref_params)
    config = GRPOConfig(num_generations=k, beta=beta, loss_type=loss_type, num_minibatches=2)
    _, metrics = jit_step(make_grpo_update(config))(state, batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)


@pytest.mark.fast
def test_group_configs_refuse_settings_that_would_silently_change_the_objective():
    """Checked as the config is built, in Python as from YAML: a choice that is none of a key's
    (an RLOO `kl_penalty` of "rewards" would drop the KL), and RLOO's REINFORCE (no ratio, so
    no importance weight) on the stale samples of a second update per rollout."""
    with pytest.raises(ConfigError, match=r"^kl_penalty='rewards' is not allowed; choose one of \['reward', 'loss'\]$"):
        RLOOConfig(kl_penalty="rewards")
    with pytest.raises(ConfigError, match=r"^scale_rewards='std' is not allowed; choose one of \['group', 'batch',"):
        GRPOConfig(scale_rewards="std")
    stale = r"clip_eps=null \(REINFORCE, no importance weight\) needs one update per rollout, not epochs x "
    for updates, shown in (({"epochs": 2}, "2 x 1"), ({"num_minibatches": 3}, "1 x 3")):
        with pytest.raises(ConfigError, match=rf"^{stale}num_minibatches = {shown}: .* set clip_eps or epochs=1"):
            RLOOConfig(clip_eps=None, **updates)
    with pytest.raises(ConfigError, match=rf"rloo.yaml.rloo: {stale}num_minibatches = 2 x 2"):
        cfg.load(cli.stage("rloo")[1], TINY / "rloo.yaml", ["rloo.clip_eps=null"])
    RLOOConfig(clip_eps=None)  # one update per rollout: on-policy REINFORCE
    RLOOConfig(epochs=2, num_minibatches=2)  # the clipped ratio weighs the stale samples


@pytest.mark.fast
def test_gspo_with_a_loss_that_sums_tokens_warns_as_trl_does():
    """One ratio per sequence with a token-sum loss weights each sequence by its length, not
    GSPO's objective: TRL warns for dapo (the default), dr_grpo and bnpo; so do we."""
    for loss_type in ("dapo", "dr_grpo", "bnpo"):
        with pytest.warns(UserWarning, match=rf"importance_sampling_level='sequence' with loss_type='{loss_type}' "
                                             r"sums per-token .* by its completion length .* set loss_type='grpo'"):
            GRPOConfig(importance_sampling_level="sequence", loss_type=loss_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRPOConfig(importance_sampling_level="sequence", loss_type="grpo")
        GRPOConfig(importance_sampling_level="token", loss_type="dapo")


def build(kind, tx, axis_name=None, **overrides):
    module, params, _ = policy()
    state = TrainState.create(module, params, tx, ref_params=noisy(params, 3, 0.05))
    batch = rollout_batch(seed=4)
    if kind == "rloo":
        config = RLOOConfig(**{"num_generations": 4, "epochs": 2, "num_minibatches": 2, **overrides})
        return make_rloo_update(config, axis_name), state, batch
    config = GRPOConfig(**{"num_generations": 4, "epochs": 2, "num_minibatches": 2, "beta": 0.1, **overrides})
    return make_grpo_update(config, axis_name), state, batch


CASES = [("rloo", {}),
         # REINFORCE has no ratio for stale samples: one update per rollout.
         ("rloo", {"kl_penalty": "loss", "normalize_advantages": True, "clip_eps": None, "epochs": 1,
                   "num_minibatches": 1}),
         ("grpo", {}),
         ("grpo", {"loss_type": "bnpo", "scale_rewards": "batch", "importance_sampling_level": "sequence"})]


@pytest.mark.slow
@pytest.mark.parametrize("kind,overrides", CASES)
def test_pmap_and_the_mesh_give_the_one_device_update(kind, overrides):
    """Groups of 4 rows over 4 devices of 2 rows: each group spans two devices, so the
    advantages must come from the global batch; 2 epochs x 2 minibatches from one global
    permutation; in 2 microbatches the update is the whole batch's."""
    tx = optax.sgd(0.05)  # plain SGD, small enough that two epochs of REINFORCE keep the k3 KL finite
    step, state, batch = build(kind, tx, **overrides)
    one_state, one_metrics = jit_step(step)(state, batch, jax.random.key(0))
    results = {}
    pstep, pstate, _ = build(kind, tx, AXIS, **overrides)
    four_state, four_metrics = pmap_step(pstep)(replicate(pstate), shard(batch, 4), jax.random.key(0))
    results["pmap"] = unreplicate(four_state), unreplicate(four_metrics)
    mesh = parallel.make_mesh(4, 1)
    mesh_state = parallel.put_state(build(kind, tx, **overrides)[1], mesh)
    results["mesh"] = parallel.data_parallel(step, mesh, mesh_state)(mesh_state, batch, jax.random.key(0))
    accumulating = build(kind, tx, **overrides)[1].replace(grad_accum_steps=2)
    results["2 microbatches"] = jit_step(step)(accumulating, batch, jax.random.key(0))
    moved = optax.global_norm(jax.tree.map(jnp.subtract, one_state.params, build(kind, tx)[1].params))
    assert moved > 1e-4, "the step must change the params for the comparison to mean anything"
    for path, (got_state, got_metrics) in results.items():
        for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(got_state.params), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5, err_msg=path)
        for name in ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length"):
            np.testing.assert_allclose(np.asarray(got_metrics[name]), np.asarray(one_metrics[name]), rtol=1e-4,
                                       atol=1e-5, err_msg=f"{path}: {name}")
