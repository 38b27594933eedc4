"""BERT and DistilBERT encoders in Flax Linen, with the sequence-classification heads of their
Hugging Face checkpoints (`num_labels=1` is a regression head: the reward model).

Both are the same post-LayerNorm encoder; they differ in embeddings, head and HF tensor names
(the names live in `hub.py`). Dropout is left out: reward scoring and regression training here
run without it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrlhf.models.configs import BertConfig, DistilBertConfig
from jaxrlhf.models.layers import Dense, LayerNorm, activation, attend, heads_major, merge_heads, split_heads


def _init(config):
    return nn.initializers.normal(config.initializer_range)


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward blocks, each followed by residual + LayerNorm."""

    num_heads: int
    intermediate_size: int
    act: str
    eps: float
    initializer_range: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask_BxTxS: jax.Array) -> jax.Array:
        d = x_BxTxD.shape[-1]

        def dense(features, name):
            init = nn.initializers.normal(self.initializer_range)
            return Dense(features, dtype=self.dtype, kernel_init=init, name=name)

        q, k, v = (split_heads(dense(d, n)(x_BxTxD), self.num_heads) for n in ("query", "key", "value"))
        scale = (d // self.num_heads) ** -0.5
        # The named scopes label these ops in profiles (benchmarks/reward_profile.py).
        with jax.named_scope("attention"):
            context_BxTxHxK = attend(q, heads_major(k), heads_major(v), mask_BxTxS, scale)
        attn_BxTxD = dense(d, "attn_out")(merge_heads(context_BxTxHxK))
        x_BxTxD = LayerNorm(self.eps, dtype=self.dtype, name="attn_ln")(attn_BxTxD + x_BxTxD)
        h = dense(self.intermediate_size, "ffn_in")(x_BxTxD)
        with jax.named_scope("activation"):
            h = activation(self.act)(h)
        return LayerNorm(self.eps, dtype=self.dtype, name="ffn_ln")(dense(d, "ffn_out")(h) + x_BxTxD)


# Rematerialised (the backward pass recomputes the layer's activations from its input); same
# params, same gradients.
_RematEncoderLayer = nn.remat(EncoderLayer)


def _encoder_layer(remat: bool) -> type[nn.Module]:
    return _RematEncoderLayer if remat else EncoderLayer


def _encoder_mask(attention_mask_BxT: jax.Array, t: int) -> jax.Array:
    return jnp.broadcast_to(attention_mask_BxT.astype(bool)[:, None, :], (attention_mask_BxT.shape[0], t, t))


def _positions(positions_BxT, b: int, t: int) -> jax.Array:
    # BERT-style models use absolute positions 0..T-1 and expect right padding.
    return jnp.broadcast_to(jnp.arange(t), (b, t)) if positions_BxT is None else positions_BxT


class BertModel(nn.Module):
    """BERT: token ids -> (hidden states `[B, T, D]`, pooled `[B, D]` or None)."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    add_pooling_layer: bool = True
    remat: bool = False  # rematerialise each encoder layer

    @nn.compact
    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxT: jax.Array | None = None,
        token_type_ids_BxT: jax.Array | None = None,
        positions_BxT: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        b, t = input_ids_BxT.shape
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((b, t), jnp.int32)
        if token_type_ids_BxT is None:
            token_type_ids_BxT = jnp.zeros((b, t), jnp.int32)
        x_BxTxD = _BertEmbeddings(cfg, self.dtype, name="embeddings")(
            input_ids_BxT, token_type_ids_BxT, _positions(positions_BxT, b, t)
        )
        mask_BxTxS = _encoder_mask(attention_mask_BxT, t)
        for i in range(cfg.num_hidden_layers):
            x_BxTxD = _encoder_layer(self.remat)(
                cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps,
                cfg.initializer_range, self.dtype, name=f"layer_{i}",
            )(x_BxTxD, mask_BxTxS)
        pooled_BxD = None
        if self.add_pooling_layer:
            dense = Dense(cfg.hidden_size, dtype=self.dtype, kernel_init=_init(cfg), name="pooler")
            pooled_BxD = jnp.tanh(dense(x_BxTxD[:, 0]))
        return x_BxTxD, pooled_BxD


class _BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_BxT, token_type_ids_BxT, positions_BxT) -> jax.Array:
        cfg = self.config

        def embed(n, name):
            return nn.Embed(n, cfg.hidden_size, dtype=self.dtype, embedding_init=_init(cfg), name=name)

        x_BxTxD = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids_BxT)
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids_BxT)
            + embed(cfg.max_position_embeddings, "position_embeddings")(positions_BxT)
        )
        return LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x_BxTxD)


class BertForSequenceClassification(nn.Module):
    """BERT + a linear head on the pooled [CLS] state -> logits `[B, num_labels]` (float32)."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # rematerialise each encoder layer

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, token_type_ids_BxT=None, positions_BxT=None):
        _, pooled_BxD = BertModel(self.config, self.dtype, remat=self.remat, name="bert")(
            input_ids_BxT, attention_mask_BxT, token_type_ids_BxT, positions_BxT
        )
        head = nn.Dense(self.config.num_labels, dtype=self.dtype, kernel_init=_init(self.config), name="classifier")
        return head(pooled_BxD).astype(jnp.float32)


class DistilBertModel(nn.Module):
    """DistilBERT: token ids -> hidden states `[B, T, D]` (no token types, no pooler)."""

    config: DistilBertConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # rematerialise each encoder layer

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None) -> jax.Array:
        cfg = self.config
        b, t = input_ids_BxT.shape
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones((b, t), jnp.int32)
        x_BxTxD = _DistilBertEmbeddings(cfg, self.dtype, name="embeddings")(
            input_ids_BxT, _positions(positions_BxT, b, t)
        )
        mask_BxTxS = _encoder_mask(attention_mask_BxT, t)
        for i in range(cfg.n_layers):
            x_BxTxD = _encoder_layer(self.remat)(
                cfg.n_heads, cfg.hidden_dim, cfg.activation, cfg.layer_norm_eps, cfg.initializer_range,
                self.dtype, name=f"layer_{i}",
            )(x_BxTxD, mask_BxTxS)
        return x_BxTxD


class _DistilBertEmbeddings(nn.Module):
    config: DistilBertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_BxT, positions_BxT) -> jax.Array:
        cfg = self.config

        def embed(n, name):
            return nn.Embed(n, cfg.dim, dtype=self.dtype, embedding_init=_init(cfg), name=name)

        x_BxTxD = embed(cfg.vocab_size, "word_embeddings")(input_ids_BxT) + embed(
            cfg.max_position_embeddings, "position_embeddings"
        )(positions_BxT)
        return LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x_BxTxD)


class DistilBertForSequenceClassification(nn.Module):
    """DistilBERT + ReLU(pre_classifier) + classifier on the [CLS] state -> `[B, num_labels]`."""

    config: DistilBertConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # rematerialise each encoder layer

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None):
        cfg = self.config
        hidden_BxTxD = DistilBertModel(cfg, self.dtype, self.remat, name="distilbert")(
            input_ids_BxT, attention_mask_BxT, positions_BxT
        )
        h_BxD = Dense(cfg.dim, dtype=self.dtype, kernel_init=_init(cfg), name="pre_classifier")(hidden_BxTxD[:, 0])
        head = nn.Dense(cfg.num_labels, dtype=self.dtype, kernel_init=_init(cfg), name="classifier")
        return head(jax.nn.relu(h_BxD)).astype(jnp.float32)
