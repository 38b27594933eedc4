"""GRPO against a reward source: k samples per prompt, advantages normalised within each
group, the clipped ratio with a k3 KL to the frozen starting policy in the loss (beta), TRL's
token-loss normalisations (grpo, dr_grpo, dapo, bnpo) and GSPO's sequence-level ratios."""

import dataclasses

from jaxrlhf.config import (ComputeConfig, DataConfig, LoRAConfig, Reward, SamplingSection,
                            TrainConfig, pad_token_key)
from jaxrlhf.stages import grouped
from jaxrlhf.stages.rollout import PROMPT_COLUMNS
from jaxrlhf.updates.grpo import GRPOConfig, make_grpo_update

COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class GRPOStageConfig:
    policy: str  # the starting policy (usually the SFT export); also the frozen reference
    reward: Reward  # one source, or a list of weighted sources
    prompts: DataConfig
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    # batch_size = rollouts per step: batch_size / grpo.num_generations prompts, each sampled k times
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    missing_eos_penalty: float | None = None  # TRL's: off the score of a reply that never ended
    pad_token: str | None = pad_token_key()  # the policy's (the reward model's: reward.pad_token)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # every model the stage runs
    lora: LoRAConfig | None = None  # low-rank adapters on the trained model; null: full fine-tuning

    def __post_init__(self):
        grouped.check_config(self, "grpo", "GRPO")


def plan(config: GRPOStageConfig) -> str:
    g = config.grpo
    return grouped.plan(config, "grpo", "GRPO", f"beta {g.beta}, loss {g.loss_type}, rewards scaled by "
                                                f"{g.scale_rewards}, {g.importance_sampling_level}-level ratios")


def preflight(config: GRPOStageConfig, resume: bool = False) -> dict:
    return grouped.preflight(config, "grpo", resume)


def training(config: GRPOStageConfig):
    return grouped.training(config, "grpo", make_grpo_update)


def run(config: GRPOStageConfig, resume: bool = False):
    return grouped.run(config, "grpo", make_grpo_update, resume)
