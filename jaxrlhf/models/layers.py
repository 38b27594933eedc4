"""Building blocks shared by GPT-2, Llama, BERT and DistilBERT.

Shapes are in the names: B batch, T query length, S key length, H heads, K head dim, D width.
"""

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrlhf.errors import ConfigError


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as torch computes it, x / 2 * (1 + erf(x / sqrt 2)). `jax.nn.gelu`'s
    x / 2 * erfc(-x / sqrt 2) is the same function (within 1e-6), but XLA lowers erfc to two
    polynomials, an exp and a select, erf to one polynomial: on CPU the erf form's forward and
    gradient on the MiniLM reward step's `[2048, 1536]` take 3.7 ms against 10 ms."""
    return 0.5 * x * (1.0 + lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


# The activations Hugging Face configs name (transformers' ACT2FN), with the same formulas.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_python": gelu_erf,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_python_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


class Dense(nn.Dense):
    """`nn.Dense` (same params, same maths) applied to the rows of a `[..., D]` input
    flattened to 2-D, so XLA always emits one plain 2-D matmul and its gradient. On CPU a
    dense on `[B, T, D]` timed alone was up to 1.6x slower (fwd + grad); in whole steps the
    BERT reward step gained 7% (benchmarks/RESULTS.md, change 5).

    With a LoRA adapter in its params (`lora_a` `[D, r]`, `lora_b` `[r, F]` already scaled, and
    `lora_dropout` in a loss pass: see `lora.combine`), it adds dropout(x) A B, in the adapter's
    float32 as PEFT computes it.
    """

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        x = x_NxD.reshape(-1, x_NxD.shape[-1])
        y = super().__call__(x)
        if self.has_variable("params", "lora_a"):
            a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
            x = x.astype(a.dtype)
            if self.has_variable("params", "lora_dropout"):
                drop = self.get_variable("params", "lora_dropout")
                keep = jax.random.bernoulli(jax.random.wrap_key_data(drop["key"]), 1.0 - drop["rate"], x.shape)
                x = jnp.where(keep, x / (1.0 - drop["rate"]), 0.0)
            y = y + ((x @ a) @ b).astype(y.dtype)
        return y.reshape(*x_NxD.shape[:-1], y.shape[-1])


def _layer_norm_parts(x_NxD, scale_D, bias_D, eps):
    mean = jnp.mean(x_NxD, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(lax.square(x_NxD), axis=-1, keepdims=True) - lax.square(mean))
    inv_Nx1 = lax.rsqrt(var + eps)
    y = (x_NxD - mean) * (inv_Nx1 * scale_D) + bias_D
    return y, ((x_NxD - mean) * inv_Nx1, inv_Nx1, scale_D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x_NxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
    """LayerNorm of float32 `x` over its last axis, the variance as E[x^2] - E[x]^2.

    Its gradient is the closed form (torch's layer_norm_backward) from the normalised input and
    the inverse deviation kept by the forward pass: with autodiff's, XLA on CPU also kept the
    scale broadcast to `[N, D]` for the backward's row sums (a materialised copy per norm) and
    spread them over more passes; the reward step trains ~2% faster."""
    return _layer_norm_parts(x_NxD, scale_D, bias_D, eps)[0]


def _layer_norm_bwd(eps, residuals, g_NxD):
    xhat_NxD, inv_Nx1, scale_D = residuals
    gs_NxD = g_NxD * scale_D
    dx = inv_Nx1 * (gs_NxD - jnp.mean(gs_NxD, axis=-1, keepdims=True)
                    - xhat_NxD * jnp.mean(gs_NxD * xhat_NxD, axis=-1, keepdims=True))
    rows = tuple(range(g_NxD.ndim - 1))
    return dx, jnp.sum(g_NxD * xhat_NxD, axis=rows), jnp.sum(g_NxD, axis=rows)


layer_norm.defvjp(_layer_norm_parts, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """`nn.LayerNorm` (same params, same float32 maths: statistics, scale and shift in float32,
    the variance as E[x^2] - E[x]^2) with the output in the compute `dtype`, and its scale and
    bias rounded to that dtype first, as `Dense` and `Embed` round their params: so params
    stored in bfloat16 (a frozen model's) compute exactly what their float32 originals do.
    Under bfloat16 this is torch's LayerNorm on bfloat16 weights."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        d = x_NxD.shape[-1]
        scale_D, bias_D = (self.param(n, init, (d,)).astype(self.dtype).astype(jnp.float32)
                           for n, init in (("scale", nn.initializers.ones), ("bias", nn.initializers.zeros)))
        return layer_norm(x_NxD.astype(jnp.float32), scale_D, bias_D, self.epsilon).astype(self.dtype)


def frozen_params(params, dtype):
    """The params of a model nobody trains (a reference, a reward model, a policy being
    evaluated) stored in its compute `dtype`: half the bytes in bfloat16. Every layer rounds its
    params to the compute dtype where it uses them (`Dense`, `nn.Embed`, `LayerNorm`, `RMSNorm`,
    the LM head), so these compute exactly what the float32 params do."""
    return jax.tree.map(lambda x: x.astype(dtype), params)


def rows_matmul(x_NxD: jax.Array, w_VxD: jax.Array) -> jax.Array:
    """`x @ w.T` over the last axis of `x` `[..., D]` -> `[..., V]` float32, as one 2-D matmul
    (see `Dense`): the LM head of the tiny SFT step trains 18% faster so on CPU. Accumulated
    and returned in float32 even for bf16 operands: logits rounded to bf16 (8 bits of
    mantissa, steps of 0.125 near 20) would blur the logprobs every loss is built on."""
    y = jnp.matmul(x_NxD.reshape(-1, x_NxD.shape[-1]), w_VxD.T, preferred_element_type=jnp.float32)
    return y.reshape(*x_NxD.shape[:-1], w_VxD.shape[0])


def activation(name: str, key: str = "activation") -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name`; `key` names the config field in the error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"{key}={name!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def attend(
    q_BxTxHxK: jax.Array,
    k_BxGxSxK: jax.Array,
    v_BxGxSxK: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """Softmax attention in float32 (scores accumulated in float32 from bf16 q and k too);
    `mask_BxTxS` is True where a query may see a key -> `[B, T, H, K]`.

    Keys and values come heads-major, as the KV cache stores them, so a decode step reads the
    cache in place (a `[B, S, H, K]` cache was transposed whole at every step and layer: 8% of
    GPT-2 small's decode step, benchmarks/RESULTS.md). Each of the G key/value heads serves
    H / G query heads (grouped-query attention; G = H for GPT-2 and BERT): query head j reads
    key/value head j // (H / G), as transformers' `repeat_kv`, without repeating the keys.

    A query that sees no key at all (a left-pad position) gets a uniform average instead of
    NaN; its output is garbage by design and callers mask it out.
    """
    b, t, h, k = q_BxTxHxK.shape
    g = k_BxGxSxK.shape[1]
    q_BxGxRxTxK = q_BxTxHxK.reshape(b, t, g, h // g, k).transpose(0, 2, 3, 1, 4)
    logits_BxGxRxTxS = jnp.einsum("bgrtk,bgsk->bgrts", q_BxGxRxTxK, k_BxGxSxK, preferred_element_type=jnp.float32)
    logits_BxGxRxTxS = jnp.where(
        mask_BxTxS[:, None, None], logits_BxGxRxTxS * scale, jnp.finfo(jnp.float32).min
    )
    probs_BxGxRxTxS = jax.nn.softmax(logits_BxGxRxTxS, axis=-1).astype(v_BxGxSxK.dtype)
    out_BxGxRxTxK = jnp.einsum("bgrts,bgsk->bgrtk", probs_BxGxRxTxS, v_BxGxSxK)
    return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, k)


def heads_major(x_BxTxHxK: jax.Array) -> jax.Array:
    """`[B, T, H, K]` -> `[B, H, T, K]`, the layout `attend` and the KV cache take keys and
    values in: each head's rows contiguous, one batched matmul per head."""
    return x_BxTxHxK.transpose(0, 2, 1, 3)


def split_heads(x_BxTxD: jax.Array, num_heads: int) -> jax.Array:
    b, t, d = x_BxTxD.shape
    return x_BxTxD.reshape(b, t, num_heads, d // num_heads)


def merge_heads(x_BxTxHxK: jax.Array) -> jax.Array:
    b, t, h, k = x_BxTxHxK.shape
    return x_BxTxHxK.reshape(b, t, h * k)


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
    """Position ids that start at 0 on each row's first real token (left padding aware)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


class KVCache(NamedTuple):
    """Keys and values of every position seen so far, for decoding one token at a time.

    `layers[i]` is layer i's `(k, v)`, each `[B, H, S, K]` for S slots (H the key/value
    heads; heads-major, the layout `attend` reads); `mask_BxS` is 1 on slots that hold a real
    token; `index` is the next slot to write. Made by `init_cache`.
    """

    layers: tuple[tuple[jax.Array, jax.Array], ...]
    mask_BxS: jax.Array
    index: jax.Array


def init_cache(config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for a causal LM whose config gives `kv_cache_dims` (layers, key/value
    heads, head dim)."""
    layers, heads, head_dim = config.kv_cache_dims
    shape = (batch, heads, max_len, head_dim)
    kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(layers))
    return KVCache(kv, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def write_cache(kv, k_BxHxTxK: jax.Array, v_BxHxTxK: jax.Array, index):
    """This step's keys and values (heads-major) written into a layer's cache `kv` at slot
    `index` -> the updated `(k, v)`, each `[B, H, S, K]`."""
    k = lax.dynamic_update_slice(kv[0], k_BxHxTxK.astype(kv[0].dtype), (0, 0, index, 0))
    v = lax.dynamic_update_slice(kv[1], v_BxHxTxK.astype(kv[1].dtype), (0, 0, index, 0))
    return k, v


def causal_positions_and_mask(attention_mask_BxT, positions_BxT, cache: KVCache | None):
    """-> (positions `[B, T]`, attention mask `[B, T, S]`, the cache's new key mask `[B, S]`
    (or the input mask without a cache), the slot of the first query).

    Positions default to counting real tokens from 0, so a left-padded row sees the same
    positions as the unpadded one; with a `cache`, the T tokens continue the cached ones.
    """
    t = attention_mask_BxT.shape[1]
    if positions_BxT is None:
        positions_BxT = positions_from_mask(attention_mask_BxT)
        if cache is not None:
            positions_BxT += jnp.sum(cache.mask_BxS, axis=-1, keepdims=True)
    if cache is None:
        keys_BxS, first = attention_mask_BxT, 0
    else:
        keys_BxS = lax.dynamic_update_slice(cache.mask_BxS, attention_mask_BxT.astype(jnp.int32), (0, cache.index))
        first = cache.index
    # Query t (at slot first + t) sees the real keys in slots up to its own.
    causal_TxS = jnp.arange(keys_BxS.shape[1])[None, :] <= first + jnp.arange(t)[:, None]
    mask_BxTxS = causal_TxS[None] & keys_BxS.astype(bool)[:, None, :]
    return positions_BxT, mask_BxTxS, keys_BxS, first


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 ([B, L, V] for the L positions of a `head_slice`)
    values: jax.Array | None  # [B, T] (or [B, L]) float32, when the model has a value head
    hidden: jax.Array  # [B, T, D]
    cache: KVCache | None  # the updated cache, when one was passed in


class ValueHead(nn.Module):
    """TRL's `v_head.summary`: a Linear from D to 1 on every position -> `[B, T]` float32."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
        # Zero kernel: a fresh head predicts 0 everywhere, so the first value loss is the
        # return scale itself rather than noise from a random projection.
        v = Dense(1, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="summary")(hidden_BxTxD)
        return v[..., 0].astype(jnp.float32)
