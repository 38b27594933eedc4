"""The compiled decode loop's structure: what a decode step does besides the model's work.

Compile-only (no timing): the decoding `while_loop`'s body in `_generate`'s optimised HLO must
not copy or transpose the KV cache, the output buffers or a `[B, V]` logits array at each
step, nor draw random numbers (each row's are drawn for every step before the loop), and must
read the vocabulary in one exp pass (benchmarks/RESULTS.md, the decode profile).
"""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxrlhf.models import from_config
from jaxrlhf.models.layers import init_cache
from jaxrlhf.sampling import SamplingConfig, _generate

pytestmark = pytest.mark.fast

B, P, N, V = 4, 5, 7, 301
MODELS = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=32, vocab_size=V, n_positions=32),
    # grouped-query attention: 4 query heads over 2 key/value heads
    "llama": dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=32, intermediate_size=48, vocab_size=V, max_position_embeddings=32),
}


def decode_body(config: dict, settings: SamplingConfig) -> tuple[list[str], list[str], object]:
    """-> (the decode loop body's own instructions, those of the fusions it calls, the model's
    config): compiled from the optimised HLO of `_generate`."""
    module, params, _ = from_config(config, jax.random.key(0))
    ids = jnp.ones((B, P), jnp.int32)
    cache = init_cache(module.config, B, P + N, module.dtype)
    hlo = _generate.lower(module, settings, params, cache, ids, jnp.ones_like(ids), jax.random.key(0),
                          jnp.arange(B, dtype=jnp.int32)).compile().as_text()
    computations, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            name = head.group(1)
            computations[name] = []
        elif name:
            computations[name].append(line)
    body = computations[re.search(r'body=%([\w.\-]+), metadata=\{op_name="jit\(_generate\)/while"', hlo).group(1)]
    fused = [line for c in re.findall(r"calls=%([\w.\-]+)", "\n".join(body)) for line in computations[c]]
    return body, fused, module.config


def shape_of(line: str) -> tuple[int, ...] | None:
    m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]", line)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else None


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_decode_step_copies_no_cache_buffer_or_logits(model):
    body, _, config = decode_body(MODELS[model], SamplingConfig(max_new_tokens=N, pad_token_id=0))
    _, heads, head_dim = config.kv_cache_dims
    queries = MODELS[model].get("num_attention_heads", MODELS[model].get("n_head"))
    # the cache in either layout, repeated to the query heads, grouped; the buffers; the logits
    big = {(B, heads, P + N, head_dim), (B, P + N, heads, head_dim), (B, queries, P + N, head_dim),
           (B, P + N, queries, head_dim), (B, heads, queries // heads, P + N, head_dim), (B, N), (B, V)}
    assert any(shape_of(line) == (B, heads, P + N, head_dim) for line in body), "the cache is updated in the loop"
    moved = [line.strip()[:120] for line in body
             if re.match(r"\s*(?:ROOT )?%[\w\-]*(copy|transpose|pad|concatenate|broadcast)[\w\-.]* = ", line)
             and shape_of(line) in big]
    assert not moved, f"per-step copies in the decode loop: {moved}"
    rng = [line.strip()[:80] for line in body if "threefry" in line]
    assert not rng, f"random numbers drawn inside a decode step (each row's are drawn before the loop): {rng}"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_sampled_step_takes_one_exp_over_the_vocabulary(model):
    body, fused, _ = decode_body(MODELS[model], SamplingConfig(max_new_tokens=N, pad_token_id=0))
    exps = [line for line in body + fused if " exponential(" in line and shape_of(line) == (B, V)]
    assert len(exps) == 1, exps
