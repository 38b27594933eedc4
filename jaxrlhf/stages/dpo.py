"""DPO, IPO, hinge and SLiC-HF on preference pairs."""

import dataclasses
from typing import Literal

import numpy as np

from jaxrlhf import data
from jaxrlhf.config import ComputeConfig, DataConfig, LoRAConfig, TrainConfig, check, pad_token_key
from jaxrlhf.errors import ConfigError
from jaxrlhf.models import frozen_params, load_pretrained
from jaxrlhf.parallel import data_parallel, gather, on_host, put_rows, put_state, whole_rows
from jaxrlhf.stages import common
from jaxrlhf.updates.common import sequence_logps_jit
from jaxrlhf.updates.dpo import make_dpo_step


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    policy: str
    data: DataConfig  # columns prompt, chosen, rejected
    reference: str | None = None  # defaults to the starting policy
    loss_type: Literal["sigmoid", "hinge", "ipo", "slic"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    slic_delta: float = 1.0
    slic_reg_weight: float = 0.1
    # Zhao et al.'s regulariser: the chosen response's sequence NLL ("sequence"), or per token ("token_mean").
    slic_regularizer: Literal["sequence", "token_mean"] = "sequence"
    max_length: int = 64
    pad_token: str | None = pad_token_key()
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # the policy's and the reference's
    lora: LoRAConfig | None = None  # low-rank adapters on the trained model; null: full fine-tuning

    def __post_init__(self):
        check(self.beta > 0, f"beta={self.beta} must be > 0")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")


# The pairs' columns, with an example row (make_preferences.py writes them).
COLUMNS = {"pairs": {"prompt": "Request: Can you fix my bike?\nReply:", "chosen": " Of course, happy to help!",
                     "rejected": " Ugh, figure it out yourself."}}


def plan(config: DPOConfig) -> str:
    if config.loss_type == "slic":  # SLiC-HF has no reference and no beta
        method = (f"slic preference optimisation: {config.policy} on pairs {config.data.path}, delta "
                  f"{config.slic_delta}, regulariser {config.slic_regularizer} x {config.slic_reg_weight}")
    else:
        method = (f"{config.loss_type} preference optimisation: {config.policy} (reference "
                  f"{config.reference or config.policy}) on pairs {config.data.path}, beta {config.beta}")
    return f"{method}, {config.train.steps} steps of batch {config.train.batch_size} -> {config.train.output_dir}/final"


def _pair_arrays(rows, tokenizer, max_length, source: DataConfig):
    prompts = [r["prompt"] for r in rows]
    out, cut = {}, np.zeros(len(rows), bool)
    for side in ("chosen", "rejected"):
        enc = data.encode_pairs_of_text(tokenizer, prompts, [r[side] for r in rows], max_length, source=source)
        out |= {f"{side}_ids": enc["input_ids"], f"{side}_mask": enc["attention_mask"],
                f"{side}_loss_mask": enc["loss_mask"]}
        cut |= enc["cut"]
    data.warn_cut(cut, f"pairs with a response cut to fit max_length={max_length} (each keeps its EOS)")
    return out


def _reference_logps(module, params, arrays, mesh, batch_size: int):
    """Summed sequence logprobs of every pair under the frozen reference (`params` laid out on
    `mesh`, each device scoring its rows), computed once up front (the step length-averages
    them itself where the loss wants that), `batch_size` sequences at a time."""
    batch_size = whole_rows(batch_size, mesh)
    out = {}
    for side in ("chosen", "rejected"):
        parts = []
        n = len(arrays[f"{side}_ids"])
        for s in range(0, n, batch_size):
            idx = np.arange(s, s + batch_size) % n  # full batches: one compiled shape
            batch = put_rows(tuple(arrays[f"{side}_{k}"][idx] for k in ("ids", "mask", "loss_mask")), mesh)
            parts.append(gather(sequence_logps_jit(module.apply, params, *batch)))
        out[f"ref_{side}_logps"] = np.concatenate(parts)[:n]
    return out


def architecture(model_config):
    """What must match for two models to score the same token ids: all but the special token
    ids, which say where generation stops (a hub checkpoint's generation_config.json may list
    more EOS ids than an export of the same model)."""
    return dataclasses.replace(model_config, bos_token_id=None, eos_token_id=None)


def preflight(config: DPOConfig, resume: bool = False) -> dict:
    """Every check the run makes before it writes (the policy and its tokenizer, the context,
    the pairs and their columns, the mesh, the reference and its architecture, the run folder),
    writing nothing -> what the run needs. `--dry-run` runs exactly this."""
    train = config.train
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = common.load_policy(config.policy, pad_token=config.pad_token,
                                                                     compute=config.compute)
    common.check_context(config.max_length, f"max_length={config.max_length}", model_config)
    rows = data.load_rows(config.data, tuple(COLUMNS["pairs"]))
    arrays = _pair_arrays(rows, tokenizer, config.max_length, config.data)
    mesh = common.train_mesh(train)
    adapters, params = common.starting_adapters(config.lora, params, model_config.model_type)
    # With LoRA and no other reference, the reference is the state's frozen base (`run`).
    ref_params = None if config.loss_type == "slic" or config.lora is not None else params
    if config.reference is not None and config.loss_type != "slic":
        with on_host():
            _, ref_params, ref_config = load_pretrained(config.reference, head="lm", dtype=config.compute.dtype)
        if architecture(ref_config) != architecture(model_config):
            raise ConfigError(f"reference {config.reference} is not the policy's architecture "
                              f"({ref_config} vs {model_config}); DPO scores both on the same token ids")
    ref_params = None if ref_params is None else frozen_params(ref_params, config.compute.dtype)
    output = common.check_output("dpo", train, config, resume, len(rows),
                                 inputs=(config.policy, config.reference, config.data.path,
                                         common.adapter_input(config)))
    return {"module": module, "params": params, "ref_params": ref_params, "tokenizer": tokenizer, "arrays": arrays,
            "rows": len(rows), "mesh": mesh, "output": output, "adapters": adapters}


def training(config: DPOConfig) -> common.Training:
    """The reference is scored once before training (`_reference_logps`), not held in the state."""
    return common.Training(make_dpo_step(
        config.loss_type, config.beta, label_smoothing=config.label_smoothing, slic_delta=config.slic_delta,
        slic_reg_weight=config.slic_reg_weight, slic_regularizer=config.slic_regularizer),
        lora=common.lora_settings(config.lora))


def run(config: DPOConfig, resume: bool = False):
    train = config.train
    ready = preflight(config, resume)
    module, tokenizer, arrays, n, mesh = (ready[k] for k in ("module", "tokenizer", "arrays", "rows", "mesh"))
    # As many sequences at a time as the update's loss microbatch scores (its pairs' chosen and
    # rejected): the reference pass needs no more memory than the update.
    chunk = 2 * train.batch_size // train.grad_accum_steps
    if ready["ref_params"] is not None:
        arrays |= _reference_logps(module, put_state(ready["ref_params"], mesh), arrays, mesh, chunk)
    out, state, lr = common.start_training(ready, train, spec := training(config))
    if config.lora is not None and config.reference is None and config.loss_type != "slic":
        # The reference is the state's own frozen base (the adapter off): no second copy.
        arrays |= _reference_logps(module, state.base_params, arrays, mesh, chunk)
    step = data_parallel(spec.step, mesh, state)

    def step_fn(state, i):
        batch = data.take(arrays, data.batch_indices(n, train.batch_size, i, train.seed))
        return step(state, batch, common.step_key(train.seed, i))

    state = common.train_loop(out, state, step_fn, train, resume, config.loss_type,
                              extra_metrics=lambda s: {"learning_rate": lr(s), "epoch": s / max(n // train.batch_size, 1)})
    return common.export(out, module, state, tokenizer, spec.lora, config.policy)
