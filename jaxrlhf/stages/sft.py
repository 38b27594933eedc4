"""Supervised fine-tuning: next-token loss on the response of each prompt/response pair, or on
every token of plain text."""

import dataclasses
from typing import Any


from jaxrlhf import data
from jaxrlhf.config import ComputeConfig, DataConfig, LoRAConfig, TrainConfig, check, pad_token_key
from jaxrlhf.parallel import data_parallel, on_host
from jaxrlhf.stages import common
from jaxrlhf.updates.sft import make_sft_step

# The data forms SFT reads, in order of preference, each with an example row: rows with prompt
# and response learn the response (completion_only); rows with a text column and neither of
# those are plain text, learned on every token.
COLUMNS = {
    "prompt/response": {"prompt": "Request: Can you fix my bike?\nReply:", "response": " Of course! I will fix it today."},
    "plain text": {"text": "Thank you so much for your help, I really appreciate it."},
}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    data: DataConfig
    model: str | None = None  # checkpoint path or hub name
    model_config: dict[str, Any] | None = None  # or a fresh model (GPT-2, Llama) from this config.json dict
    tokenizer: str | None = None  # defaults to the model's own
    pad_token: str | None = pad_token_key()
    max_length: int = 64
    completion_only: bool = True  # prompt/response rows: loss on the response only; False: on prompt and response
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    lora: LoRAConfig | None = None  # low-rank adapters on the trained model; null: full fine-tuning

    def __post_init__(self):
        check(self.max_length >= 2, f"max_length={self.max_length} must be at least 2")


def plan(config: SFTConfig) -> str:
    source = config.model or f"a fresh model {config.model_config}"
    return (f"SFT: {source} on {config.data.path} (prompt/response rows: loss on "
            f"{'the response' if config.completion_only else 'all tokens'}; text rows: on all tokens), "
            f"{config.train.steps} steps of batch {config.train.batch_size}, max_length {config.max_length} "
            f"-> {config.train.output_dir}/final")


def preflight(config: SFTConfig, resume: bool = False) -> dict:
    """Every check the run makes before it writes (model and tokenizer and their fit, the
    context, the data and its columns, the mesh, the run folder), writing nothing -> what the
    run needs. `--dry-run` runs exactly this."""
    train = config.train
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = common.load_model(
            config.model, config.model_config, config.tokenizer, train.seed, head="lm", pad_token=config.pad_token,
            compute=config.compute)
    common.check_context(config.max_length, f"max_length={config.max_length}", model_config)
    form, rows = data.load_rows_of_a_form(config.data, {name: tuple(row) for name, row in COLUMNS.items()})
    if form == "plain text":
        print(f"{config.data.path}: {len(rows)} rows of plain text (column text): loss on every token")
        arrays = data.encode_pairs_of_text(tokenizer, [""] * len(rows), [r["text"] for r in rows],
                                           config.max_length, completion_only=False)
        what = "texts"
    else:
        arrays = data.encode_pairs_of_text(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                           config.max_length, config.completion_only, config.data)
        what = "responses"
    data.warn_cut(arrays.pop("cut"), f"{what} cut to fit max_length={config.max_length} (each keeps its EOS)")
    mesh = common.train_mesh(train)
    output = common.check_output("sft", train, config, resume, len(rows),
                                 inputs=(config.model, config.tokenizer, config.data.path,
                                         common.adapter_input(config)))
    adapters, params = common.starting_adapters(config.lora, params, model_config.model_type)
    return {"module": module, "params": params, "tokenizer": tokenizer, "arrays": arrays, "rows": len(rows),
            "mesh": mesh, "output": output, "adapters": adapters}


def training(config: SFTConfig) -> common.Training:
    return common.Training(make_sft_step(), lora=common.lora_settings(config.lora))


def run(config: SFTConfig, resume: bool = False):
    train = config.train
    ready = preflight(config, resume)
    module, tokenizer, arrays, n, mesh = (ready[k] for k in ("module", "tokenizer", "arrays", "rows", "mesh"))
    out, state, lr = common.start_training(ready, train, spec := training(config))
    step = data_parallel(spec.step, mesh, state)

    def step_fn(state, i):
        batch = data.take(arrays, data.batch_indices(n, train.batch_size, i, train.seed))
        return step(state, batch, common.step_key(train.seed, i))

    per_epoch = n // train.batch_size
    state = common.train_loop(out, state, step_fn, train, resume, "sft",
                              extra_metrics=lambda s: {"learning_rate": lr(s), "epoch": s / max(per_epoch, 1)})
    return common.export(out, module, state, tokenizer, spec.lora, config.model)
