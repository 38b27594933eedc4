"""Chat with any GPT-2 checkpoint: the conversation so far is kept in the prompt."""

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.config import SamplingSection
from jaxrlhf.data import encode_prompts
from jaxrlhf.errors import ConfigError
from jaxrlhf.sampling import generate
from jaxrlhf.stages.common import load_policy
from jaxrlhf.stages.rollout import sampling_config


@dataclasses.dataclass
class ChatSession:
    """Turns are written as `{user_prefix}{message}\\n{bot_prefix}` and the reply, cut at its
    first newline, is appended; the oldest tokens fall off past `max_prompt_tokens`."""

    checkpoint: str
    sampling: SamplingSection = dataclasses.field(default_factory=lambda: SamplingSection(max_prompt_tokens=48))
    user_prefix: str = "Request: "
    bot_prefix: str = "Reply:"
    seed: int = 0

    def __post_init__(self):
        self.module, self.params, config, self.tokenizer = load_policy(self.checkpoint)
        room = config.n_positions - self.sampling.max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens={self.sampling.max_new_tokens} leaves no room for a prompt in the "
                              f"model's n_positions={config.n_positions}")
        # A long conversation keeps its most recent tokens: as many as fit beside the reply.
        self.sampling = dataclasses.replace(self.sampling, max_prompt_tokens=min(self.sampling.max_prompt_tokens, room))
        self.settings = sampling_config(self.sampling, self.tokenizer, config)
        self.prompt_tokens = self.sampling.max_prompt_tokens
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
