"""LoRA: a fresh adapter is the base model exactly (forward and sampler); only the adapters and
heads train and sit in the optimizer; the merged export is base + scale B A with the adapter's
logits; the reference is the base with the adapter off, as an explicit copy would be; the
`lora` section's errors; the memory plan counts base, adapters and their optimizer state."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import config as cfg
from jaxrlhf import memory
from jaxrlhf.errors import ConfigError
from jaxrlhf.models import from_config, frozen_params, lora
from jaxrlhf.sampling import SamplingConfig, generate
from jaxrlhf.stages import common, grpo, sft
from jaxrlhf.updates import TrainState, make_dpo_step, make_grpo_update, make_reward_step, make_sft_step
from jaxrlhf.updates.grpo import GRPOConfig
from tests.conftest import tiered
from tests.test_memory_plan import TINY_BERT, TINY_GPT2, checkpoint, grpo_config
from tests.test_steps import GPT2, pair_batch, regression_batch, rollout_batch, sft_batch


LLAMA = dict(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1,
             eos_token_id=2)
BERT = dict(model_type="bert", vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=48, max_position_embeddings=32, num_labels=1)
MODELS = {"gpt2": ({**GPT2, "n_layer": 1}, "lm"), "llama": (LLAMA, "lm"), "bert": (BERT, "classification")}
ALL_LINEAR = lora.settings(rank=4, alpha=8.0, targets=["all-linear"])


def model(family, **kwargs):
    hf, head = MODELS[family]
    return from_config(hf, jax.random.key(0), head=head, **kwargs)[:2]


def random_b(adapters, seed=1):
    """The adapters with random B (a trained adapter's), so that it changes the model."""
    leaves, tree = jax.tree.flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) if path[-1].key == "lora_b" else x
                                     for k, (path, x) in zip(keys, leaves)])


def ids_and_mask(rows=3, t=7):
    ids = np.random.default_rng(0).integers(3, 32, size=(rows, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row
    return ids, mask


def outputs(module, params, family):
    ids, mask = ids_and_mask()
    out = jax.jit(module.apply)({"params": params}, ids, mask)
    return np.asarray(out if family == "bert" else out.logits)


@pytest.mark.parametrize("family", tiered(["gpt2", "llama", "bert"], fast={"gpt2"}))
def test_a_fresh_adapter_is_the_base_model_exactly(family):
    module, params = model(family)
    adapters = lora.init(params, ALL_LINEAR, family, jax.random.key(1))
    names = {path[-1] for path in lora.paths(adapters)}
    assert names == {"gpt2": {"c_attn", "c_proj", "c_fc"}, "bert": {"query", "key", "value", "attn_out", "ffn_in",
                                                                     "ffn_out", "pooler"},
                     "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}[family]
    combined = lora.combine(params, lora.trainable(params, adapters), lora.scale(ALL_LINEAR))
    np.testing.assert_array_equal(outputs(module, combined, family), outputs(module, params, family))
    trained = lora.combine(params, lora.trainable(params, random_b(adapters)), 2.0)
    assert np.abs(outputs(module, trained, family) - outputs(module, params, family)).max() > 1e-3  # it is read


@pytest.mark.fast
def test_the_sampler_runs_the_adapter_in_its_cached_decode():
    module, params = model("gpt2")
    adapters = lora.init(params, ALL_LINEAR, "gpt2", jax.random.key(1))
    settings = SamplingConfig(max_new_tokens=6, pad_token_id=0, greedy=True)
    ids, mask = ids_and_mask()

    def greedy(p):
        return np.asarray(generate(module, p, ids, mask, jax.random.key(0), settings).sequences)

    fresh = lora.combine(params, lora.trainable(params, adapters), 2.0)
    np.testing.assert_array_equal(greedy(fresh), greedy(params))
    trained = lora.combine(params, lora.trainable(params, random_b(adapters, seed=3)), 2.0)
    merged = lora.merged(params, lora.trainable(params, random_b(adapters, seed=3)), 2.0)
    np.testing.assert_array_equal(greedy(trained), greedy(merged))  # the cache path reads the adapter too
    assert (greedy(trained) != greedy(params)).any()


@pytest.mark.fast
def test_merge_is_base_plus_scaled_ab_with_the_adapter_models_logits():
    module, params = model("llama")
    adapters = random_b(lora.init(params, lora.settings(rank=2, targets=["q_proj", "down_proj"]), "llama",
                                  jax.random.key(1)))
    merged = lora.merge(params, adapters, 4.0)
    pair = adapters["model"]["layers_0"]["mlp"]["down_proj"]
    want = params["model"]["layers_0"]["mlp"]["down_proj"]["kernel"] + 4.0 * pair["lora_a"] @ pair["lora_b"]
    np.testing.assert_array_equal(merged["model"]["layers_0"]["mlp"]["down_proj"]["kernel"], want)
    assert merged["model"]["layers_0"]["self_attn"]["k_proj"] is params["model"]["layers_0"]["self_attn"]["k_proj"]
    combined = lora.combine(params, lora.trainable(params, adapters), 4.0)
    np.testing.assert_allclose(outputs(module, merged, "llama"), outputs(module, combined, "llama"), atol=1e-5)


@pytest.mark.fast
def test_only_the_adapters_and_heads_train_and_hold_optimizer_state():
    """A BERT reward model: the gradient and Adam's moments are the adapters' and the
    classifier's (PEFT's modules_to_save); the base comes out of an update bit for bit as it
    went in."""
    module, params = model("bert")
    adapters = lora.init(params, lora.settings(rank=2), "bert", jax.random.key(1))  # PEFT's default: query, value
    state = TrainState.create(module, lora.trainable(params, adapters), optax.adam(1e-2), base_params=params,
                              lora_scale=4.0)
    assert set(state.params) == {"lora", "heads"} and set(state.params["heads"]) == {"classifier"}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and {x.shape for x in moments} <= {x.shape for x in jax.tree.leaves(state.params)}
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(state.params))
    base = jax.tree.map(np.asarray, params)
    new, _ = jax.jit(make_reward_step("regression"))(state, regression_batch(), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(new.base_params), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, state.params)
    assert min(jax.tree.leaves(moved["heads"])) > 0 and max(jax.tree.leaves(moved["lora"])) > 0


@pytest.mark.fast
def test_a_bfloat16_base_trains_float32_adapters_and_the_nan_guard_skips_a_poisoned_update():
    """`compute.dtype: bfloat16` with LoRA, as the stages build it: the base stored and run in
    bfloat16, the adapters and their Adam state float32 and moving; an update whose loss is NaN
    (an adapter poisoned) leaves the trained leaves and the optimizer state as they were."""
    module, params = model("gpt2", dtype=jnp.bfloat16)
    adapters = lora.init(params, ALL_LINEAR, "gpt2", jax.random.key(1))
    state = TrainState.create(module, lora.trainable(params, adapters), optax.adam(1e-2),
                              base_params=frozen_params(params, jnp.bfloat16), lora_scale=2.0, skip_nonfinite=True)
    step = jax.jit(make_sft_step())
    new, metrics = step(state, sft_batch(), jax.random.key(0))
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0
    assert {x.dtype for x in jax.tree.leaves(new.base_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves((new.params, new.opt_state)) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))) > 0
    leaves, tree = jax.tree.flatten(state.params)
    poisoned = state.replace(params=jax.tree.unflatten(tree, [jnp.full_like(leaves[0], jnp.nan), *leaves[1:]]))
    after, metrics = step(poisoned, sft_batch(), jax.random.key(0))
    assert not np.isfinite(metrics["loss"]) and metrics["skipped"] == 1
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((poisoned.params, poisoned.opt_state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", tiered(["grpo", "dpo"], fast={"grpo"}))
def test_the_base_as_reference_gives_the_update_of_an_explicit_reference_copy(method):
    module, params = model("gpt2")
    adapters = random_b(lora.init(params, ALL_LINEAR, "gpt2", jax.random.key(1)))  # the policy is not the base
    tx = optax.sgd(0.5)
    if method == "grpo":
        step, batch = make_grpo_update(GRPOConfig(num_generations=2, beta=0.5)), rollout_batch()
    else:
        step, batch = make_dpo_step("sigmoid", beta=0.5), pair_batch()
    state = TrainState.create(module, lora.trainable(params, adapters), tx, base_params=params, lora_scale=2.0)
    explicit = state.replace(ref_params=jax.tree.map(jnp.array, params))
    results = [jax.jit(step)(s, batch, jax.random.key(0)) for s in (state, explicit)]
    (got, got_metrics), (want, want_metrics) = results
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_array_equal(a, b)
    kl = "kl" if method == "grpo" else "rewards/margins"
    assert got_metrics[kl] == want_metrics[kl] != 0.0


@pytest.mark.fast
def test_the_lora_section_refuses_what_peft_would_not_take():
    for overrides, message in ((["lora.rank=0"], "lora: rank=0 must be at least 1"),
                               (["lora.alpha=-1"], "lora: alpha=-1.0 must be > 0"),
                               (["lora.dropout=1.0"], r"lora: dropout=1.0 must be in \[0, 1\)"),
                               (["lora.ranks=4"], "lora: unknown key 'ranks'; did you mean 'rank'")):
        with pytest.raises(ConfigError, match=message):
            cfg.load(sft.SFTConfig, "configs/tiny/sft.yaml", overrides)
    assert cfg.load(sft.SFTConfig, "configs/tiny/sft.yaml", ["lora.targets=all-linear"]).lora.targets == "all-linear"
    assert cfg.load(sft.SFTConfig, "configs/tiny/sft.yaml").lora is None  # absent: full fine-tuning
    with pytest.raises(ConfigError, match=r"lora.targets=\['q_proj'\]: \['q_proj'\] not among gpt2's linear layers"):
        lora.module_names(["q_proj"], "gpt2")
    with pytest.raises(ConfigError, match="'all-linear' stands alone"):
        lora.module_names(["all-linear", "c_fc"], "gpt2")
    assert lora.module_names(None, "llama") == {"q_proj", "v_proj"}  # PEFT's default targets
    assert lora.module_names("all-linear", "llama") == lora.module_names(["all-linear"], "llama")
    assert lora.module_names(["dense"], "bert") == {"attn_out", "ffn_in", "ffn_out", "pooler"}
    with pytest.raises(ConfigError, match=r"\['pre_classifier'\] not among distilbert's"):  # it trains whole
        lora.module_names(["pre_classifier"], "distilbert")


@pytest.mark.fast
def test_the_memory_plan_counts_base_adapters_and_their_optimizer_state_and_no_reference(tmp_path):
    """GRPO with a KL (a reference) under bfloat16: with LoRA the plan's params are the
    bfloat16 base plus the float32 adapters, the optimizer state is the adapters' alone, and
    there is no reference."""
    policy = checkpoint(tmp_path / "policy", TINY_GPT2)
    reward = checkpoint(tmp_path / "reward", TINY_BERT)
    shared = [f"policy={policy}", f"reward.model={reward}", "grpo.beta=0.1", "compute.dtype=bfloat16"]
    full = memory.plan("grpo", grpo_config(shared), compile_update=False)
    with_lora = memory.plan("grpo", grpo_config([*shared, "lora.rank=4"]), compile_update=False)
    module, params = from_config(TINY_GPT2, jax.random.key(0), head="lm", dtype="bfloat16")[:2]
    adapters = lora.init(params, lora.settings(rank=4), "gpt2", jax.random.key(0))
    adapter_bytes = 4 * sum(x.size for x in jax.tree.leaves(adapters))
    assert full.parts["reference"] == full.parts["params"] // 2 > 0  # a bfloat16 copy of the float32 policy
    assert with_lora.parts["reference"] == 0
    assert with_lora.parts["params"] == full.parts["params"] // 2 + adapter_bytes
    assert with_lora.parts["optimizer state"] - 2 * adapter_bytes < 64  # Adam's moments (and its step counters)
    state, _ = common.initial_state(module, params, grpo_config([*shared, "lora.rank=4"]).train,
                                    grpo.training(grpo_config([*shared, "lora.rank=4"])))
    assert {x.dtype for x in jax.tree.leaves(state.base_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.fast
def test_dropout_draws_on_the_adapters_input_in_the_loss_passes_only():
    module, params = model("gpt2")
    adapters = random_b(lora.init(params, ALL_LINEAR, "gpt2", jax.random.key(1)))
    state = TrainState.create(module, lora.trainable(params, adapters), optax.sgd(0.1), base_params=params,
                              lora_scale=2.0, lora_dropout=0.5)
    step = jax.jit(make_sft_step())
    losses = [float(step(state, sft_batch(), jax.random.key(k))[1]["loss"]) for k in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]  # the update's key draws the dropout
    assert "lora_dropout" not in str(jax.tree_util.tree_structure(state.model_params(state.params)))  # scoring


@pytest.mark.fast
def test_a_stage_starts_from_a_peft_adapter_folder_with_its_settings_and_saved_head(tmp_path, monkeypatch):
    """`lora.adapter`: the folder's adapters (and a classifier head PEFT saved whole) are the
    start, as the stages save them (a local base by its absolute path); a rank, alpha or targets
    other than the folder's is refused, naming the keys, and so is a module saved whole that the
    frozen base would hold (an embedding)."""
    from jaxrlhf.models import peft

    module, params = model("bert")
    adapters = random_b(lora.init(params, ALL_LINEAR, "bert", jax.random.key(1)))
    head = {"classifier": jax.tree.map(lambda x: x + 1.0, params["classifier"])}
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)  # "base" as a config names it, relative to the working directory
    for base, recorded in (("base", str(tmp_path / "base")), ("some/hub-model", "some/hub-model")):
        common.save_lora_adapter(tmp_path / "adapter", {"lora": adapters, "heads": head}, ALL_LINEAR, "bert", base)
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == recorded
    section = cfg.LoRAConfig(rank=4, alpha=8.0, targets="all-linear", adapter=str(tmp_path / "adapter"))
    start, with_head = common.starting_adapters(section, params, "bert")
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(with_head["classifier"]["kernel"], head["classifier"]["kernel"])
    np.testing.assert_array_equal(with_head["bert"]["pooler"]["kernel"], params["bert"]["pooler"]["kernel"])
    with pytest.raises(ConfigError, match="has rank 4, alpha 8.0 .* set lora.rank, lora.alpha and lora.targets"):
        common.starting_adapters(cfg.LoRAConfig(rank=4, adapter=str(tmp_path / "adapter")), params, "bert")
    embeddings = {"bert": {"embeddings": {"word_embeddings": params["bert"]["embeddings"]["word_embeddings"]}}}
    peft.save_adapter(tmp_path / "adapter", adapters, lora.peft_settings(ALL_LINEAR, "bert"), "bert", None,
                      modules_to_save={**head, **embeddings}, overwrite=True)
    with pytest.raises(ConfigError, match=rf"^lora.adapter {re.escape(str(tmp_path / 'adapter'))} saves modules "
                                          r"\['bert/embeddings/word_embeddings'\] whole; [^\n]*$"):
        common.starting_adapters(section, params, "bert")
