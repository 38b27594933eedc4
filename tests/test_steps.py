"""Update functions: they learn on a tiny model, and 4 devices give the 1-device update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.models import from_config, lora
from jaxrlhf import parallel
from jaxrlhf.parallel import AXIS, jit_step, pmap_step, replicate, shard, unreplicate
from jaxrlhf.updates.ppo import PPOConfig, make_ppo_update
from jaxrlhf.sampling import SamplingConfig, generate
from jaxrlhf.updates import TrainState, make_dpo_step, make_optimizer, make_reward_step, make_sft_step
from tests.conftest import tiered

VOCAB, B, T = 32, 8, 12
GPT2 = dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
            bos_token_id=1, eos_token_id=2)
BERT = dict(model_type="bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32, num_labels=1)


def copy(tree):
    return jax.tree.map(jnp.array, tree)


def ragged(seed, rows=B, t=T, min_len=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, t + 1, size=rows)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return rng.integers(3, VOCAB, size=(rows, t)).astype(np.int32) * mask, mask


def sft_batch(seed=0):
    ids, mask = ragged(seed)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask * (np.arange(T)[None] >= 4)}


def regression_batch(seed=0):
    ids, mask = ragged(seed)
    return {"input_ids": ids, "attention_mask": mask,
            "target": np.random.default_rng(seed).normal(size=B).astype(np.float32)}


def pair_batch(seed=0, prefix="chosen", other="rejected"):
    (ci, cm), (ri, rm) = ragged(seed), ragged(seed + 100)
    ri[:, :4], rm[:, :4] = ci[:, :4], cm[:, :4]  # a shared prompt of 4 tokens
    resp = (np.arange(T)[None] >= 4).astype(np.int32)
    return {f"{prefix}_ids": ci, f"{prefix}_mask": cm, f"{prefix}_loss_mask": cm * resp,
            f"{other}_ids": ri, f"{other}_mask": rm, f"{other}_loss_mask": rm * resp}


def rollout_batch(seed=0):
    """A fixed fake rollout: left-padded prompts of 4, responses of up to 8 with ragged masks."""
    rng = np.random.default_rng(seed)
    p_len = rng.integers(1, 5, size=B)
    r_len = rng.integers(1, 9, size=B)
    prompt_mask = (np.arange(4)[None] >= 4 - p_len[:, None]).astype(np.int32)
    resp = (np.arange(8)[None] < r_len[:, None]).astype(np.int32)
    seq = rng.integers(3, VOCAB, size=(B, 12)).astype(np.int32) * np.concatenate([prompt_mask, resp], 1)
    return {"sequences": seq, "attention_mask": np.concatenate([prompt_mask, resp], 1), "response_mask": resp,
            "scores": rng.normal(size=B).astype(np.float32)}


def policy(value_head=False, seed=0):
    return from_config(GPT2, jax.random.key(seed), value_head=value_head)


def reward_model(seed=0):
    return from_config(BERT, jax.random.key(seed), head="classification")


def build(kind, tx, axis_name=None, ppo_minibatches=1):
    """-> (step, state, batch) for one update function on fresh tiny models."""
    if kind == "sft":
        module, params, _ = policy()
        return make_sft_step(axis_name), TrainState.create(module, params, tx), sft_batch()
    if kind == "lora_sft":  # adapters on every linear layer, B random (a trained adapter's) so A trains too
        module, params, _ = policy()
        adapters = lora.init(params, lora.settings(rank=2, targets=["all-linear"]), "gpt2", jax.random.key(1))
        adapters = jax.tree.map(lambda x: x + 0.1, adapters)
        state = TrainState.create(module, lora.trainable(params, adapters), tx, base_params=params, lora_scale=2.0)
        return make_sft_step(axis_name), state, sft_batch()
    if kind in ("regression", "pairwise"):
        module, params, _ = reward_model()
        batch = regression_batch() if kind == "regression" else {
            k.replace("_loss_mask", "_drop"): v for k, v in pair_batch().items() if "loss_mask" not in k}
        return make_reward_step(kind, axis_name), TrainState.create(module, params, tx), batch
    if kind in ("sigmoid", "hinge", "ipo", "slic"):
        module, params, _ = policy()
        state = TrainState.create(module, params, tx, ref_params=copy(params))
        return make_dpo_step(kind, beta=0.5, axis_name=axis_name), state, pair_batch()
    if kind == "ppo":
        module, params, _ = policy(value_head=True)
        state = TrainState.create(module, params, tx, ref_params=copy(params), kl_coef=jnp.float32(0.1))
        config = PPOConfig(epochs=4, num_minibatches=ppo_minibatches, kl_target=1.0)
        return make_ppo_update(config, axis_name=axis_name), state, rollout_batch()
    raise ValueError(kind)


KINDS = ["sft", "regression", "pairwise", "sigmoid", "hinge", "ipo", "slic", "ppo"]


@pytest.mark.parametrize("kind", tiered(KINDS, fast={"sft", "sigmoid", "ppo"}))
def test_four_devices_give_the_one_device_update(kind):
    assert jax.local_device_count() == 4, "conftest sets 4 fake CPU devices"
    tx = optax.sgd(0.5)  # plain SGD: the update is the gradient itself, nothing rescales it
    step, state, batch = build(kind, tx)
    one_state, one_metrics = jit_step(step)(state, batch, jax.random.key(0))
    pstep, pstate, _ = build(kind, tx, axis_name=AXIS)
    four_state, four_metrics = pmap_step(pstep)(replicate(pstate), shard(batch, 4), jax.random.key(0))
    four_state, four_metrics = unreplicate(four_state), unreplicate(four_metrics)
    moved = optax.global_norm(jax.tree.map(jnp.subtract, one_state.params, build(kind, tx)[1].params))
    assert moved > 1e-4, "the step must change the params for the comparison to mean anything"
    for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(four_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    for name in one_metrics:
        np.testing.assert_allclose(four_metrics[name], one_metrics[name], rtol=1e-4, atol=1e-5, err_msg=name)
    if kind == "ppo":
        np.testing.assert_allclose(four_state.kl_coef, one_state.kl_coef, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind,minibatches", [("sft", 1), ("pairwise", 1), ("sigmoid", 1), ("ppo", 2), ("lora_sft", 1)])
def test_pmap_step_and_the_mesh_path_give_the_one_device_update(kind, minibatches):
    """`pmap_step` (kept for pmap-style users) and the stages' mesh path (`data_parallel`:
    the one-device step jitted over global arrays, on 4 replicas or 2 x 2 with FSDP) give the
    one-device update. PPO in 2 minibatches: both paths take them from one global permutation."""
    tx = optax.sgd(0.5)

    def make(axis_name):
        return build(kind, tx, axis_name, minibatches)

    step, state, batch = make(None)
    results = {"one device": jit_step(step)(state, batch, jax.random.key(0))}
    pstep, pstate, _ = make(AXIS)
    four_state, four_metrics = pmap_step(pstep)(replicate(pstate), shard(batch, 4), jax.random.key(0))
    results["pmap_step"] = unreplicate(four_state), unreplicate(four_metrics)
    for data, fsdp in ((4, 1), (2, 2)):
        mesh = parallel.make_mesh(data, fsdp)
        mesh_state = parallel.put_state(make(None)[1], mesh)
        if fsdp > 1:
            assert any(len(x.sharding.device_set) == 4 and x.addressable_shards[0].data.shape != x.shape
                       for x in jax.tree.leaves((mesh_state.params, mesh_state.base_params))), \
                "FSDP must split some params"
        update = parallel.data_parallel(make(None)[0], mesh, mesh_state)
        results[f"mesh {data}x{fsdp}"] = update(mesh_state, batch, jax.random.key(0))
    one_state, one_metrics = results.pop("one device")
    moved = optax.global_norm(jax.tree.map(jnp.subtract, one_state.params, make(None)[1].params))
    assert moved > 1e-4, "the step must change the params for the comparison to mean anything"
    for path, (state, metrics) in results.items():
        for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5, err_msg=path)
        for name in one_metrics:
            np.testing.assert_allclose(np.asarray(metrics[name]), np.asarray(one_metrics[name]), rtol=1e-4,
                                       atol=1e-5, err_msg=f"{path}: {name}")
        if kind == "ppo":
            np.testing.assert_allclose(np.asarray(state.kl_coef), np.asarray(one_state.kl_coef), rtol=1e-6,
                                       err_msg=path)


def run(kind, steps, lr=3e-3):
    tx, _ = make_optimizer(lr, max_grad_norm=1.0)
    step, state, batch = build(kind, tx)
    step = jit_step(step)
    history = []
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.key(i))
        history.append(jax.tree.map(float, metrics))
    return history


@pytest.mark.parametrize("kind", tiered(["sft", "regression", "pairwise"], fast={"sft"}))
def test_supervised_losses_go_down(kind):
    history = run(kind, 40)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], (history[0]["loss"], history[-1]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "slic"])
def test_preference_steps_come_to_prefer_the_chosen(kind):
    history = run(kind, 30)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 0.5


@pytest.mark.slow
def test_ppo_raises_a_fixed_reward():
    """Reward: the share of response tokens equal to token 7, scored inside the update."""
    module, params, _ = policy(value_head=True, seed=3)
    tx, _ = make_optimizer(3e-3)
    state = TrainState.create(module, params, tx, ref_params=copy(params), kl_coef=jnp.float32(0.01))

    def reward_fn(_, seq, attn, resp):
        hits = (seq[:, -resp.shape[1]:] == 7) * resp
        return jnp.sum(hits, -1) / jnp.maximum(jnp.sum(resp, -1), 1)

    update = jit_step(make_ppo_update(PPOConfig(epochs=4), reward_fn=reward_fn))
    settings = SamplingConfig(max_new_tokens=8, pad_token_id=0, eos_token_id=2)
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, size=(32, 4)), jnp.int32)
    scores = []
    for i in range(25):
        out = generate(module, state.params, prompts, jnp.ones_like(prompts), jax.random.key(100 + i), settings)
        batch = {"sequences": out.sequences, "attention_mask": out.attention_mask, "response_mask": out.response_mask}
        state, metrics = update(state, batch, jax.random.key(i))
        scores.append(float(metrics["objective/scores"]))
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.2, scores
    assert float(metrics["objective/kl"]) > 0


def accumulating(state, k):
    return state.replace(grad_accum_steps=k)


@pytest.mark.slow
def test_k_microbatches_give_the_token_weighted_whole_batch_update():
    """Halves with different numbers of loss tokens: the update is the whole batch's mean
    gradient (token-weighted), not the mean of the two halves' means."""
    whole = sft_batch(seed=5)
    halves = [{k: v[:4] for k, v in whole.items()}, {k: v[4:] for k, v in whole.items()}]
    tokens = [float(np.sum(h["loss_mask"][:, 1:] * h["attention_mask"][:, 1:])) for h in halves]
    assert tokens[0] != tokens[1], tokens
    module, params, _ = policy()
    tx = optax.sgd(0.5)  # the update is the gradient itself
    step = jit_step(make_sft_step())
    two, _ = step(accumulating(TrainState.create(module, copy(params), tx), 2), whole, jax.random.key(0))
    one, _ = step(TrainState.create(module, copy(params), tx), whole, jax.random.key(0))
    # By hand: each half's summed token NLL, over the whole batch's token count.
    sum_grad = jax.jit(jax.grad(lambda p, h, n: _sft_loss(module, p, h) * n))
    grads = jax.tree.map(lambda a, b: (a + b) / sum(tokens), *[sum_grad(params, h, n) for h, n in zip(halves, tokens)])
    by_hand = optax.apply_updates(params, jax.tree.map(lambda g: -0.5 * g, grads))
    for a, b, c in zip(*map(jax.tree.leaves, (two.params, one.params, by_hand))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
    equal_weights = jax.tree.map(lambda a, b: (a / tokens[0] + b / tokens[1]) / 2,
                                 *[sum_grad(params, h, n) for h, n in zip(halves, tokens)])
    assert optax.global_norm(jax.tree.map(jnp.subtract, grads, equal_weights)) > 1e-3  # the test can tell


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression", "sigmoid", "slic", "ppo"])
def test_every_update_accumulates_to_its_whole_batch_update(kind):
    tx = optax.sgd(0.5)
    step, state, batch = build(kind, tx)
    one, one_metrics = jit_step(step)(state, batch, jax.random.key(0))
    two, two_metrics = jit_step(step)(accumulating(build(kind, tx)[1], 2), batch, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    # Accuracy is a step function of margins that start at 0 (policy = reference): rounding flips it.
    for name in set(one_metrics) - {"rewards/accuracies"}:
        np.testing.assert_allclose(two_metrics[name], one_metrics[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_microbatches_on_four_devices_give_the_one_device_update():
    tx = optax.sgd(0.5)
    step, state, batch = build("sft", tx)
    one, _ = jit_step(step)(state, batch, jax.random.key(0))
    pstep, pstate, _ = build("sft", tx, axis_name=AXIS)
    four, _ = pmap_step(pstep)(replicate(accumulating(pstate, 2)), shard(batch, 4), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(unreplicate(four).params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def update_counts(state):
    return {int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")}


@pytest.mark.slow
def test_a_ppo_schedule_counts_every_update_and_ends_with_the_run():
    """3 iterations x 4 epochs x 2 minibatches = 24 updates: warm-up over 4 updates, linear
    decay to 0 at update 24; the logged lr is the lr of the update just taken."""
    from jaxrlhf.config import TrainConfig
    from jaxrlhf.stages.common import optimizer

    config = PPOConfig(epochs=4, num_minibatches=2)
    tx, lr_at_step = optimizer(TrainConfig(steps=3, batch_size=B, learning_rate=1e-2, schedule="linear",
                                           warmup_steps=4), config.updates_per_step)
    module, params, _ = policy(value_head=True)
    state = TrainState.create(module, params, tx, ref_params=copy(params), kl_coef=jnp.float32(0.1))
    update = jit_step(make_ppo_update(config))
    for s in (1, 2, 3):
        before = copy(state.params)  # the step donates the state
        state, _ = update(state, rollout_batch(seed=s), jax.random.key(s))
        assert update_counts(state) == {8 * s}
        np.testing.assert_allclose(lr_at_step(s), 1e-2 * min((8 * s - 1) / 4, (24 - 8 * s + 1) / 20), rtol=1e-6)
        moved = optax.global_norm(jax.tree.map(jnp.subtract, state.params, before))
        assert moved > 1e-4, f"iteration {s} took updates at lr 0"
    np.testing.assert_allclose(lr_at_step(3), 1e-2 / 20, rtol=1e-6)  # the last update's lr, then 0


@pytest.mark.fast
def test_warmup_and_decay_count_updates_under_accumulation():
    """4 steps of 2 microbatches are 4 updates: warm-up over 2 then decay to 0 after the 4th."""
    from jaxrlhf.config import TrainConfig
    from jaxrlhf.stages.common import optimizer

    train = TrainConfig(steps=4, batch_size=B, learning_rate=1e-2, schedule="linear", warmup_steps=2,
                        grad_accum_steps=2)
    tx, lr_at_step = optimizer(train)
    module, params, _ = policy()
    state = TrainState.create(module, params, tx, grad_accum_steps=train.grad_accum_steps)
    step = jit_step(make_sft_step())
    moved = []
    for s in (1, 2, 3, 4):
        before = copy(state.params)  # the step donates the state
        state, _ = step(state, sft_batch(seed=s), jax.random.key(s))
        assert update_counts(state) == {s}
        moved.append(float(optax.global_norm(jax.tree.map(jnp.subtract, state.params, before))))
    np.testing.assert_allclose([lr_at_step(s) for s in (1, 2, 3, 4)], [0, 5e-3, 1e-2, 5e-3], atol=1e-9)
    assert moved[0] == 0 and min(moved[1:]) > 1e-4, moved  # the first update is at lr 0 (warm-up)


def _sft_loss(module, params, batch):
    from jaxrlhf import losses

    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
    mask = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
    return losses.sft_loss(logits[:, :-1], batch["input_ids"][:, 1:], mask)


@pytest.mark.fast
def test_schedules_warm_up_then_decay():
    _, lr = make_optimizer(1e-3, schedule="cosine", warmup_steps=10, total_steps=110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)
    _, lr = make_optimizer(1e-3, schedule="linear", total_steps=100)
    np.testing.assert_allclose([lr(0), lr(50), lr(100)], [1e-3, 5e-4, 0], atol=1e-9)


@pytest.mark.slow
def test_dpo_with_precomputed_reference_logps_equals_the_in_step_reference():
    from jaxrlhf import losses

    tx = optax.sgd(0.5)
    step, state, batch = build("sigmoid", tx)
    in_step, m1 = jit_step(step)(state, batch, jax.random.key(0))
    _, state, _ = build("sigmoid", tx)
    module = policy()[0]
    for side in ("chosen", "rejected"):
        ids, mask, loss_mask = (batch[f"{side}_{k}"] for k in ("ids", "mask", "loss_mask"))
        logits = module.apply({"params": state.ref_params}, ids, mask).logits
        batch = {**batch, f"ref_{side}_logps": losses.sequence_logprobs(
            logits[:, :-1], ids[:, 1:], loss_mask[:, 1:] * mask[:, 1:])}
    pre, m2 = jit_step(step)(state.replace(ref_params=None), batch, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(in_step.params), jax.tree.leaves(pre.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)


@pytest.mark.fast
def test_batches_must_split_into_microbatches_on_every_device():
    """Checked when a stage builds its mesh (`stages.common.train_mesh`): every update's rows
    (the batch, or each PPO minibatch) split over the devices, and each device's share over
    train.grad_accum_steps microbatches."""
    from jaxrlhf.config import MeshConfig, TrainConfig
    from jaxrlhf.errors import ConfigError
    from jaxrlhf.stages.common import train_mesh

    two = MeshConfig(data=2)
    with pytest.raises(ConfigError, match=r"train.batch_size = 12 row\(s\) do not split over 2 device\(s\) in 4 "
                                          r"microbatches each \(mesh data=2 x fsdp=1\); it must be a multiple of 8"):
        train_mesh(TrainConfig(batch_size=12, mesh=two, grad_accum_steps=4))
    with pytest.raises(ConfigError, match=r"train.batch_size / ppo.num_minibatches \(16 / 4\) = 4 row\(s\) do not split "
                                          r"over 2 device\(s\) in 4 microbatches each .*multiple of 8"):
        train_mesh(TrainConfig(batch_size=16, mesh=two, grad_accum_steps=4), minibatches=4)
    # fsdp replicas take rows too: 2 x 2 devices, 2 microbatches each.
    with pytest.raises(ConfigError, match=r"= 4 row\(s\) do not split over 4 device\(s\) in 2 microbatches each "
                                          r"\(mesh data=2 x fsdp=2\)"):
        train_mesh(TrainConfig(batch_size=4, mesh=MeshConfig(data=2, fsdp=2), grad_accum_steps=2))
    assert train_mesh(TrainConfig(batch_size=16, mesh=two, grad_accum_steps=4), minibatches=2).shape == {
        "data": 2, "fsdp": 1}
    assert train_mesh(TrainConfig(batch_size=8, mesh=MeshConfig(fsdp=2), grad_accum_steps=2)).shape == {
        "data": 2, "fsdp": 2}


@pytest.mark.slow
def test_pmap_users_may_name_their_axis_data():
    """The stages' mesh axis is called "data" too; under pmap no mesh of ours is in force, so an
    update pmapped over an axis of that name runs as any other (the one-device update)."""
    tx = optax.sgd(0.5)
    step, state, batch = build("sft", tx, axis_name="data")
    got, _ = pmap_step(step, axis_name="data")(replicate(state), shard(batch, 4), jax.random.key(0))
    one_step, one_state, _ = build("sft", tx)
    want, _ = jit_step(one_step)(one_state, batch, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(unreplicate(got).params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
