"""GPT-2 in Flax Linen, parameter for parameter the Hugging Face model.

Param names follow transformers (`wte`, `h_0/attn/c_attn`, ...) so `hub.py` maps them by rule.
Dropout is left out on purpose: the RLHF stages train with dropout off, as TRL does.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrlhf.models.configs import GPT2Config
from jaxrlhf.models.layers import Dense, activation, attend, merge_heads, positions_from_mask, rows_matmul, split_heads


class KVCache(NamedTuple):
    """Keys and values of every position seen so far, for decoding one token at a time.

    `layers[i]` is layer i's `(k, v)`, each `[B, S, H, K]` for S slots; `mask_BxS` is 1 on
    slots that hold a real token; `index` is the next slot to write. Made by `init_cache`.
    """

    layers: tuple[tuple[jax.Array, jax.Array], ...]
    mask_BxS: jax.Array
    index: jax.Array


def init_cache(config: GPT2Config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, max_len, config.n_head, config.n_embd // config.n_head)
    layers = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer))
    return KVCache(layers, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def _dense(features: int, config: GPT2Config, dtype, name: str) -> nn.Dense:
    return Dense(
        features,
        dtype=dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask_BxTxS: jax.Array, kv=None, index=None):
        """-> (output `[B, T, D]`, this layer's updated `(k, v)` cache or None).

        With a cache `kv`, this step's keys and values are written at slot `index` and the
        queries attend over all S slots (`mask_BxTxS` says which they may see)."""
        cfg = self.config
        qkv_BxTx3D = _dense(3 * cfg.n_embd, cfg, self.dtype, "c_attn")(x_BxTxD)
        q, k, v = (split_heads(t, cfg.n_head) for t in jnp.split(qkv_BxTx3D, 3, axis=-1))
        if kv is not None:
            k = lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
            v = lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
            kv = (k, v)
        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= (cfg.n_embd // cfg.n_head) ** 0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        out_BxTxD = merge_heads(attend(q, k, v, mask_BxTxS, scale))
        return _dense(cfg.n_embd, cfg, self.dtype, "c_proj")(out_BxTxD), kv


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        h = _dense(cfg.inner_dim, cfg, self.dtype, "c_fc")(x_BxTxD)
        h = activation(cfg.activation_function)(h)
        return _dense(cfg.n_embd, cfg, self.dtype, "c_proj")(h)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask_BxTxS: jax.Array, kv=None, index=None):
        eps = self.config.layer_norm_epsilon
        h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x_BxTxD)
        attn_BxTxD, kv = GPT2Attention(self.config, self.layer_idx, self.dtype, name="attn")(h, mask_BxTxS, kv, index)
        x_BxTxD = x_BxTxD + attn_BxTxD
        h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x_BxTxD)
        return x_BxTxD + GPT2MLP(self.config, self.dtype, name="mlp")(h), kv


class GPT2Model(nn.Module):
    """The GPT-2 trunk: token ids -> (final hidden states `[B, T, D]`, updated cache or None)."""

    config: GPT2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array | None = None,
        positions_BxT: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """`attention_mask_BxT` is 1 on real tokens (padding may be left or right); positions
        default to counting real tokens from 0, so a left-padded row sees the same positions
        as the unpadded one. With a `cache`, the T tokens continue the cached ones."""
        cfg = self.config
        b, t = input_ids_BxT.shape
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((b, t), jnp.int32)
        if positions_BxT is None:
            positions_BxT = positions_from_mask(attention_mask_BxT)
            if cache is not None:
                positions_BxT += jnp.sum(cache.mask_BxS, axis=-1, keepdims=True)
        init = nn.initializers.normal(cfg.initializer_range)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype, embedding_init=init, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=self.dtype, embedding_init=init, name="wpe")
        x_BxTxD = wte(input_ids_BxT) + wpe(positions_BxT)
        if cache is None:
            keys_BxS, first = attention_mask_BxT, 0
        else:
            keys_BxS = lax.dynamic_update_slice(cache.mask_BxS, attention_mask_BxT.astype(jnp.int32), (0, cache.index))
            first = cache.index
        # Query t (at slot first + t) sees the real keys in slots up to its own.
        causal_TxS = jnp.arange(keys_BxS.shape[1])[None, :] <= first + jnp.arange(t)[:, None]
        mask_BxTxS = causal_TxS[None] & keys_BxS.astype(bool)[:, None, :]
        layers = []
        for i in range(cfg.n_layer):
            kv = None if cache is None else cache.layers[i]
            x_BxTxD, kv = GPT2Block(cfg, i, self.dtype, name=f"h_{i}")(x_BxTxD, mask_BxTxS, kv, first)
            layers.append(kv)
        x_BxTxD = nn.LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x_BxTxD)
        new_cache = None if cache is None else KVCache(tuple(layers), keys_BxS, cache.index + t)
        return x_BxTxD, new_cache


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 ([B, L, V] for the L positions of a `head_slice`)
    values: jax.Array | None  # [B, T] (or [B, L]) float32, when the model has a value head
    hidden: jax.Array  # [B, T, D]
    cache: KVCache | None  # the updated cache, when one was passed in


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with the LM head tied to `wte`, and optionally a scalar value head for PPO.

    The value head is TRL's `v_head.summary` (a Linear from D to 1 on every position).
    """

    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    value_head: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array | None = None,
        positions_BxT: jax.Array | None = None,
        cache: KVCache | None = None,
        head_slice: slice | None = None,
    ) -> CausalLMOutput:
        """With `head_slice` (a static slice of positions), only those positions get logits and
        values: the LM head is skipped where nobody reads it (the last position in training,
        the prompt in PPO, all but the last in a prefill), and no `[B, T, V]` slice is copied."""
        trunk = GPT2Model(self.config, self.dtype, name="transformer")
        hidden_BxTxD, cache = trunk(input_ids_BxT, attention_mask_BxT, positions_BxT, cache)
        head_in_BxLxD = hidden_BxTxD if head_slice is None else hidden_BxTxD[:, head_slice]
        wte = trunk.variables["params"]["wte"]["embedding"]
        logits_BxLxV = rows_matmul(head_in_BxLxD, wte.astype(self.dtype))
        values_BxL = None
        if self.value_head:
            values_BxL = _ValueHead(self.dtype, name="v_head")(head_in_BxLxD)
        return CausalLMOutput(logits_BxLxV, values_BxL, hidden_BxTxD, cache)


class _ValueHead(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
        # Zero kernel: a fresh head predicts 0 everywhere, so the first value loss is the
        # return scale itself rather than noise from a random projection.
        v = Dense(1, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="summary")(hidden_BxTxD)
        return v[..., 0].astype(jnp.float32)
