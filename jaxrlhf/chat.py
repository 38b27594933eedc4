"""Chat with any GPT-2 checkpoint: the conversation so far is kept in the prompt."""

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.data import encode_prompts
from jaxrlhf.errors import ConfigError
from jaxrlhf.models import load_pretrained, load_tokenizer
from jaxrlhf.sampling import SamplingConfig, generate


@dataclasses.dataclass
class ChatSession:
    """Turns are written as `{user_prefix}{message}\\n{bot_prefix}` and the reply, cut at its
    first newline, is appended; the oldest tokens fall off past `max_prompt_tokens`."""

    checkpoint: str
    user_prefix: str = "Request: "
    bot_prefix: str = "Reply:"
    max_prompt_tokens: int = 48
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0

    def __post_init__(self):
        self.module, self.params, config = load_pretrained(self.checkpoint, head="lm")
        self.tokenizer = load_tokenizer(self.checkpoint, config)
        self.settings = SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            greedy=self.greedy, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        self.prompt_tokens = min(self.max_prompt_tokens, config.n_positions - self.max_new_tokens)
        if self.prompt_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the model's "
                              f"n_positions={config.n_positions}")
        self.history = ""
        self.turn = 0

    def reset(self) -> None:
        self.history = ""

    def reply(self, message: str) -> str:
        self.history += f"{self.user_prefix}{message}\n{self.bot_prefix}"
        # One fixed prompt width, so every turn reuses the compiled sampler.
        ids, mask = encode_prompts(self.tokenizer, [self.history], self.prompt_tokens, pad_to=self.prompt_tokens)
        key = jax.random.fold_in(jax.random.key(self.seed), self.turn)
        out = generate(self.module, self.params, jnp.asarray(ids), jnp.asarray(mask), key, self.settings)
        self.turn += 1
        p = ids.shape[1]
        tokens = out.sequences[0, p:][out.response_mask[0] == 1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0]
        self.history += f"{text}\n"
        return text.strip()
