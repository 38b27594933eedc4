"""Sampling responses from a policy for a batch of prompts, and turning them back into text:
shared by PPO, preference-pair making and evaluation."""

import numpy as np

from jaxrlhf import data, parallel
from jaxrlhf.config import SamplingSection, check
from jaxrlhf.rewards import penalise_missing_eos
from jaxrlhf.stages.common import check_context
from jaxrlhf.sampling import GenerateOutput, SamplingConfig, generate

# The column every stage that samples from prompts reads, with an example row.
PROMPT_COLUMNS = {"prompts": {"prompt": "Request: Can you fix my bike?\nReply:"}}


def check_on_policy(section: SamplingSection, temperature: float, method: str, key: str) -> None:
    """An update that scores old, reference and new logprobs under the tempered softmax needs
    rollouts drawn from it: the same temperature (`key`.temperature), no top-k / top-p /
    greedy / min_new_tokens."""
    check(temperature == section.temperature,
          f"{key}.temperature={temperature} must equal sampling.temperature={section.temperature} "
          "(the update must score tokens under the distribution that sampled them)")
    off_policy = {"sampling.top_k": section.top_k != 0, "sampling.top_p": section.top_p != 1.0,
                  "sampling.greedy": section.greedy, "sampling.min_new_tokens": section.min_new_tokens != 0}
    changed = [k for k, on in off_policy.items() if on]
    check(not changed, f"{', '.join(changed)} would make {method} off-policy: the update scores old, reference and "
                       "new logprobs under the tempered softmax, so rollouts must be drawn from it (set "
                       "top_k: 0, top_p: 1.0, greedy: false, min_new_tokens: 0)")


def sampling_config(section: SamplingSection, tokenizer, model_config) -> SamplingConfig:
    """The sampler settings, after checking that prompt + response fit the model's context."""
    check_context(section.max_prompt_tokens + section.max_new_tokens,
                  f"sampling.max_prompt_tokens={section.max_prompt_tokens} + sampling.max_new_tokens="
                  f"{section.max_new_tokens}", model_config)
    return SamplingConfig(
        max_new_tokens=section.max_new_tokens, min_new_tokens=section.min_new_tokens,
        temperature=section.temperature, top_k=section.top_k, top_p=section.top_p, greedy=section.greedy,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def encode_prompt_rows(rows, tokenizer, section: SamplingSection, seed: int):
    """All prompts, left-padded to one width (one compiled shape) -> ids, mask, the texts the
    policy actually sees (after any truncation)."""
    ids, mask = data.encode_prompts(tokenizer, [r["prompt"] for r in rows], section.max_prompt_tokens,
                                    section.prompt_length_range, seed)
    texts = [tokenizer.decode(i[m == 1]) for i, m in zip(ids, mask)]
    return ids, mask, texts


def decode_responses(tokenizer, out) -> list[str]:
    """Response text of each row: its real tokens, EOS dropped."""
    p = out.sequences.shape[1] - out.response_mask.shape[1]
    seqs, masks = np.asarray(out.sequences[:, p:]), np.asarray(out.response_mask)
    return [tokenizer.decode(s[m == 1], skip_special_tokens=True) for s, m in zip(seqs, masks)]


def sample(module, params, ids_BxP, mask_BxP, key, settings: SamplingConfig, mesh) -> GenerateOutput:
    """Sample responses for host prompt arrays (the whole batch, on every process), each
    device sampling its own rows; `params` laid out on `mesh` -> the rollout as numpy arrays,
    whole, on every process."""
    ids, mask = parallel.put_rows((ids_BxP, mask_BxP), mesh)
    return parallel.gather(generate(module, params, ids, mask, parallel.put_replicated(key, mesh), settings))


def scored_batch(rollout: GenerateOutput, prompt_texts: list[str], tokenizer, scorer,
                 missing_eos_penalty: float | None) -> dict:
    """A sampled rollout and the reward of each response (to its prompt text) -> the
    update's batch: `sequences`, `attention_mask`, `response_mask`, `scores`."""
    scores = scorer(prompt_texts, decode_responses(tokenizer, rollout))
    if missing_eos_penalty is not None:
        scores = penalise_missing_eos(scores, rollout, tokenizer.eos_token_id, missing_eos_penalty)
    return {"sequences": rollout.sequences, "attention_mask": rollout.attention_mask,
            "response_mask": rollout.response_mask, "scores": scores}
