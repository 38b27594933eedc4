"""GPT-2 in Flax Linen, parameter for parameter the Hugging Face model.

Param names follow transformers (`wte`, `h_0/attn/c_attn`, ...) so `hub.py` maps them by rule.
Dropout is left out on purpose: the RLHF stages train with dropout off, as TRL does.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrlhf.models.configs import GPT2Config
from jaxrlhf.models.layers import activation, attend, merge_heads, positions_from_mask, split_heads


def _dense(features: int, config: GPT2Config, dtype, name: str) -> nn.Dense:
    return nn.Dense(
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
    def __call__(self, x_BxTxD: jax.Array, mask_BxTxS: jax.Array) -> jax.Array:
        cfg = self.config
        qkv_BxTx3D = _dense(3 * cfg.n_embd, cfg, self.dtype, "c_attn")(x_BxTxD)
        q, k, v = (split_heads(t, cfg.n_head) for t in jnp.split(qkv_BxTx3D, 3, axis=-1))
        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= (cfg.n_embd // cfg.n_head) ** 0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        out_BxTxD = merge_heads(attend(q, k, v, mask_BxTxS, scale))
        return _dense(cfg.n_embd, cfg, self.dtype, "c_proj")(out_BxTxD)


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
    def __call__(self, x_BxTxD: jax.Array, mask_BxTxS: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_epsilon
        h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x_BxTxD)
        x_BxTxD = x_BxTxD + GPT2Attention(self.config, self.layer_idx, self.dtype, name="attn")(h, mask_BxTxS)
        h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x_BxTxD)
        return x_BxTxD + GPT2MLP(self.config, self.dtype, name="mlp")(h)


class GPT2Model(nn.Module):
    """The GPT-2 trunk: token ids -> final hidden states `[B, T, D]`."""

    config: GPT2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array | None = None,
        positions_BxT: jax.Array | None = None,
    ) -> jax.Array:
        """`attention_mask_BxT` is 1 on real tokens (padding may be left or right); positions
        default to counting real tokens from 0, so a left-padded row sees the same positions
        as the unpadded one."""
        cfg = self.config
        b, t = input_ids_BxT.shape
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((b, t), jnp.int32)
        if positions_BxT is None:
            positions_BxT = positions_from_mask(attention_mask_BxT)
        init = nn.initializers.normal(cfg.initializer_range)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype, embedding_init=init, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=self.dtype, embedding_init=init, name="wpe")
        x_BxTxD = wte(input_ids_BxT) + wpe(positions_BxT)
        causal_TxT = jnp.tril(jnp.ones((t, t), bool))
        mask_BxTxS = causal_TxT[None] & attention_mask_BxT.astype(bool)[:, None, :]
        for i in range(cfg.n_layer):
            x_BxTxD = GPT2Block(cfg, i, self.dtype, name=f"h_{i}")(x_BxTxD, mask_BxTxS)
        return nn.LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x_BxTxD)


class CausalLMOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    values: jax.Array | None  # [B, T] float32, when the model has a value head
    hidden: jax.Array  # [B, T, D]


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
    ) -> CausalLMOutput:
        trunk = GPT2Model(self.config, self.dtype, name="transformer")
        hidden_BxTxD = trunk(input_ids_BxT, attention_mask_BxT, positions_BxT)
        wte = trunk.variables["params"]["wte"]["embedding"]
        logits_BxTxV = jnp.einsum("btd,vd->btv", hidden_BxTxD, wte.astype(self.dtype))
        values_BxT = None
        if self.value_head:
            values_BxT = _ValueHead(self.dtype, name="v_head")(hidden_BxTxD)
        return CausalLMOutput(logits_BxTxV.astype(jnp.float32), values_BxT, hidden_BxTxD)


class _ValueHead(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
        # Zero kernel: a fresh head predicts 0 everywhere, so the first value loss is the
        # return scale itself rather than noise from a random projection.
        v = nn.Dense(1, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="summary")(hidden_BxTxD)
        return v[..., 0].astype(jnp.float32)
