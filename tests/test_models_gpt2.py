"""Our GPT-2 against transformers' GPT2LMHeadModel on random configs and paddings."""

import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.models import load_pretrained
from jaxrlhf.models.layers import positions_from_mask
from tests.conftest import padded_batch, randomize, tiered

CONFIGS = {
    "small-gelu_new": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64),
    "relu-inner-eps": dict(
        n_layer=3, n_head=4, n_embd=48, n_inner=80, vocab_size=131, n_positions=40,
        activation_function="relu", layer_norm_epsilon=1e-3, scale_attn_by_inverse_layer_idx=True,
    ),
    "one-head-unscaled": dict(
        n_layer=1, n_head=1, n_embd=24, vocab_size=51, n_positions=32,
        activation_function="quick_gelu", scale_attn_weights=False,
    ),
    "gelu-exact-odd": dict(n_layer=2, n_head=3, n_embd=36, vocab_size=257, activation_function="gelu"),
}


def make_gpt2(tmp_path, seed=0, **overrides):
    vocab = overrides.get("vocab_size", 50257)
    config = transformers.GPT2Config(**{"bos_token_id": vocab - 1, "eos_token_id": vocab - 1, **overrides})
    model = randomize(transformers.GPT2LMHeadModel(config), seed)
    model.save_pretrained(tmp_path)
    return model


def reference_logits(model, ids, mask):
    positions = positions_from_mask(mask)
    with torch.no_grad():
        out = model(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(np.asarray(positions), dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("name", tiered(sorted(CONFIGS), fast={"small-gelu_new"}))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tmp_path, name, side):
    ref = make_gpt2(tmp_path, seed=len(name), **CONFIGS[name])
    module, params, config = load_pretrained(tmp_path)
    ids, mask = padded_batch(config.vocab_size, lengths=[9, 5, 1], total=9, side=side)
    ours = np.asarray(module.apply({"params": params}, ids, mask).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference_logits(ref, ids, mask)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_left_padding_gives_the_unpadded_logits(tmp_path):
    make_gpt2(tmp_path, **CONFIGS["small-gelu_new"])
    module, params, _ = load_pretrained(tmp_path)
    ids, mask = padded_batch(97, lengths=[4], total=7, side="left")
    padded = np.asarray(module.apply({"params": params}, ids, mask).logits)[0, 3:]
    alone = np.asarray(module.apply({"params": params}, ids[:, 3:]).logits)[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_params_and_stays_close(tmp_path):
    """bf16 compute: params stay float32, and the logits are float32 *accumulations* (not bf16
    products cast afterwards, which would all be bf16-representable), close to float32's."""
    import jax.numpy as jnp

    make_gpt2(tmp_path, **CONFIGS["small-gelu_new"])
    module32, params, _ = load_pretrained(tmp_path)
    module16, params16, _ = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in __import__("jax").tree.leaves(params16))
    ids, mask = padded_batch(97, lengths=[6, 6], total=6, side="right")
    out32 = np.asarray(module32.apply({"params": params}, ids, mask).logits)
    out16 = module16.apply({"params": params16}, ids, mask).logits
    assert out16.dtype == jnp.float32  # logits come back in float32 for the losses
    out16 = np.asarray(out16)
    rounded = np.asarray(jnp.asarray(out16).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(out16 != rounded) > 0.5, "most logits must carry more than bf16's 8 bits of mantissa"
    np.testing.assert_allclose(out16, out32, atol=0.1)


@pytest.mark.fast
def test_bf16_attention_scores_accumulate_in_float32():
    """The q.k scores of bf16 operands come out of the matmul in float32 (then the softmax)."""
    import jax
    import jax.numpy as jnp

    from jaxrlhf.models.layers import attend

    q = jnp.ones((1, 3, 2, 4), jnp.bfloat16)  # [B, T, H, K]
    k = v = jnp.ones((1, 2, 3, 4), jnp.bfloat16)  # [B, H, S, K]
    jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, jnp.ones((1, 3, 3), bool), 0.5))(q, k, v)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    scores = dots[0]  # q.k; the second is probs.v, which stays in bf16
    assert scores.outvars[0].aval.dtype == jnp.float32
    assert [x.aval.dtype for x in scores.invars] == [jnp.bfloat16, jnp.bfloat16]


@pytest.mark.slow
def test_head_slice_gives_those_positions_of_the_full_logits_and_values(tmp_path):
    make_gpt2(tmp_path, **CONFIGS["small-gelu_new"])
    module, params, _ = load_pretrained(tmp_path, value_head=True, rng=__import__("jax").random.key(0))
    params["v_head"]["summary"]["kernel"] = np.linspace(-1, 1, 32, dtype=np.float32)[:, None]
    ids, mask = padded_batch(97, lengths=[7, 4], total=7, side="left")
    full = module.apply({"params": params}, ids, mask)
    part = module.apply({"params": params}, ids, mask, head_slice=slice(-4, -1))
    assert part.logits.shape == (2, 3, 97) and part.values.shape == (2, 3)
    np.testing.assert_allclose(part.logits, full.logits[:, -4:-1], atol=1e-6)
    np.testing.assert_allclose(part.values, full.values[:, -4:-1], atol=1e-6)
    np.testing.assert_array_equal(part.hidden, full.hidden)
