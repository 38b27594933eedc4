"""Supervised fine-tuning: next-token loss on the response of each prompt/response pair."""

import dataclasses
from typing import Any


from jaxrlhf import data
from jaxrlhf.config import DataConfig, TrainConfig, check
from jaxrlhf.parallel import data_parallel, on_host, put_state
from jaxrlhf.stages import common
from jaxrlhf.updates.common import TrainState
from jaxrlhf.updates.sft import make_sft_step
from jaxrlhf.trainer import run_loop


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    data: DataConfig
    model: str | None = None  # checkpoint path or hub name
    model_config: dict[str, Any] | None = None  # or a fresh model (GPT-2, Llama) from this config.json dict
    tokenizer: str | None = None  # defaults to the model's own
    max_length: int = 64
    completion_only: bool = True  # loss on the response only; False: on prompt and response
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        check(self.max_length >= 2, f"max_length={self.max_length} must be at least 2")


def plan(config: SFTConfig) -> str:
    source = config.model or f"a fresh model {config.model_config}"
    return (f"SFT: {source} on {config.data.path} (prompt/response, loss on "
            f"{'the response' if config.completion_only else 'all tokens'}), {config.train.steps} steps of "
            f"batch {config.train.batch_size}, max_length {config.max_length} -> {config.train.output_dir}/final")


def run(config: SFTConfig, resume: bool = False):
    train = config.train
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = common.load_model(
            config.model, config.model_config, config.tokenizer, train.seed, head="lm")
    common.check_context(config.max_length, f"max_length={config.max_length}", model_config)
    rows = data.load_rows(config.data, ("prompt", "response"))
    arrays = data.encode_pairs_of_text(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                       config.max_length, config.completion_only)
    data.warn_cut(arrays.pop("cut"), f"responses cut to fit max_length={config.max_length} (each keeps its EOS)")
    mesh = common.train_mesh(train)
    out = common.prepare_output("sft", train, config, resume, len(rows),
                                inputs=(config.model, config.tokenizer, config.data.path))
    tx, lr = common.optimizer(train)
    with on_host():
        state = TrainState.create(module, params, tx, skip_nonfinite=train.on_nonfinite == "skip",
                                  grad_accum_steps=train.grad_accum_steps)
    state = put_state(state, mesh)
    step = data_parallel(make_sft_step(), mesh, state)

    def step_fn(state, i):
        batch = data.take(arrays, data.batch_indices(len(rows), train.batch_size, i, train.seed))
        return step(state, batch, common.step_key(train.seed, i))

    per_epoch = len(rows) // train.batch_size
    state = run_loop(out_dir=out, state=state, step_fn=step_fn, steps=train.steps, log_every=train.log_every,
                     save_every=train.save_every, keep_checkpoints=train.keep_checkpoints, resume=resume,
                     record={"stage": "sft"}, tensorboard=train.tensorboard, desc="sft",
                     extra_metrics=lambda s: {"learning_rate": lr(s), "epoch": s / max(per_epoch, 1)})
    return common.export(out, module, state.params, tokenizer)
