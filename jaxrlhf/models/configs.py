"""Model configs: frozen dataclasses with the field names of the Hugging Face config.json.

`from_hf` reads a config.json dict (unknown keys are ignored, as transformers does for keys it
does not use); `to_hf` writes one back that transformers loads unchanged.
"""

import dataclasses
import typing
from typing import Any, ClassVar

from jaxrlhf.errors import ConfigError
from jaxrlhf.models.layers import activation


@dataclasses.dataclass(frozen=True)
class _HFConfig:
    model_type: ClassVar[str]

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json"):
        """Build from a config.json dict; `where` names its source in errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in fields}
        if isinstance(kwargs.get("eos_token_id"), list):  # a tuple keeps the config hashable (a static jit argument)
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if "id2label" in fields and "id2label" in hf:
            id2label = hf["id2label"]
            kwargs["id2label"] = tuple(id2label[k] for k in sorted(id2label, key=int))
            kwargs["num_labels"] = len(id2label)
        try:
            token_ids(kwargs.get("eos_token_id"))
            return cls(**kwargs)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = typing.get_args(f.type) or (f.type,)
            allowed = tuple(typing.get_origin(t) or t for t in allowed)
            ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise ConfigError(f"{f.name}={value!r} must be {names}")

    def to_hf(self, architecture: str) -> dict[str, Any]:
        hf = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("id2label", "num_labels")}
        labels = getattr(self, "id2label", None)
        if labels is not None:
            hf["id2label"] = {str(i): label for i, label in enumerate(labels)}
            hf["label2id"] = {label: i for i, label in enumerate(labels)}
        hf["model_type"] = self.model_type
        hf["architectures"] = [architecture]
        return hf

    def _check_heads(self, width: int, heads: int, width_key: str, heads_key: str) -> None:
        if heads <= 0 or width % heads:
            raise ConfigError(f"{width_key}={width} must be a multiple of {heads_key}={heads}")


def token_ids(value: Any, key: str = "eos_token_id") -> tuple[int, ...]:
    """`eos_token_id` as config.json, generation_config.json or the sampler settings hold it
    (an id, a list of ids as Llama 3's, or null) -> the ids, `()` for null."""
    ids = () if value is None else tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{key}={value!r} must be a token id or a list of them (ints >= 0), or null")
    return ids


def _labels(num_labels: int, id2label: tuple[str, ...] | None) -> tuple[str, ...]:
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(id2label) != num_labels:
        raise ConfigError(f"num_labels={num_labels} but id2label has {len(id2label)} labels")
    return tuple(id2label)


@dataclasses.dataclass(frozen=True)
class GPT2Config(_HFConfig):
    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None means 4 * n_embd, as in transformers
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple | None = 50256  # one id or several (see `token_ids`)
    pad_token_id: int | None = None

    def __post_init__(self):
        self._check_types()
        self._check_heads(self.n_embd, self.n_head, "n_embd", "n_head")
        activation(self.activation_function, "activation_function")

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    # The causal-LM interface the stages and the sampler use, whatever the family: the
    # context length, the config.json key that sets it (for errors), the KV cache's dims.
    max_positions_key: ClassVar[str] = "n_positions"

    @property
    def max_positions(self) -> int:
        return self.n_positions

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim) of the KV cache."""
        return self.n_layer, self.n_head, self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class LlamaConfig(_HFConfig):
    """Llama-family causal LMs (Llama 2/3, SmolLM, TinyLlama...): RMSNorm, rotary positions,
    grouped-query attention, SwiGLU. `rope_parameters` of config.json are read into
    `rope_theta` (only the unscaled "default" rotary embedding is supported)."""

    model_type: ClassVar[str] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None means num_attention_heads (no grouping)
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple | None = 2  # Llama 3 lists several
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json"):
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_type={rope_type!r} is not supported; only the unscaled 'default' "
                              "rotary embedding is")
        hf = dict(hf)
        if "rope_theta" in rope:
            hf["rope_theta"] = rope["rope_theta"]
        if hf.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported; only 1 is")
        return super().from_hf(hf, where)

    def __post_init__(self):
        self._check_types()
        self._check_heads(self.hidden_size, self.num_attention_heads, "hidden_size", "num_attention_heads")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self._check_heads(self.num_attention_heads, self.num_key_value_heads, "num_attention_heads",
                          "num_key_value_heads")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)")
        activation(self.hidden_act, "hidden_act")

    def to_hf(self, architecture: str) -> dict[str, Any]:
        hf = super().to_hf(architecture)
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": hf.pop("rope_theta")}
        return hf

    max_positions_key: ClassVar[str] = "max_position_embeddings"

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim) of the KV cache."""
        return self.num_hidden_layers, self.num_key_value_heads, self.head_dim


@dataclasses.dataclass(frozen=True)
class BertConfig(_HFConfig):
    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    num_labels: int = 2
    id2label: tuple[str, ...] | None = None
    problem_type: str | None = None

    def __post_init__(self):
        self._check_types()
        self._check_heads(self.hidden_size, self.num_attention_heads, "hidden_size", "num_attention_heads")
        activation(self.hidden_act, "hidden_act")
        if self.position_embedding_type != "absolute":
            raise ConfigError(
                f"position_embedding_type={self.position_embedding_type!r} is not supported; "
                "only 'absolute' is"
            )
        if self.is_decoder:
            raise ConfigError("is_decoder=true is not supported; jaxrlhf's BERT is an encoder")
        object.__setattr__(self, "id2label", _labels(self.num_labels, self.id2label))


@dataclasses.dataclass(frozen=True)
class DistilBertConfig(_HFConfig):
    model_type: ClassVar[str] = "distilbert"
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    activation: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    num_labels: int = 2
    id2label: tuple[str, ...] | None = None
    problem_type: str | None = None

    # DistilBERT's layer norms use a fixed epsilon (transformers hard-codes it too).
    layer_norm_eps: ClassVar[float] = 1e-12

    def __post_init__(self):
        self._check_types()
        self._check_heads(self.dim, self.n_heads, "dim", "n_heads")
        activation(self.activation, "activation")
        object.__setattr__(self, "id2label", _labels(self.num_labels, self.id2label))
