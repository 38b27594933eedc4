"""Building blocks shared by GPT-2, BERT and DistilBERT.

Shapes are in the names: B batch, T query length, S key length, H heads, K head dim, D width.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrlhf.errors import ConfigError

# The activations Hugging Face configs name (transformers' ACT2FN), with the same formulas.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
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
    """

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        y = super().__call__(x_NxD.reshape(-1, x_NxD.shape[-1]))
        return y.reshape(*x_NxD.shape[:-1], y.shape[-1])


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
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    mask_BxTxS: jax.Array,
    scale: float,
) -> jax.Array:
    """Softmax attention in float32 (scores accumulated in float32 from bf16 q and k too);
    `mask_BxTxS` is True where a query may see a key.

    A query that sees no key at all (a left-pad position) gets a uniform average instead of
    NaN; its output is garbage by design and callers mask it out.
    """
    # Heads-major operands make every head's product one contiguous batched matmul: timed
    # alone on CPU, 2-25% faster (fwd + grad) than contracting the [B, T, H, K] layout.
    q_BxHxTxK, k_BxHxSxK, v_BxHxSxK = (x.transpose(0, 2, 1, 3) for x in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK))
    logits_BxHxTxS = jnp.einsum("bhtk,bhsk->bhts", q_BxHxTxK, k_BxHxSxK, preferred_element_type=jnp.float32)
    logits_BxHxTxS = jnp.where(
        mask_BxTxS[:, None], logits_BxHxTxS * scale, jnp.finfo(jnp.float32).min
    )
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(v_BxSxHxK.dtype)
    return jnp.einsum("bhts,bhsk->bhtk", probs_BxHxTxS, v_BxHxSxK).transpose(0, 2, 1, 3)


def split_heads(x_BxTxD: jax.Array, num_heads: int) -> jax.Array:
    b, t, d = x_BxTxD.shape
    return x_BxTxD.reshape(b, t, num_heads, d // num_heads)


def merge_heads(x_BxTxHxK: jax.Array) -> jax.Array:
    b, t, h, k = x_BxTxHxK.shape
    return x_BxTxHxK.reshape(b, t, h * k)


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
    """Position ids that start at 0 on each row's first real token (left padding aware)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)
