"""Chat with any causal LM checkpoint (GPT-2, Llama): the conversation so far is kept in the
prompt, written with the tokenizer's chat template when it has one."""

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.config import SamplingSection
from jaxrlhf.data import encode_prompts
from jaxrlhf.errors import ConfigError
from jaxrlhf.sampling import generate
from jaxrlhf.stages.common import load_policy
from jaxrlhf.stages.rollout import decode_responses, sampling_config


@dataclasses.dataclass
class ChatSession:
    """With a tokenizer that has a chat template (and `chat_template` on), the conversation is
    a list of messages rendered by that template, and a reply ends at the model's EOS (any of
    its ids: `rollout.eos_token_ids`).
    Otherwise turns are written as `{user_prefix}{message}\\n{bot_prefix}` and the reply, cut
    at its first newline, is appended. Either way the oldest tokens fall off past
    `max_prompt_tokens`."""

    checkpoint: str
    sampling: SamplingSection = dataclasses.field(default_factory=lambda: SamplingSection(max_prompt_tokens=48))
    user_prefix: str = "Request: "
    bot_prefix: str = "Reply:"
    seed: int = 0
    chat_template: bool = True

    def __post_init__(self):
        self.module, self.params, config, self.tokenizer = load_policy(self.checkpoint)
        room = config.max_positions - self.sampling.max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens={self.sampling.max_new_tokens} leaves no room for a prompt in the "
                              f"model's {config.max_positions_key}={config.max_positions}")
        # A long conversation keeps its most recent tokens: as many as fit beside the reply.
        self.sampling = dataclasses.replace(self.sampling, max_prompt_tokens=min(self.sampling.max_prompt_tokens, room))
        self.settings = sampling_config(self.sampling, self.tokenizer, config)
        self.prompt_tokens = self.sampling.max_prompt_tokens
        self.templated = self.chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self.history = ""
        self.messages: list[dict[str, str]] = []
        self.turn = 0

    def reset(self) -> None:
        self.history = ""
        self.messages = []

    def _prompt(self, message: str) -> str:
        if self.templated:
            self.messages.append({"role": "user", "content": message})
            return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        self.history += f"{self.user_prefix}{message}\n{self.bot_prefix}"
        return self.history

    def reply(self, message: str) -> str:
        prompt = self._prompt(message)
        # One fixed prompt width, so every turn reuses the compiled sampler.
        enc = encode_prompts(self.tokenizer, [prompt], self.prompt_tokens, pad_to=self.prompt_tokens)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        key = jax.random.fold_in(jax.random.key(self.seed), self.turn)
        out = generate(self.module, self.params, jnp.asarray(ids), jnp.asarray(mask), key, self.settings)
        self.turn += 1
        text = decode_responses(self.tokenizer, out, self.settings.eos_ids)[0]
        if self.templated:
            self.messages.append({"role": "assistant", "content": text.strip()})
            return text.strip()
        text = text.split("\n")[0]
        self.history += f"{text}\n"
        return text.strip()
