"""Reward model training: a BERT-family encoder with a one-output head, by regression on
scored texts or pairwise (Bradley-Terry) on chosen/rejected texts."""

import dataclasses
from typing import Any, Literal

import numpy as np

from jaxrlhf import data
from jaxrlhf.config import DataConfig, TrainConfig, check
from jaxrlhf.parallel import data_parallel, on_host, put_state
from jaxrlhf.stages import common
from jaxrlhf.updates.common import TrainState
from jaxrlhf.updates.reward import make_reward_step
from jaxrlhf.trainer import run_loop


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    data: DataConfig
    model: str | None = None  # e.g. bert-base-uncased; gets a fresh 1-output head
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    kind: Literal["regression", "pairwise"] = "regression"
    # regression reads columns text + label; pairwise reads chosen + rejected
    normalize_targets: bool = False  # regression: train on (label - mean) / std
    max_length: int = 64
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        check(self.max_length >= 2, f"max_length={self.max_length} must be at least 2")


def plan(config: RewardConfig) -> str:
    source = config.model or f"a fresh encoder {config.model_config}"
    return (f"reward model ({config.kind}): {source} on {config.data.path}, {config.train.steps} steps of batch "
            f"{config.train.batch_size} -> {config.train.output_dir}/final")


def _arrays(config: RewardConfig, tokenizer) -> tuple[dict, int]:
    if config.kind == "regression":
        rows = data.load_rows(config.data, ("text",), numbers=("label",))
        arrays = data.encode_texts(tokenizer, [r["text"] for r in rows], config.max_length)
        data.warn_cut(arrays.pop("cut"), f"texts cut to max_length={config.max_length} tokens (their start kept)")
        target = np.asarray([r["label"] for r in rows], np.float32)
        if config.normalize_targets:
            target = (target - target.mean()) / max(float(target.std()), 1e-6)
        return {**arrays, "target": target}, len(rows)
    rows = data.load_rows(config.data, ("chosen", "rejected"))
    chosen = data.encode_texts(tokenizer, [r["chosen"] for r in rows], config.max_length)
    rejected = data.encode_texts(tokenizer, [r["rejected"] for r in rows], config.max_length)
    data.warn_cut(chosen["cut"] | rejected["cut"],
                  f"pairs with a text cut to max_length={config.max_length} tokens (its start kept)")
    return {"chosen_ids": chosen["input_ids"], "chosen_mask": chosen["attention_mask"],
            "rejected_ids": rejected["input_ids"], "rejected_mask": rejected["attention_mask"]}, len(rows)


def run(config: RewardConfig, resume: bool = False):
    train = config.train
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, _, tokenizer = common.load_model(
            config.model, config.model_config, config.tokenizer, train.seed, head="classification", num_labels=1)
    arrays, n = _arrays(config, tokenizer)
    mesh = common.train_mesh(train)
    out = common.prepare_output("reward", train, config, resume, n,
                                inputs=(config.model, config.tokenizer, config.data.path))
    tx, lr = common.optimizer(train)
    with on_host():
        state = TrainState.create(module, params, tx, skip_nonfinite=train.on_nonfinite == "skip",
                                  grad_accum_steps=train.grad_accum_steps)
    state = put_state(state, mesh)
    step = data_parallel(make_reward_step(config.kind), mesh, state)

    def step_fn(state, i):
        batch = data.take(arrays, data.batch_indices(n, train.batch_size, i, train.seed))
        return step(state, batch, common.step_key(train.seed, i))

    state = run_loop(out_dir=out, state=state, step_fn=step_fn, steps=train.steps, log_every=train.log_every,
                     save_every=train.save_every, keep_checkpoints=train.keep_checkpoints, resume=resume,
                     record={"stage": "reward"}, tensorboard=train.tensorboard, desc="reward",
                     extra_metrics=lambda s: {"learning_rate": lr(s), "epoch": s / max(n // train.batch_size, 1)})
    return common.export(out, module, state.params, tokenizer)
