"""Online DPO (Guo et al. 2024): every step samples two replies per prompt from the current
policy, scores both with the reward source, and takes a DPO / IPO / hinge step on the pairs
they make, against the frozen starting policy."""

import dataclasses
import time
from typing import Literal

import jax
import numpy as np

from jaxrlhf import data
from jaxrlhf.config import (ComputeConfig, DataConfig, LoRAConfig, Reward, SamplingSection,
                            TrainConfig, check, pad_token_key)
from jaxrlhf.parallel import data_parallel
from jaxrlhf.rewards import describe_reward, replies_ended
from jaxrlhf.stages import common
from jaxrlhf.stages.rollout import PROMPT_COLUMNS, online_preflight, sample, score_rollout
from jaxrlhf.updates.dpo import make_dpo_step

COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig:
    policy: str  # the starting policy (usually the SFT export); also the frozen reference
    reward: Reward  # one source, or a list of weighted sources
    prompts: DataConfig
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # batch_size = prompts (pairs) per step
    # TRL's missing_eos_penalty: subtracted from the score of a reply that never emitted EOS
    # before the pair is made. Off when null.
    missing_eos_penalty: float | None = None
    pad_token: str | None = pad_token_key()  # the policy's (the reward model's: reward.pad_token)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # every model the stage runs
    lora: LoRAConfig | None = None  # low-rank adapters on the trained model; null: full fine-tuning

    def __post_init__(self):
        check(self.beta > 0, f"beta={self.beta} must be > 0")
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              f"missing_eos_penalty={self.missing_eos_penalty} must be >= 0 (it is subtracted)")


def plan(config: OnlineDPOConfig) -> str:
    reward = describe_reward(config.reward)
    return (f"online {config.loss_type} DPO: {config.policy} vs reward {reward}, prompts {config.prompts.path}, "
            f"{config.train.steps} steps x {config.train.batch_size} prompts x 2 replies of "
            f"{config.sampling.max_new_tokens} tokens, beta {config.beta} -> {config.train.output_dir}/final")


def make_pairs(sequences_2BxL, attention_mask_2BxL, response_len: int, scores_2B):
    """The DPO batch of one step's samples: rows b and B + b are two replies to prompt b (each
    row prompt then response, `response_len` = N response columns at the end), scored
    `scores_2B`. The higher-scored reply is chosen; on a tie (equal scores) the first one, as
    TRL's OnlineDPOTrainer (`first >= second`), and the pair still trains.
    -> (batch of `chosen_|rejected_` + `ids|mask|loss_mask` `[B, L]`, first_chosen_B)."""
    n = len(scores_2B) // 2
    first_chosen_B = scores_2B[:n] >= scores_2B[n:]
    rows_B = np.arange(n)
    chosen_B = np.where(first_chosen_B, rows_B, rows_B + n)
    rejected_B = np.where(first_chosen_B, rows_B + n, rows_B)
    response_only = np.asarray(attention_mask_2BxL).copy()
    response_only[:, :-response_len] = 0  # the loss scores the reply's tokens only
    batch = {}
    for side, idx in (("chosen", chosen_B), ("rejected", rejected_B)):
        batch |= {f"{side}_ids": np.asarray(sequences_2BxL)[idx], f"{side}_mask": np.asarray(attention_mask_2BxL)[idx],
                  f"{side}_loss_mask": response_only[idx]}
    return batch, first_chosen_B


def trl_metrics(step_metrics, scores_2B, first_chosen_B, ended_2B, beta: float) -> dict:
    """TRL OnlineDPOTrainer's logged values, from the step's DPO metrics (all on the policy
    before the update, at temperature 1, as TRL's) and the step's scores. Every reply is
    chosen or rejected once, so means over all 2B replies are the halves' average: `objective/kl`
    is the mean summed log ratio policy / reference of the sampled replies (TRL's k1 estimate),
    `objective/entropy` the mean negative summed logprob."""
    n = len(first_chosen_B)
    chosen_scores = np.where(first_chosen_B, scores_2B[:n], scores_2B[n:])
    rejected_scores = np.where(first_chosen_B, scores_2B[n:], scores_2B[:n])
    kl = (step_metrics["rewards/chosen"] + step_metrics["rewards/rejected"]) / (2 * beta)
    return {"objective/kl": kl,
            "objective/entropy": -(step_metrics["logps/chosen"] + step_metrics["logps/rejected"]) / 2,
            "objective/non_score_reward": -beta * kl,
            "objective/rlhf_reward": float(scores_2B.mean()) - beta * kl,
            "objective/scores": float(scores_2B.mean()),
            "objective/scores_margin": float((chosen_scores - rejected_scores).mean()),
            "val/contain_eos_token": float(ended_2B.mean()),
            "beta": beta,
            "pairs/ties": float((chosen_scores == rejected_scores).mean())}  # ours: pairs whose replies tied


def preflight(config: OnlineDPOConfig, resume: bool = False) -> dict:
    """Every check the run makes before it writes (the policy and its tokenizer, the mesh, the
    reward source loads, the prompts and their column, the context budget, the run folder),
    writing nothing -> what the run needs. `--dry-run` runs exactly this."""
    return online_preflight(config, "online_dpo", resume)  # B pairs per update; the 2B replies split as well


def training(config: OnlineDPOConfig) -> common.Training:
    # The reference is scored in the step from state.ref_params: the replies are new every step.
    return common.Training(make_dpo_step(config.loss_type, config.beta), reference=config.compute.dtype,
                           lora=common.lora_settings(config.lora))


def run(config: OnlineDPOConfig, resume: bool = False):
    train = config.train
    ready = preflight(config, resume)
    module, tokenizer, mesh, scorer, rows, sampler = (
        ready[k] for k in ("module", "tokenizer", "mesh", "scorer", "rows", "sampler"))
    ids, mask = ready["prompts"][:2]
    out, state, lr = common.start_training(ready, train, spec := training(config))
    step = data_parallel(spec.step, mesh, state)

    def step_fn(state, i):
        idx = data.batch_indices(len(rows), train.batch_size, i, train.seed)
        both = np.concatenate([idx, idx])  # rows b and B + b: two replies to prompt b
        gen_key, step_key = jax.random.split(common.step_key(train.seed, i))
        started = time.perf_counter()
        rollout = sample(module, state.model_params(state.params), ids[both], mask[both], gen_key, sampler, mesh)
        scores, reward_metrics = score_rollout(rollout, both, ready["prompts"], tokenizer, sampler, scorer,
                                               config.missing_eos_penalty)
        batch, first_chosen = make_pairs(rollout.sequences, rollout.attention_mask, rollout.response_mask.shape[1],
                                         scores)
        rollout_s = time.perf_counter() - started
        state, metrics = step(state, batch, step_key)
        extra = trl_metrics(metrics, scores, first_chosen, replies_ended(rollout, sampler.eos_ids), config.beta)
        return state, {**metrics, **extra, **reward_metrics, "time/rollout_s": rollout_s}

    state = common.train_loop(out, state, step_fn, train, resume, "online_dpo", desc="online dpo",
                              extra_metrics=lambda s: {"learning_rate": lr(s)})
    return common.export(out, module, state, tokenizer, spec.lora, config.policy)
