"""Jitted generation for a causal LM (GPT-2, Llama) with a KV cache: one compiled call does prefill and decoding.

Prompts come left-padded (`[B, P]` ids and a 0/1 mask), so every row's next token goes in the
same column. The decode loop is a `lax.while_loop` that writes into a fixed `[B, N]` buffer and
stops early once every row has emitted EOS (any of `eos_token_id`'s ids), so shapes (and the
compiled program) never change. After EOS a row emits `pad_token_id` with response mask 0.
"""

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.errors import ConfigError
from jaxrlhf.models.configs import token_ids
from jaxrlhf.models.layers import KVCache, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. `top_k=0` and `top_p=1.0` switch those filters off; `greedy` takes
    the argmax of the processed logits. A reply ends at the first of the `eos_token_id` ids (one
    id or several, as Llama 3's configs list) it emits. Hashable: it is a static argument of the
    compiled call (a list of ids is kept as a tuple)."""

    max_new_tokens: int
    pad_token_id: int
    eos_token_id: int | tuple[int, ...] | None = None
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    return_raw_logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        token_ids(self.eos_token_id)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens={self.max_new_tokens}]")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax decoding)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 switches it off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id a reply ends on (none when `eos_token_id` is None)."""
        return token_ids(self.eos_token_id)


class GenerateOutput(NamedTuple):
    sequences: jax.Array  # [B, P + N] prompt then response, int32
    attention_mask: jax.Array  # [B, P + N] 1 on real prompt and response tokens
    response_mask: jax.Array  # [B, N] 1 up to and including EOS
    logprobs: jax.Array  # [B, N] log p of each sampled token under the processed distribution
    raw_logprobs: jax.Array | None  # [B, N] under the model's own softmax, when asked


def process_logits(logits_BxV: jax.Array, step: jax.Array, settings: SamplingConfig) -> jax.Array:
    """The logits the sampler draws from: every EOS banned before `min_new_tokens`, divided by the
    temperature, then top-k and top-p filtered (removed tokens get -inf)."""
    x = logits_BxV.astype(jnp.float32)
    vocab_V = jnp.arange(x.shape[-1])
    if settings.min_new_tokens and settings.eos_ids:
        eos_V = jnp.isin(vocab_V, jnp.array(settings.eos_ids))
        x = jnp.where((step < settings.min_new_tokens) & eos_V, -jnp.inf, x)
    if settings.temperature != 1.0:
        x = x / settings.temperature
    if 0 < settings.top_k < x.shape[-1]:
        kth_B1 = lax.top_k(x, settings.top_k)[0][:, -1:]
        x = jnp.where(x < kth_B1, -jnp.inf, x)
    if settings.top_p < 1.0:
        order_BxV = jnp.argsort(-x, axis=-1)
        sorted_BxV = jnp.take_along_axis(x, order_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below.
        keep_sorted = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < settings.top_p
        keep_BxV = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order_BxV].set(keep_sorted)
        x = jnp.where(keep_BxV, x, -jnp.inf)
    return x


def sample_categorical(keys_B: jax.Array, logits_BxV: jax.Array, chunk: int = 128) -> jax.Array:
    """One draw per row from softmax(logits), row b with its own key `keys_B[b]` -> `[B]`
    int32, by inverting the CDF (see `_draw`)."""
    return _draw(jax.vmap(_uniform)(keys_B), logits_BxV, chunk)[0]


def _uniform(key: jax.Array) -> jax.Array:
    """The one uniform in [0, 1) a row's draw takes from its key."""
    return jax.random.uniform(key, (1,))[0]


def _step_uniforms(row_keys_B: jax.Array, n: int) -> jax.Array:
    """-> `[B, N]`: row b's uniform for token t, from `fold_in(row_keys_B[b], t)`. Drawn for every
    step before the decode loop: drawn inside it, the per-row threefry compiled to two small
    while loops (with their carry copies) in every step."""
    return jax.vmap(lambda key: jax.vmap(lambda t: _uniform(jax.random.fold_in(key, t)))(jnp.arange(n)))(row_keys_B)


def _draw(u_B: jax.Array, logits_BxV: jax.Array, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """-> (one draw per row `[B]` int32, log of the softmax's normaliser `[B]`), row b at its
    uniform `u_B[b]`.

    Exact like `jax.random.categorical`, but it needs one uniform per row instead of V Gumbel
    draws, which dominate a decode step on CPU at GPT-2's vocabulary (measured 8.8 ms vs 0.5 ms
    for 16 x 50257). The search is two-level (chunk sums, then within the chunk) to avoid a
    full-vocabulary cumsum. The vocabulary is read once: the chunk sums also give the
    normaliser the drawn token's logprob needs (a separate logsumexp was a second exp pass over
    `[B, V]`), and the last, partial chunk is summed apart instead of padding `[B, V]` to a
    multiple of `chunk` (a copy per step). Tokens with -inf logits are never drawn.
    """
    b, v = logits_BxV.shape
    max_B1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    p_BxV = jnp.exp(logits_BxV - max_B1)
    whole = v - v % chunk
    mass_BxC = jnp.sum(p_BxV[:, :whole].reshape(b, -1, chunk), axis=-1)
    if whole < v:
        mass_BxC = jnp.concatenate([mass_BxC, jnp.sum(p_BxV[:, whole:], axis=-1, keepdims=True)], axis=-1)
    cdf_BxC = jnp.cumsum(mass_BxC, axis=-1)
    u_B1 = u_B[:, None] * cdf_BxC[:, -1:]

    def first_above(cdf, weights):
        # The first index whose cdf exceeds u, clamped to the last index with mass so that
        # rounding at the top end can never land on a zero-probability entry.
        idx = jnp.sum(cdf <= u_B1, axis=-1)
        last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
        return jnp.minimum(idx, last)

    c_B = first_above(cdf_BxC, mass_BxC)
    before_B1 = jnp.take_along_axis(cdf_BxC - mass_BxC, c_B[:, None], axis=-1)
    ids_BxK = c_B[:, None] * chunk + jnp.arange(chunk)
    inner_BxK = jnp.where(ids_BxK < v, jnp.take_along_axis(p_BxV, jnp.minimum(ids_BxK, v - 1), axis=-1), 0.0)
    j_B = first_above(before_B1 + jnp.cumsum(inner_BxK, axis=-1), inner_BxK)
    log_normaliser_B = max_B1[:, 0] + jnp.log(cdf_BxC[:, -1])
    return (c_B * chunk + j_B).astype(jnp.int32), log_normaliser_B


def _pick(logits_BxV, u_B, step, settings):
    """-> (token `[B]`, its processed logprob `[B]`, its raw logprob `[B]` or None)."""
    processed_BxV = process_logits(logits_BxV, step, settings)
    if settings.greedy:
        token_B = jnp.argmax(processed_BxV, axis=-1)
        log_normaliser_B = jax.nn.logsumexp(processed_BxV, axis=-1)
    else:
        token_B, log_normaliser_B = _draw(u_B, processed_BxV)

    def logit_of(x_BxV):
        return jnp.take_along_axis(x_BxV, token_B[:, None], axis=-1)[:, 0]

    raw_B = None
    if settings.return_raw_logprobs:
        raw_BxV = logits_BxV.astype(jnp.float32)
        raw_B = logit_of(raw_BxV) - jax.nn.logsumexp(raw_BxV, axis=-1)
    return token_B.astype(jnp.int32), logit_of(processed_BxV) - log_normaliser_B, raw_B


def generate(
    module: nn.Module,
    params,
    prompt_ids_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    key: jax.Array,
    settings: SamplingConfig,
    rows_B: jax.Array | None = None,
) -> GenerateOutput:
    """Sample `settings.max_new_tokens` tokens after each left-padded prompt.

    `module` is a `GPT2LMHeadModel` or `LlamaForCausalLM`; the KV cache is made here (rows split like the prompts')
    and donated to the compiled call, which updates it in place. Same shapes and settings
    reuse the compiled program. Prompts given as global arrays with rows split over a mesh
    (`parallel.put_rows`) are sampled where they are, each device its own rows. Row b draws
    token t with `fold_in(fold_in(key, r_b), t)`, r_b = `rows_B[b]` (int32, laid out like the
    prompts), by default b: its sample depends on its index (its place in the batch, or the
    index of its prompt in the data when `rows_B` says so), never on how the batch is split
    over devices or hosts.
    """
    b, p = prompt_ids_BxP.shape
    if prompt_mask_BxP.shape != (b, p):
        raise ConfigError(f"prompt mask has shape {prompt_mask_BxP.shape}; the prompt ids have {(b, p)}")
    total = p + settings.max_new_tokens
    if total > module.config.max_positions:
        raise ConfigError(
            f"prompt length {p} + max_new_tokens {settings.max_new_tokens} = {total} exceeds the model's "
            f"{module.config.max_positions_key}={module.config.max_positions}"
        )
    sharding = getattr(prompt_ids_BxP, "sharding", None)
    if isinstance(sharding, NamedSharding):  # on a mesh: each device holds its rows' cache
        cache = _rows_cache(module.config, b, total, module.dtype, sharding)()
    else:
        cache = init_cache(module.config, b, total, module.dtype)
    if rows_B is None:
        rows_B = jnp.arange(b, dtype=jnp.int32)
    out, _ = _generate(module, settings, params, cache, prompt_ids_BxP, prompt_mask_BxP, key, rows_B)
    return out


class _Carry(NamedTuple):
    """The decode loop's state: `[B, N]` output buffers written one column per step, which rows
    have ended, the KV cache, and the last token written with its mask (the next step's input)."""

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    raw_logprobs: jax.Array | None
    done_B: jax.Array
    cache: KVCache
    last_B: jax.Array
    last_alive_B: jax.Array


@functools.lru_cache(maxsize=16)
def _rows_cache(config, batch: int, max_len: int, dtype, rows: NamedSharding):
    """A compiled maker of an empty KV cache whose rows split as `rows` says (the prompts'
    sharding), built once per shape and layout: a new `jax.jit` each call would recompile."""
    make = functools.partial(init_cache, config, batch, max_len, dtype)
    row_spec = PartitionSpec(*rows.spec[:1])
    layout = jax.tree.map(lambda x: NamedSharding(rows.mesh, row_spec if x.ndim else PartitionSpec()),
                          jax.eval_shape(make))
    return jax.jit(make, out_shardings=layout)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _generate(module, settings, params, cache: KVCache, prompt_ids_BxP, prompt_mask_BxP, key, rows_B):
    """-> (GenerateOutput, final cache). Returning the cache lets XLA alias the donated input
    buffers to it, so the loop updates them in place instead of allocating a second cache."""
    b, n = prompt_ids_BxP.shape[0], settings.max_new_tokens
    eos_E = jnp.array(settings.eos_ids or (-1,), jnp.int32)  # -1: no token ends a reply
    prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)
    prefill = module.apply({"params": params}, prompt_ids_BxP, prompt_mask_BxP, cache=cache,
                           head_slice=slice(-1, None))

    row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, rows_B)
    u_BxN = _step_uniforms(row_keys_B, n)

    def record(carry: _Carry, step, logits_BxV) -> _Carry:
        """Pick token `step` from `logits_BxV` and write it into the buffers."""
        u_B = lax.dynamic_index_in_dim(u_BxN, step, axis=1, keepdims=False)
        token_B, lp_B, raw_B = _pick(logits_BxV, u_B, step, settings)
        done_B = carry.done_B
        token_B = jnp.where(done_B, settings.pad_token_id, token_B)
        raws = carry.raw_logprobs
        if raws is not None:
            raws = raws.at[:, step].set(jnp.where(done_B, 0.0, raw_B))
        return carry._replace(
            tokens=carry.tokens.at[:, step].set(token_B),
            mask=carry.mask.at[:, step].set(~done_B),
            logprobs=carry.logprobs.at[:, step].set(jnp.where(done_B, 0.0, lp_B)),
            raw_logprobs=raws,
            done_B=done_B | jnp.isin(token_B, eos_E),
            last_B=token_B,
            last_alive_B=~done_B,
        )

    zeros = jnp.zeros((b, n), jnp.float32)
    carry = _Carry(
        tokens=jnp.full((b, n), settings.pad_token_id, jnp.int32),
        mask=jnp.zeros((b, n), bool),
        logprobs=zeros,
        raw_logprobs=zeros if settings.return_raw_logprobs else None,
        done_B=jnp.zeros((b,), bool),
        cache=prefill.cache,
        last_B=jnp.zeros((b,), jnp.int32),
        last_alive_B=jnp.zeros((b,), bool),
    )
    carry = record(carry, 0, prefill.logits[:, -1])

    def cond(state):
        step, carry = state
        return (step < n) & ~jnp.all(carry.done_B)

    def body(state):
        step, carry = state
        # The last token and its mask come with the carry: reading them back from the buffers
        # the step then writes made XLA copy the mask buffer at every step.
        out = module.apply({"params": params}, carry.last_B[:, None], carry.last_alive_B[:, None].astype(jnp.int32),
                           cache=carry.cache)
        return step + 1, record(carry._replace(cache=out.cache), step, out.logits[:, 0])

    _, carry = lax.while_loop(cond, body, (jnp.int32(1), carry))
    tokens, mask = carry.tokens, carry.mask
    out = GenerateOutput(
        sequences=jnp.concatenate([prompt_ids_BxP.astype(jnp.int32), tokens], axis=1),
        attention_mask=jnp.concatenate([prompt_mask_BxP, mask.astype(jnp.int32)], axis=1),
        response_mask=mask.astype(jnp.int32),
        logprobs=carry.logprobs,
        raw_logprobs=carry.raw_logprobs,
    )
    return out, carry.cache
