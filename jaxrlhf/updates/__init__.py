"""The compiled update functions, one module per method, and what they share (`common`).

Each factory returns a pure `step(state, batch, key) -> (state, metrics)` written for one
device: `parallel.data_parallel` compiles it for a mesh of any size (the stages' path). With
`axis_name` set, run it under `parallel.pmap_step` instead: the gradients and metrics are
summed over devices as global-mean shares (see `losses`). Either way N devices give the
one-device update on the same global batch. Batches are dicts of arrays; each factory's
docstring lists the keys it reads.
"""

from jaxrlhf.updates.common import TrainState, apply_loss, make_optimizer, sequence_logps
from jaxrlhf.updates.dpo import make_dpo_step
from jaxrlhf.updates.grpo import GRPOConfig, make_grpo_update
from jaxrlhf.updates.ppo import PPOConfig, make_ppo_update
from jaxrlhf.updates.reward import make_reward_step
from jaxrlhf.updates.rloo import RLOOConfig, make_rloo_update
from jaxrlhf.updates.sft import make_sft_step

__all__ = ["TrainState", "apply_loss", "make_optimizer", "sequence_logps", "make_sft_step", "make_reward_step",
           "make_dpo_step", "PPOConfig", "make_ppo_update", "RLOOConfig", "make_rloo_update", "GRPOConfig",
           "make_grpo_update"]
