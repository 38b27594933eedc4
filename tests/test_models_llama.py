"""Our Llama against transformers' LlamaForCausalLM on random configs (GQA and MHA, tied and
untied embeddings, both paddings): logits, greedy generation, the export round trip, and
RMSNorm's eps at the shipped values on activations small enough for it to count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.models import LlamaConfig, load_pretrained, save_pretrained
from jaxrlhf.sampling import SamplingConfig, generate
from tests.conftest import padded_batch, randomize, tiered
from tests.test_models_gpt2 import reference_logits

CONFIGS = {
    "gqa-untied": dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=97, max_position_embeddings=64),
    "mha-tied": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                     vocab_size=131, max_position_embeddings=40, tie_word_embeddings=True, rms_norm_eps=1e-3,
                     rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # SmolLM2's shape in miniature: one key/value head for 3 query heads, tied, theta 1e5.
    "mqa-tied-headdim-bias": dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
                                  num_key_value_heads=1, head_dim=12, vocab_size=51, tie_word_embeddings=True,
                                  attention_bias=True, mlp_bias=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}


def make_llama(tmp_path, seed=0, **overrides):
    vocab = overrides["vocab_size"]
    config = transformers.LlamaConfig(**{"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, **overrides})
    model = randomize(transformers.LlamaForCausalLM(config), seed)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("name", tiered(sorted(CONFIGS), fast={"gqa-untied"}))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tmp_path, name, side):
    ref = make_llama(tmp_path, seed=len(name), **CONFIGS[name])
    module, params, config = load_pretrained(tmp_path)
    assert config.tie_word_embeddings == ("-tied" in name) and ("lm_head" in params) != config.tie_word_embeddings
    ids, mask = padded_batch(config.vocab_size, lengths=[9, 5, 1], total=9, side=side)
    ours = np.asarray(module.apply({"params": params}, ids, mask).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference_logits(ref, ids, mask)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_left_padding_gives_the_unpadded_logits(tmp_path):
    make_llama(tmp_path, **CONFIGS["gqa-untied"])
    module, params, _ = load_pretrained(tmp_path)
    ids, mask = padded_batch(97, lengths=[4], total=7, side="left")
    padded = np.asarray(module.apply({"params": params}, ids, mask).logits)[0, 3:]
    alone = np.asarray(module.apply({"params": params}, ids[:, 3:]).logits)[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("eps", [1e-5, 1e-6])  # SmolLM2's rms_norm_eps, and transformers' default
def test_rms_norm_eps_sits_under_the_root_at_the_shipped_values(tmp_path, eps):
    """transformers' RMSNorm is x / sqrt(mean(x^2) + eps). At ordinary activations eps is lost
    in the mean, so here the residual stream is shrunk to an rms near sqrt(eps) (embeddings and
    the blocks' output projections scaled down): eps outside the root, added to another
    quantity, or not the one in config.json then moves every norm's output by tens of percent."""
    ref = make_llama(tmp_path, **{**CONFIGS["gqa-untied"], "rms_norm_eps": eps})
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")):
                p.mul_(eps ** 0.5 / 0.08)  # randomize's std 0.08 -> sqrt(eps)
    ref.save_pretrained(tmp_path)
    module, params, _ = load_pretrained(tmp_path)
    ids, mask = padded_batch(97, lengths=[9, 5], total=9, side="right")
    ours = np.asarray(module.apply({"params": params}, ids, mask).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference_logits(ref, ids, mask)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", tiered(["gqa-untied", "mha-tied"], fast={"gqa-untied"}))
def test_greedy_generation_matches_transformers_token_for_token(tmp_path, name):
    """Through the KV cache (prefill, then one token at a time) on left-padded prompts."""
    ref = make_llama(tmp_path, seed=3, **CONFIGS[name])
    module, params, config = load_pretrained(tmp_path)
    ids, mask = padded_batch(config.vocab_size, lengths=[6, 3], total=6, side="left", seed=1)
    settings = SamplingConfig(max_new_tokens=10, pad_token_id=0, greedy=True)  # no EOS: all 10 tokens
    ours = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                              max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(ours.sequences[:, 6:]), theirs[:, 6:].numpy())


@pytest.mark.slow
def test_value_head_and_head_slice(tmp_path):
    make_llama(tmp_path, **CONFIGS["gqa-untied"])
    with pytest.warns(UserWarning, match=r"v_head\.summary\.weight"):
        module, params, _ = load_pretrained(tmp_path, value_head=True, rng=jax.random.key(0))
    params["v_head"]["summary"]["kernel"] = np.linspace(-1, 1, 32, dtype=np.float32)[:, None]
    ids, mask = padded_batch(97, lengths=[7, 4], total=7, side="left")
    full = module.apply({"params": params}, ids, mask)
    part = module.apply({"params": params}, ids, mask, head_slice=slice(-4, -1))
    assert part.logits.shape == (2, 3, 97) and part.values.shape == (2, 3)
    np.testing.assert_allclose(part.logits, full.logits[:, -4:-1], atol=1e-6)
    np.testing.assert_allclose(part.values, full.values[:, -4:-1], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gqa-untied", "mha-tied"])
def test_export_round_trip_through_transformers(tmp_path, name):
    """Load, perturb, save_pretrained; transformers loads our folder and gives our logits, and
    loading it back gives the same params and config."""
    make_llama(tmp_path / "orig", seed=5, **CONFIGS[name])
    module, params, config = load_pretrained(tmp_path / "orig")
    params = jax.tree.map(lambda p: p + 0.01 * np.sign(np.asarray(p)), params)
    save_pretrained(tmp_path / "ours", module, params)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask = padded_batch(config.vocab_size, lengths=[7, 4], total=7, side="left")
    ours = np.asarray(module.apply({"params": params}, ids, mask).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference_logits(theirs, ids, mask)[real], atol=1e-4, rtol=1e-4)
    _, params2, config2 = load_pretrained(tmp_path / "ours")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.fast
def test_sharded_safetensors_checkpoint_loads(tmp_path):
    ref = make_llama(tmp_path / "one", **CONFIGS["gqa-untied"])
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, one, _ = load_pretrained(tmp_path / "one")
    _, sharded, _ = load_pretrained(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, one, sharded)


@pytest.mark.fast
def test_unsupported_rope_scaling_is_refused_naming_it():
    from jaxrlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config.json: rope_type='linear' is not supported"):
        LlamaConfig.from_hf({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        LlamaConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 3})
