"""RLOO against a reward source: k samples per prompt, each advantaged by the leave-one-out
mean of the others' rewards, with a KL leash to the frozen starting policy; no value head."""

import dataclasses

from jaxrlhf.config import (ComputeConfig, DataConfig, LoRAConfig, Reward, SamplingSection,
                            TrainConfig, pad_token_key)
from jaxrlhf.stages import grouped
from jaxrlhf.stages.rollout import PROMPT_COLUMNS
from jaxrlhf.updates.rloo import RLOOConfig, make_rloo_update

COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class RLOOStageConfig:
    policy: str  # the starting policy (usually the SFT export); also the frozen reference
    reward: Reward  # one source, or a list of weighted sources
    prompts: DataConfig
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    rloo: RLOOConfig = dataclasses.field(default_factory=RLOOConfig)
    # batch_size = rollouts per step: batch_size / rloo.num_generations prompts, each sampled k times
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    missing_eos_penalty: float | None = None  # TRL's: off the score of a reply that never ended
    pad_token: str | None = pad_token_key()  # the policy's (the reward model's: reward.pad_token)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # every model the stage runs
    lora: LoRAConfig | None = None  # low-rank adapters on the trained model; null: full fine-tuning

    def __post_init__(self):
        grouped.check_config(self, "rloo", "RLOO")


def plan(config: RLOOStageConfig) -> str:
    r = config.rloo
    clip = f"clip {r.clip_eps}" if r.clip_eps is not None else "plain REINFORCE"
    return grouped.plan(config, "rloo", "RLOO", f"beta {r.beta} (KL in the {r.kl_penalty}), {clip}")


def preflight(config: RLOOStageConfig, resume: bool = False) -> dict:
    return grouped.preflight(config, "rloo", resume)


def training(config: RLOOStageConfig):
    return grouped.training(config, "rloo", make_rloo_update)


def run(config: RLOOStageConfig, resume: bool = False):
    return grouped.run(config, "rloo", make_rloo_update, resume)
