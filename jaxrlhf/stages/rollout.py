"""Sampling responses from a policy for a batch of prompts, and turning them back into text:
shared by the stages that train on their own samples (PPO, RLOO, GRPO, online DPO),
preference-pair making and evaluation."""

import jax
import numpy as np

from jaxrlhf import data, diagnostics, parallel
from jaxrlhf.config import DataConfig, SamplingSection, check
from jaxrlhf.errors import ConfigError
from jaxrlhf.models.configs import token_ids
from jaxrlhf.rewards import make_scorer, penalise_missing_eos, reward_models, source_metrics
from jaxrlhf.stages import common
from jaxrlhf.sampling import GenerateOutput, SamplingConfig, generate

# The column every stage that samples from prompts reads, with an example row of each form: a
# text the reply continues, or a conversation the policy's chat template renders (TRL's forms).
PROMPT_COLUMNS = {"prompts": {"prompt": "Request: Can you fix my bike?\nReply:"},
                  "conversational prompts": {"prompt": [{"role": "user", "content": "Can you fix my bike?"}]}}


def load_prompt_rows(prompts: DataConfig) -> list[dict]:
    """The rows of a prompts file, every column; each row's `prompt` is a text or a conversation
    (a list of messages, kept as it is: it is the prompt a reward function is given), and every
    other column reaches the reward functions."""
    return data.load_rows(prompts, (), conversations=("prompt",), every_column=True)


def check_on_policy(section: SamplingSection, temperature: float, method: str, key: str) -> None:
    """An update that scores old, reference and new logprobs under the tempered softmax needs
    rollouts drawn from it: the same temperature (`key`.temperature), no top-k / top-p /
    greedy / min_new_tokens."""
    check(temperature == section.temperature,
          f"{key}.temperature={temperature} must equal sampling.temperature={section.temperature} "
          "(the update must score tokens under the distribution that sampled them)")
    changed = off_policy_settings(section)
    check(not changed, f"{', '.join(changed)} would make {method} off-policy: the update scores old, reference and "
                       "new logprobs under the tempered softmax, so rollouts must be drawn from it (set "
                       "top_k: 0, top_p: 1.0, greedy: false, min_new_tokens: 0)")


def off_policy_settings(section: SamplingSection) -> list[str]:
    """The keys of `section` set to draw replies from other than the tempered softmax (top-k,
    top-p, greedy, min_new_tokens): under them the logprobs of that softmax are not the
    sampler's."""
    off_policy = {"sampling.top_k": section.top_k != 0, "sampling.top_p": section.top_p != 1.0,
                  "sampling.greedy": section.greedy, "sampling.min_new_tokens": section.min_new_tokens != 0}
    return [k for k, on in off_policy.items() if on]


def eos_token_ids(tokenizer, model_config) -> tuple[int, ...]:
    """Every id a policy's replies end on, as TRL's GRPO, RLOO and online DPO trainers take them:
    the tokenizer's EOS (SFT closes each reply with it), then each of the model config's
    `eos_token_id` ids (the checkpoint's generation_config.json's when it sets them, else
    config.json's: what transformers' `generate` stops on; Llama 3 lists several, an instruct
    model's chat end token among them)."""
    first = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    return tuple(dict.fromkeys(first + token_ids(model_config.eos_token_id)))


def sampling_config(section: SamplingSection, tokenizer, model_config) -> SamplingConfig:
    """The sampler settings, after checking that prompt + response fit the model's context; a
    reply ends at any of `eos_token_ids`, and so does every check of whether it ended (the
    settings' `eos_ids`)."""
    common.check_context(section.max_prompt_tokens + section.max_new_tokens,
                         f"sampling.max_prompt_tokens={section.max_prompt_tokens} + sampling.max_new_tokens="
                         f"{section.max_new_tokens}", model_config)
    return SamplingConfig(
        max_new_tokens=section.max_new_tokens, min_new_tokens=section.min_new_tokens,
        temperature=section.temperature, top_k=section.top_k, top_p=section.top_p, greedy=section.greedy,
        eos_token_id=eos_token_ids(tokenizer, model_config), pad_token_id=tokenizer.pad_token_id)


def encode_prompt_rows(rows, tokenizer, section: SamplingSection, seed: int, source: DataConfig, policy: str):
    """All prompts (the rows of `source`, encoded by `policy`'s tokenizer as `data.prompt_ids`
    says: a conversation through its chat template), left-padded to one width (one compiled
    shape) -> ids, mask, the texts the policy actually sees (after any truncation: the prompts
    cut to fit are counted in a warning)."""
    if any(data.is_conversation(r["prompt"]) for r in rows):
        column = source.columns.get("prompt", "prompt")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{source.path}: column {column!r} holds conversations, but the tokenizer of {policy} "
                              "has no chat template to render them; give the prompts as text, or a policy whose "
                              "tokenizer has a chat template")
        if section.prompt_length_range is not None:
            raise ConfigError(f"sampling.prompt_length_range would cut the conversations of {source.path} (column "
                              f"{column!r}) before their generation prompt; leave it unset for conversational prompts")
    enc = data.encode_prompts(tokenizer, [r["prompt"] for r in rows], section.max_prompt_tokens,
                              section.prompt_length_range, seed)
    data.warn_cut(enc["cut"], f"prompts cut to sampling.max_prompt_tokens={section.max_prompt_tokens} "
                              "(their end kept)")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    texts = [tokenizer.decode(i[m == 1]) for i, m in zip(ids, mask)]
    return ids, mask, texts


def online_preflight(config, stage: str, resume: bool, *, value_head: bool = False, minibatches: int = 1,
                     section: str = "ppo", samples_per_prompt: int = 1) -> dict:
    """The preflight of a stage that trains on its own samples of `config.prompts` scored by
    `config.reward`: the policy and its tokenizer (`value_head`: with PPO's), the mesh (each of
    the `minibatches` of `section` splitting over it), the reward source loads, the prompts and
    their column, the context budget, the run folder; writing nothing -> what the run needs.
    With `samples_per_prompt` = k > 1 a step's `train.batch_size` rollouts are k samples of
    each of batch_size / k prompts (`section`.num_generations)."""
    train = config.train
    with parallel.on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = common.load_policy(
            config.policy, pad_token=config.pad_token, compute=config.compute, value_head=value_head,
            rng=jax.random.key(train.seed))
    mesh = common.train_mesh(train, minibatches, section)
    scorer = make_scorer(config.reward, mesh, dtype=config.compute.dtype)
    rows = load_prompt_rows(config.prompts)
    scorer.check_columns(rows)
    k = samples_per_prompt
    check(k == 1 or train.batch_size // k <= len(rows),  # (k == 1: check_output's batch check says it)
          f"train.batch_size={train.batch_size} / {section}.num_generations={k} = {train.batch_size // k} prompts "
          f"per step, more than the {len(rows)} prompts of {config.prompts.path}")
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, config.sampling, train.seed, config.prompts, config.policy)
    sampler = sampling_config(config.sampling, tokenizer, model_config)
    output = common.check_output(stage, train, config, resume, len(rows) * k,
                                 inputs=(config.policy, *reward_models(config.reward), config.prompts.path,
                                         common.adapter_input(config)))
    adapters, params = common.starting_adapters(config.lora, params, model_config.model_type)
    return {"module": module, "params": params, "tokenizer": tokenizer, "mesh": mesh, "scorer": scorer, "rows": rows,
            "prompts": (ids, mask, texts, rows), "sampler": sampler, "output": output, "adapters": adapters}


def decode_responses(tokenizer, out, eos_ids: tuple[int, ...]) -> list[str]:
    """Response text of each row: its real tokens, its closing EOS (any of `eos_ids`, the
    sampler's) and special tokens dropped."""
    return [tokenizer.decode(r, skip_special_tokens=True) for r in diagnostics.reply_tokens(out, eos_ids)]


def sample(module, params, ids_BxP, mask_BxP, key, settings: SamplingConfig, mesh, rows_B=None) -> GenerateOutput:
    """Sample responses for host prompt arrays (the whole batch, on every process), each
    device sampling its own rows; `params` laid out on `mesh` -> the rollout as numpy arrays,
    whole, on every process. Row b's sample is keyed by `rows_B[b]` (default: b; see
    `sampling.generate`)."""
    if rows_B is None:
        rows_B = np.arange(len(ids_BxP))
    ids, mask, rows = parallel.put_rows((ids_BxP, mask_BxP, np.asarray(rows_B, np.int32)), mesh)
    return parallel.gather(generate(module, params, ids, mask, parallel.put_replicated(key, mesh), settings, rows))


def score_rollout(rollout: GenerateOutput, idx_B, prompts, tokenizer, sampler: SamplingConfig, scorer,
                  missing_eos_penalty: float | None, unscored: float = 0.0) -> tuple[np.ndarray, dict]:
    """The reward of each response of a rollout sampled with `sampler` from prompts `idx_B` of
    `prompts` (ids, mask, texts, rows: what `online_preflight` returns), row b's response
    scored with prompt idx_B[b]'s text and row (every column, for the reward functions) ->
    (the weighted total float32 `[B]`, less TRL's `missing_eos_penalty` where a reply did not
    end, `unscored` (0 or NaN, see `Scorer.total`) where no source scored it, penalty or not;
    each source's `rewards/<name>/mean|std`)."""
    _, _, texts, rows = prompts
    by_source = scorer.by_source([texts[j] for j in idx_B], decode_responses(tokenizer, rollout, sampler.eos_ids),
                                 [rows[j] for j in idx_B])
    scores = scorer.total(by_source, unscored)
    if missing_eos_penalty is not None:
        scores = penalise_missing_eos(scores, rollout, sampler.eos_ids, missing_eos_penalty)
    return scores, source_metrics(by_source)


def scored_batch(rollout: GenerateOutput, idx_B, prompts, tokenizer, sampler: SamplingConfig, scorer,
                 missing_eos_penalty: float | None, unscored: float = 0.0) -> tuple[dict, dict]:
    """`score_rollout`'s scores as the update's batch (`sequences`, `attention_mask`,
    `response_mask`, `scores`), and its metrics."""
    scores, metrics = score_rollout(rollout, idx_B, prompts, tokenizer, sampler, scorer, missing_eos_penalty,
                                    unscored)
    return rollout_batch(rollout, scores), metrics


def rollout_batch(rollout: GenerateOutput, scores_B) -> dict:
    """The update's batch of a rollout and its rows' scores (arrays, or their shapes)."""
    return {"sequences": rollout.sequences, "attention_mask": rollout.attention_mask,
            "response_mask": rollout.response_mask, "scores": scores_B}
