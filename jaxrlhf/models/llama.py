"""Llama-family causal LMs (Llama, SmolLM, TinyLlama...) in Flax Linen, parameter for
parameter transformers' `LlamaForCausalLM`: RMSNorm, rotary positions, grouped-query
attention, a SwiGLU MLP, the LM head tied to the embedding or not.

The interface is GPT-2's (`gpt2.py`): the same positions from the mask (left padding), KV
cache, `CausalLMOutput`, optional value head and `head_slice`, so `sampling.generate` and every
update take either. Param names follow transformers (`model/layers_0/self_attn/q_proj`, ...)
so `hub.py` maps them by rule.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrlhf.models.configs import LlamaConfig
from jaxrlhf.models.layers import (
    CausalLMOutput,
    Dense,
    KVCache,
    ValueHead,
    activation,
    attend,
    causal_positions_and_mask,
    heads_major,
    merge_heads,
    rows_matmul,
    split_heads,
    write_cache,
)


class RMSNorm(nn.Module):
    """`weight * x / rms(x)`, the statistics in float32 (as transformers' `LlamaRMSNorm`)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],))
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return scale_D.astype(self.dtype) * x.astype(self.dtype)


def rotate(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, transformers' convention: dimension i and i + K/2 form a
    pair, rotated by `position / theta^(2i/K)`. The angles are computed in float32."""
    k = x_BxTxHxK.shape[-1]
    inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)
    angles_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_K2
    angles_BxTx1xK = jnp.concatenate([angles_BxTxK2, angles_BxTxK2], axis=-1)[:, :, None]
    cos, sin = jnp.cos(angles_BxTx1xK).astype(x_BxTxHxK.dtype), jnp.sin(angles_BxTx1xK).astype(x_BxTxHxK.dtype)
    x1, x2 = jnp.split(x_BxTxHxK, 2, axis=-1)
    return x_BxTxHxK * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _dense(features: int, config: LlamaConfig, dtype, bias: bool, name: str) -> nn.Dense:
    return Dense(features, use_bias=bias, dtype=dtype, kernel_init=nn.initializers.normal(config.initializer_range),
                 name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv=None, index=None):
        """-> (output `[B, T, D]`, this layer's updated `(k, v)` cache or None). The cache holds
        the `num_key_value_heads` heads (rotated keys); each serves a group of query heads."""
        cfg = self.config
        h, g, k_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = split_heads(_dense(h * k_dim, cfg, self.dtype, bias, "q_proj")(x_BxTxD), h)
        k = split_heads(_dense(g * k_dim, cfg, self.dtype, bias, "k_proj")(x_BxTxD), g)
        v = split_heads(_dense(g * k_dim, cfg, self.dtype, bias, "v_proj")(x_BxTxD), g)
        q, k = rotate(q, positions_BxT, cfg.rope_theta), rotate(k, positions_BxT, cfg.rope_theta)
        k, v = heads_major(k), heads_major(v)
        if kv is not None:
            kv = k, v = write_cache(kv, k, v, index)
        out_BxTxHxK = attend(q, k, v, mask_BxTxS, k_dim ** -0.5)
        return _dense(cfg.hidden_size, cfg, self.dtype, bias, "o_proj")(merge_heads(out_BxTxHxK)), kv


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg, self.dtype, cfg.mlp_bias, "gate_proj")(x_BxTxD)
        up = _dense(cfg.intermediate_size, cfg, self.dtype, cfg.mlp_bias, "up_proj")(x_BxTxD)
        return _dense(cfg.hidden_size, cfg, self.dtype, cfg.mlp_bias, "down_proj")(activation(cfg.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv=None, index=None):
        eps = self.config.rms_norm_eps
        h = RMSNorm(eps, self.dtype, name="input_layernorm")(x_BxTxD)
        attn_BxTxD, kv = LlamaAttention(self.config, self.dtype, name="self_attn")(h, positions_BxT, mask_BxTxS,
                                                                                   kv, index)
        x_BxTxD = x_BxTxD + attn_BxTxD
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x_BxTxD)
        return x_BxTxD + LlamaMLP(self.config, self.dtype, name="mlp")(h), kv


_RematLayer = nn.remat(LlamaDecoderLayer)  # as GPT-2's `_RematBlock`


class LlamaModel(nn.Module):
    """The trunk: token ids -> (final hidden states `[B, T, D]`, updated cache or None);
    `remat` as `GPT2Model`'s."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, cache: KVCache | None = None):
        """As `GPT2Model`: `attention_mask_BxT` is 1 on real tokens (left or right padding),
        positions count real tokens from 0, and with a `cache` the T tokens continue it."""
        cfg = self.config
        b, t = input_ids_BxT.shape
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((b, t), jnp.int32)
        positions_BxT, mask_BxTxS, keys_BxS, first = causal_positions_and_mask(attention_mask_BxT, positions_BxT, cache)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                         embedding_init=nn.initializers.normal(cfg.initializer_range), name="embed_tokens")
        x_BxTxD = embed(input_ids_BxT)
        layers = []
        layer = _RematLayer if self.remat and cache is None else LlamaDecoderLayer
        for i in range(cfg.num_hidden_layers):
            kv = None if cache is None else cache.layers[i]
            x_BxTxD, kv = layer(cfg, self.dtype, name=f"layers_{i}")(x_BxTxD, positions_BxT, mask_BxTxS, kv, first)
            layers.append(kv)
        x_BxTxD = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x_BxTxD)
        new_cache = None if cache is None else KVCache(tuple(layers), keys_BxS, cache.index + t)
        return x_BxTxD, new_cache


class LlamaForCausalLM(nn.Module):
    """The trunk with an LM head (`lm_head`, or the embedding when `tie_word_embeddings`), and
    optionally PPO's scalar value head (`v_head.summary`, as for GPT-2)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    value_head: bool = False
    remat: bool = False  # see `LlamaModel`

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, cache: KVCache | None = None,
                 head_slice: slice | None = None) -> CausalLMOutput:
        """`head_slice` (static) limits the LM and value heads to those positions, as for GPT-2."""
        cfg = self.config
        trunk = LlamaModel(cfg, self.dtype, self.remat, name="model")
        hidden_BxTxD, cache = trunk(input_ids_BxT, attention_mask_BxT, positions_BxT, cache)
        head_in_BxLxD = hidden_BxTxD if head_slice is None else hidden_BxTxD[:, head_slice]
        if cfg.tie_word_embeddings:
            w_VxD = trunk.variables["params"]["embed_tokens"]["embedding"]
        else:
            w_VxD = _Table((cfg.vocab_size, cfg.hidden_size), cfg.initializer_range, name="lm_head")()
        logits_BxLxV = rows_matmul(head_in_BxLxD, w_VxD.astype(self.dtype))
        values_BxL = ValueHead(self.dtype, name="v_head")(head_in_BxLxD) if self.value_head else None
        return CausalLMOutput(logits_BxLxV, values_BxL, hidden_BxTxD, cache)


class _Table(nn.Module):
    """An untied LM head's `[V, D]` weight, stored as HF's `lm_head.weight` is (no transpose)."""

    shape: tuple[int, int]
    std: float

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.initializers.normal(self.std), self.shape)
