"""GPT-2 in Flax Linen, parameter for parameter the Hugging Face model.

Param names follow transformers (`wte`, `h_0/attn/c_attn`, ...) so `hub.py` maps them by rule.
Dropout is left out on purpose: the RLHF stages train with dropout off, as TRL does.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrlhf.models.configs import GPT2Config
from jaxrlhf.models.layers import (
    CausalLMOutput,
    Dense,
    KVCache,
    LayerNorm,
    ValueHead,
    activation,
    attend,
    causal_positions_and_mask,
    heads_major,
    init_cache,
    merge_heads,
    rows_matmul,
    split_heads,
    write_cache,
)

__all__ = ["CausalLMOutput", "GPT2LMHeadModel", "GPT2Model", "KVCache", "init_cache"]


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
        k, v = heads_major(k), heads_major(v)
        if kv is not None:
            kv = k, v = write_cache(kv, k, v, index)
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
        h = LayerNorm(eps, dtype=self.dtype, name="ln_1")(x_BxTxD)
        attn_BxTxD, kv = GPT2Attention(self.config, self.layer_idx, self.dtype, name="attn")(h, mask_BxTxS, kv, index)
        x_BxTxD = x_BxTxD + attn_BxTxD
        h = LayerNorm(eps, dtype=self.dtype, name="ln_2")(x_BxTxD)
        return x_BxTxD + GPT2MLP(self.config, self.dtype, name="mlp")(h), kv


# Rematerialised: the backward pass recomputes the block's activations from its input instead
# of holding them. Same params (the same names), same gradients.
_RematBlock = nn.remat(GPT2Block)


class GPT2Model(nn.Module):
    """The GPT-2 trunk: token ids -> (final hidden states `[B, T, D]`, updated cache or None).
    `remat`: rematerialise each block when there is no cache (training and scoring passes;
    decoding with a cache has no backward pass)."""

    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

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
        positions_BxT, mask_BxTxS, keys_BxS, first = causal_positions_and_mask(attention_mask_BxT, positions_BxT, cache)
        init = nn.initializers.normal(cfg.initializer_range)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype, embedding_init=init, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=self.dtype, embedding_init=init, name="wpe")
        x_BxTxD = wte(input_ids_BxT) + wpe(positions_BxT)
        layers = []
        block = _RematBlock if self.remat and cache is None else GPT2Block
        for i in range(cfg.n_layer):
            kv = None if cache is None else cache.layers[i]
            x_BxTxD, kv = block(cfg, i, self.dtype, name=f"h_{i}")(x_BxTxD, mask_BxTxS, kv, first)
            layers.append(kv)
        x_BxTxD = LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x_BxTxD)
        new_cache = None if cache is None else KVCache(tuple(layers), keys_BxS, cache.index + t)
        return x_BxTxD, new_cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with the LM head tied to `wte`, and optionally a scalar value head for PPO.

    The value head is TRL's `v_head.summary` (a Linear from D to 1 on every position).
    """

    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    value_head: bool = False
    remat: bool = False  # see `GPT2Model`

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
        trunk = GPT2Model(self.config, self.dtype, self.remat, name="transformer")
        hidden_BxTxD, cache = trunk(input_ids_BxT, attention_mask_BxT, positions_BxT, cache)
        head_in_BxLxD = hidden_BxTxD if head_slice is None else hidden_BxTxD[:, head_slice]
        wte = trunk.variables["params"]["wte"]["embedding"]
        logits_BxLxV = rows_matmul(head_in_BxLxD, wte.astype(self.dtype))
        values_BxL = None
        if self.value_head:
            values_BxL = ValueHead(self.dtype, name="v_head")(head_in_BxLxD)
        return CausalLMOutput(logits_BxLxV, values_BxL, hidden_BxTxD, cache)
