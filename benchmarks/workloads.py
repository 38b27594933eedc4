"""What each benchmark runs: model sizes, batch shapes, the shared random data, and the model
FLOPs of one step. NumPy only, so every worker (JAX or PyTorch) builds the same inputs."""

import dataclasses

import numpy as np

GPT2_VOCAB = 50257
EOS = GPT2_VOCAB - 1  # GPT-2's <|endoftext|>, also the pad token
GPT2_SIZES = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768),
}
# SmolLM2-135M's shape (a Llama: grouped-query attention, tied embeddings), random-init.
LLAMA_SIZES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}
# all-MiniLM-L6-v2's shape, random-init.
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str  # sft, generation, dpo, ppo, reward
    size: str  # a GPT2_SIZES or LLAMA_SIZES key, or "minilm"
    batch: int
    prompt: int  # prompt tokens (SFT: tokens without loss)
    response: int  # response / new tokens (reward: all tokens)

    @property
    def label(self) -> str:
        return f"{self.name} / {self.size}"

    def model_config(self) -> dict:
        if self.size == "minilm":
            return {"model_type": "bert", "num_labels": 1, **MINILM}
        if self.size in LLAMA_SIZES:
            return {"model_type": "llama", **LLAMA_SIZES[self.size]}
        return {"model_type": "gpt2", "vocab_size": GPT2_VOCAB, **GPT2_SIZES[self.size]}

    @property
    def vocab(self) -> int:
        return self.model_config()["vocab_size"]

    @property
    def eos(self) -> int:
        """The last id: EOS and pad (GPT-2's <|endoftext|>; for the others just an id never sampled as input)."""
        return self.vocab - 1

    def tokens(self) -> int:
        """Tokens one step processes, the tokens/s numerator: new tokens for generation and
        PPO rollouts; every sequence token for the training steps."""
        if self.name in ("generation", "ppo", "rloo", "grpo"):
            return self.batch * self.response
        pairs = 2 if self.name == "dpo" else 1
        return pairs * self.batch * (self.prompt + self.response)


def workloads(quick: bool) -> list[Workload]:
    if quick:  # every workload once, on short batches: the harness end to end in a test's time
        return [Workload(name, "tiny", batch=8, prompt=8, response=16)
                for name in ("sft", "generation", "dpo", "ppo", "rloo", "grpo")] + [
            Workload("reward", "minilm", batch=8, prompt=0, response=16)]
    out = []
    for size in ("tiny", "gpt2-small"):
        out += [
            Workload("sft", size, batch=8, prompt=32, response=96),
            Workload("generation", size, batch=16, prompt=8, response=48),
            Workload("dpo", size, batch=8, prompt=32, response=96),  # 8 pairs of 128 tokens
            Workload("ppo", size, batch=16, prompt=16, response=48),  # 16 rollouts of 48 tokens
            # 4 prompts x 4 samples of 48 tokens (GROUP_SIZE), one update each, like TRL's defaults
            Workload("rloo", size, batch=16, prompt=16, response=48),
            Workload("grpo", size, batch=16, prompt=16, response=48),
        ]
    # the pretrained policy's shape: the SFT step and generation
    out += [Workload("sft", "smollm2-135m", batch=8, prompt=32, response=96),
            Workload("generation", "smollm2-135m", batch=16, prompt=8, response=48)]
    # decoding at a batch where each weight read serves 4x the rows (RESULTS.md, the decode profile)
    out += [Workload("generation", size, batch=64, prompt=8, response=48) for size in ("gpt2-small", "smollm2-135m")]
    return out + [Workload("reward", "minilm", batch=32, prompt=0, response=64)]


PPO_EPOCHS = 4
GROUP_SIZE = 4  # RLOO's and GRPO's samples per prompt
GROUP_BETA = 0.05  # their KL coefficient (so both sides score the reference)
LEARNING_RATE = 1e-5


# --- the data: random token ids, the same in every worker --------------------------------

def _ids(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    # Never EOS/pad, so no sequence ends early and padding-aware code sees full rows.
    return rng.integers(0, vocab - 1, size=shape).astype(np.int64)


def sft_batch(w: Workload) -> dict[str, np.ndarray]:
    """`input_ids` `[B, P + R]` and `loss_mask` (1 on the R response tokens)."""
    ids = _ids(np.random.default_rng(1), (w.batch, w.prompt + w.response), w.vocab)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, w.prompt:] = 1
    return {"input_ids": ids, "loss_mask": loss_mask}


def prompts(w: Workload) -> np.ndarray:
    """Prompt ids `[B, P]` (generation, PPO; RLOO and GRPO: each of B / GROUP_SIZE prompts
    GROUP_SIZE times in a row)."""
    if w.name in ("rloo", "grpo"):
        return np.repeat(_ids(np.random.default_rng(2), (w.batch // GROUP_SIZE, w.prompt), w.vocab), GROUP_SIZE, 0)
    return _ids(np.random.default_rng(2), (w.batch, w.prompt), w.vocab)


def preference_pairs(w: Workload) -> dict[str, np.ndarray]:
    """`prompt` `[B, P]`, `chosen` and `rejected` `[B, R]`, each response ending in EOS."""
    rng = np.random.default_rng(3)
    out = {"prompt": _ids(rng, (w.batch, w.prompt), GPT2_VOCAB)}
    for k in ("chosen", "rejected"):
        out[k] = np.concatenate([_ids(rng, (w.batch, w.response - 1), GPT2_VOCAB),
                                 np.full((w.batch, 1), EOS)], axis=1)
    return out


def regression_batch(w: Workload) -> dict[str, np.ndarray]:
    """BERT `input_ids` `[B, T]` (starting with [CLS] = 101) and float `target` `[B]`."""
    rng = np.random.default_rng(4)
    ids = rng.integers(1000, MINILM["vocab_size"], size=(w.batch, w.response)).astype(np.int64)
    ids[:, 0] = 101
    return {"input_ids": ids, "target": rng.normal(size=w.batch).astype(np.float32)}


def ppo_heads(d_model: int) -> dict[str, np.ndarray]:
    """The value head and the reward model's score head, `[D]` each (the trunks are the policy's)."""
    rng = np.random.default_rng(5)
    return {k: (0.02 * rng.normal(size=d_model)).astype(np.float32) for k in ("value", "reward")}


# --- model FLOPs -------------------------------------------------------------------------
# Matmul FLOPs only (2 per multiply-add), attention scores over the full key length (no
# causal halving), as in the usual MFU accounting. A training step costs 3 forwards.

def _forward_flops(w: Workload, tokens: int, context: int, lm_head: bool = True) -> float:
    cfg = w.model_config()
    if cfg["model_type"] == "bert":
        d, layers, ffn = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
        per_token = layers * (2 * 4 * d * d + 2 * 2 * d * ffn + 2 * 2 * context * d)
        return tokens * per_token
    if cfg["model_type"] == "llama":
        d, layers, ffn, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
        q = d  # heads x head dim; keys and values have num_key_value_heads / num_attention_heads of it
        kv = q * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
        per_token = layers * (2 * d * (2 * q + 2 * kv) + 2 * 3 * d * ffn + 2 * 2 * context * q)
        return tokens * (per_token + (2 * d * v if lm_head else 0))
    d, layers = cfg["n_embd"], cfg["n_layer"]
    per_token = layers * (2 * 12 * d * d + 2 * 2 * context * d) + (2 * d * GPT2_VOCAB if lm_head else 0)
    return tokens * per_token


def _generation_flops(w: Workload) -> float:
    prefill = _forward_flops(w, w.batch * w.prompt, w.prompt)
    decode = sum(_forward_flops(w, w.batch, w.prompt + i + 1) for i in range(w.response))
    return prefill + decode


def step_flops(w: Workload) -> float:
    """Model FLOPs of one step of the workload: the work itself, the same for both sides."""
    t = w.prompt + w.response
    if w.name == "sft":
        return 3 * _forward_flops(w, w.batch * t, t)
    if w.name == "generation":
        return _generation_flops(w)
    if w.name == "dpo":  # policy forward + backward and reference forward on 2B sequences
        return 4 * _forward_flops(w, 2 * w.batch * t, t)
    if w.name == "ppo":  # rollout, reference and reward-model scoring, then the epochs
        score = _forward_flops(w, w.batch * t, t) + _forward_flops(w, w.batch * t, t, lm_head=False)
        return _generation_flops(w) + score + PPO_EPOCHS * 3 * _forward_flops(w, w.batch * t, t)
    if w.name in ("rloo", "grpo"):  # rollout, reward-model and reference scoring, one update
        score = _forward_flops(w, w.batch * t, t) + _forward_flops(w, w.batch * t, t, lm_head=False)
        return _generation_flops(w) + score + 3 * _forward_flops(w, w.batch * t, t)
    if w.name == "reward":
        return 3 * _forward_flops(w, w.batch * w.response, w.response)
    raise ValueError(f"unknown workload {w.name!r}")
