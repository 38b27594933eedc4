"""Generation: HF-equal greedy decoding, honest logprobs, right distributions, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.errors import ConfigError
from jaxrlhf.losses import token_logprobs
from jaxrlhf.models import from_config, load_pretrained
from jaxrlhf.sampling import SamplingConfig, generate
from tests.conftest import padded_batch, randomize, tiered

PAD = 0


def hf_model(tmp_path, seed, **cfg):
    vocab = cfg["vocab_size"]
    config = transformers.GPT2Config(bos_token_id=vocab - 1, eos_token_id=vocab - 1, **cfg)
    model = randomize(transformers.GPT2LMHeadModel(config), seed=seed, std=0.15)
    model.save_pretrained(tmp_path)
    return model


def hf_greedy(model, ids, mask, n, eos):
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), do_sample=False,
            max_new_tokens=n, pad_token_id=PAD, eos_token_id=eos,
        )
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.fast
@pytest.mark.parametrize(
    "cfg",
    [dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64),
     dict(n_layer=3, n_head=4, n_embd=48, n_inner=72, vocab_size=61, n_positions=40, activation_function="gelu")],
    ids=["2x32", "3x48"],
)
def test_greedy_equals_hf_token_for_token_with_ragged_left_padding(tmp_path, cfg):
    ref = hf_model(tmp_path, seed=cfg["n_layer"], **cfg)
    module, params, _ = load_pretrained(tmp_path)
    ids, mask = padded_batch(cfg["vocab_size"], lengths=[7, 3, 1, 5], total=7, side="left", seed=2)
    ids = np.where(mask == 1, ids, PAD)
    n = 12
    # Take as EOS a token that row 0 emits midway, so stopping and padding are exercised too.
    eos = int(hf_greedy(ref, ids, mask, n, eos=None)[0, 5])
    want = hf_greedy(ref, ids, mask, n, eos)
    settings = SamplingConfig(max_new_tokens=n, pad_token_id=PAD, eos_token_id=eos, greedy=True)
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
    got = np.asarray(out.sequences[:, ids.shape[1]:])
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1]:] == PAD).all()
    stops = (got == eos).argmax(axis=1)
    assert got[0, stops[0]] == eos and stops[0] <= 5
    resp = np.asarray(out.response_mask)
    assert resp[0, : stops[0] + 1].all() and not resp[0, stops[0] + 1:].any()


def tiny(vocab=53, seed=0, n_positions=64, sharpen=6.0):
    cfg = dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=n_positions)
    module, params, _ = from_config(cfg, jax.random.key(seed))
    # Sharpen the random init so the distributions are far from uniform.
    return module, jax.tree.map(lambda x: x * sharpen, params)


@pytest.mark.parametrize("temperature,top_k,top_p", tiered([(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)],
                                                            fast={(1.3, 5, 1.0)}))
def test_logprobs_equal_a_teacher_forced_forward(temperature, top_k, top_p):
    module, params = tiny()
    ids, mask = padded_batch(53, lengths=[6, 2, 4], total=6, side="left", seed=4)
    settings = SamplingConfig(max_new_tokens=10, pad_token_id=PAD, eos_token_id=3, temperature=temperature,
                              top_k=top_k, top_p=top_p, return_raw_logprobs=True)
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(7), settings)
    logits = module.apply({"params": params}, out.sequences, out.attention_mask).logits[:, ids.shape[1] - 1 : -1]
    resp = np.asarray(out.response_mask) == 1
    response = out.sequences[:, ids.shape[1]:]
    raw = token_logprobs(logits, response)
    np.testing.assert_allclose(np.asarray(out.raw_logprobs)[resp], np.asarray(raw)[resp], atol=1e-4)
    scaled = token_logprobs(logits, response, temperature)
    if top_k == 0 and top_p == 1.0:
        np.testing.assert_allclose(np.asarray(out.logprobs)[resp], np.asarray(scaled)[resp], atol=1e-4)
    else:  # truncation renormalises over the kept tokens, so each kept token gains mass
        assert (np.asarray(out.logprobs)[resp] >= np.asarray(scaled)[resp] - 1e-5).all()
    assert (np.asarray(out.logprobs)[~resp] == 0).all()


def first_token_probs(module, params, prompt, temperature):
    logits = module.apply({"params": params}, jnp.asarray(prompt)[None]).logits[0, -1]
    return np.asarray(jax.nn.softmax(logits / temperature), np.float64)


@pytest.mark.slow
def test_sampled_frequencies_match_the_softmax():
    module, params = tiny(vocab=8, seed=1, sharpen=3.0)
    prompt = np.array([1, 4, 2], np.int32)
    rows = 4000
    settings = SamplingConfig(max_new_tokens=1, pad_token_id=PAD, temperature=0.8)
    out = generate(module, params, jnp.tile(prompt, (rows, 1)), jnp.ones((rows, 3), jnp.int32), jax.random.key(3), settings)
    counts = np.bincount(np.asarray(out.sequences[:, -1]), minlength=8)
    expected = first_token_probs(module, params, prompt, 0.8) * rows
    assert expected.min() > 5, "every bin needs mass for the chi-square test"
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3, (chi2, counts, expected.round())  # 99.9% quantile of chi-square, 7 d.o.f.


@pytest.mark.slow
@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (4, 0.7)])
def test_top_k_and_top_p_never_leave_the_kept_set(top_k, top_p):
    module, params = tiny(vocab=16, seed=2)
    ids, mask = padded_batch(16, lengths=[5] * 48, total=5, side="left", seed=5)
    settings = SamplingConfig(max_new_tokens=6, pad_token_id=PAD, top_k=top_k, top_p=top_p)
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(11), settings)
    logits = np.asarray(module.apply({"params": params}, out.sequences, out.attention_mask).logits[:, 4:-1])
    tokens = np.asarray(out.sequences[:, 5:])
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            order = np.argsort(-logits[b, t])
            kept = order[:top_k] if top_k else order
            p = np.exp(logits[b, t][kept] - logits[b, t][kept].max())
            p /= p.sum()
            kept = kept[(np.cumsum(p) - p) < top_p]
            assert tokens[b, t] in kept, (b, t, tokens[b, t], kept)


@pytest.mark.slow
def test_min_new_tokens_holds_eos_back():
    module, params = tiny(vocab=8, seed=1)
    prompt = jnp.ones((64, 2), jnp.int32)
    eos = int(np.argmax(first_token_probs(module, params, np.ones(2, np.int32), 1.0)))
    settings = SamplingConfig(max_new_tokens=6, pad_token_id=PAD, eos_token_id=eos, min_new_tokens=3)
    out = generate(module, params, prompt, jnp.ones_like(prompt), jax.random.key(0), settings)
    response = np.asarray(out.sequences[:, 2:])
    assert not (response[:, :3] == eos).any()
    assert np.asarray(out.response_mask)[:, :4].all()


@pytest.mark.fast
def test_second_call_with_the_same_shapes_does_not_trace_again():
    module, params = tiny()
    settings = SamplingConfig(max_new_tokens=5, pad_token_id=PAD, eos_token_id=3)
    ids, mask = padded_batch(53, lengths=[4, 2], total=4, side="left")
    traces = []

    def count(name, *_, **__):
        if name == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(name)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
        first = len(traces)
        for seed in (1, 2):
            generate(module, params, jnp.asarray(ids + seed), jnp.asarray(mask), jax.random.key(seed), settings)
        assert first > 0 and len(traces) == first
    finally:
        jax.monitoring.clear_event_listeners()


@pytest.mark.fast
@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(max_new_tokens=0), r"max_new_tokens=0 must be at least 1"),
        (dict(max_new_tokens=4, temperature=0.0), r"temperature=0.0 must be > 0"),
        (dict(max_new_tokens=4, top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(max_new_tokens=4, min_new_tokens=5), r"min_new_tokens=5 must be in \[0, max_new_tokens=4\]"),
    ],
)
def test_bad_settings_are_named(kw, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(pad_token_id=PAD, **kw)


@pytest.mark.fast
def test_prompt_plus_budget_over_the_context_is_an_error():
    module, params = tiny(n_positions=16)
    with pytest.raises(ConfigError, match=r"prompt length 10 \+ max_new_tokens 8 = 18 exceeds the model's n_positions=16"):
        generate(module, params, jnp.ones((1, 10), jnp.int32), jnp.ones((1, 10), jnp.int32), jax.random.key(0),
                 SamplingConfig(max_new_tokens=8, pad_token_id=PAD))


@pytest.mark.slow
@pytest.mark.parametrize("only", [0, 127, 128, 200, 299])
def test_inverse_cdf_sampler_draws_only_tokens_with_mass(only):
    from jaxrlhf.sampling import sample_categorical

    logits = jnp.full((64, 300), -jnp.inf).at[:, only].set(0.0)  # one token left, anywhere in its chunk
    assert (np.asarray(sample_categorical(jax.random.split(jax.random.key(only), 64), logits)) == only).all()
    two = jnp.full((20000, 300), -jnp.inf).at[:, 5].set(0.0).at[:, 260].set(jnp.log(3.0))
    draws = np.asarray(sample_categorical(jax.random.split(jax.random.key(1), 20000), two))
    assert set(np.unique(draws)) == {5, 260}
    assert abs((draws == 260).mean() - 0.75) < 0.015  # 5 standard errors
