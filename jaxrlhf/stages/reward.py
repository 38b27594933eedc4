"""Reward model training: a BERT-family encoder with a one-output head, by regression on
scored texts or pairwise (Bradley-Terry) on chosen/rejected texts, with held-out metrics."""

import dataclasses
from typing import Any, Literal

import numpy as np

from jaxrlhf import data
from jaxrlhf.config import ComputeConfig, DataConfig, LoRAConfig, TrainConfig, check, pad_token_key
from jaxrlhf.errors import ConfigError
from jaxrlhf.parallel import data_parallel, on_host
from jaxrlhf.rewards import classifier_forward, score_rows
from jaxrlhf.stages import common
from jaxrlhf.updates.reward import make_reward_step

# The columns each kind reads, with an example row.
COLUMNS = {
    "regression": {"text": "Thank you so much, I would be happy to help.", "label": 0.83},
    "pairwise": {"chosen": "Of course, happy to help!", "rejected": "Ugh, figure it out yourself."},
}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    data: DataConfig
    model: str | None = None  # e.g. bert-base-uncased; gets a fresh 1-output head
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    pad_token: str | None = pad_token_key()
    kind: Literal["regression", "pairwise"] = "regression"
    # regression reads columns text + label; pairwise reads chosen + rejected
    normalize_targets: bool = False  # regression: train on (label - mean) / std (of the training rows)
    max_length: int = 64
    # Held-out rows, never trained on, scored every train.log_every steps and at the end
    # (eval/* in metrics.jsonl): the last eval_rows rows of data, or the rows of eval_data.
    eval_rows: int = 0
    eval_data: DataConfig | None = None
    eval_batch_size: int = 64
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    lora: LoRAConfig | None = None  # low-rank adapters on the trained model; null: full fine-tuning

    def __post_init__(self):
        check(self.max_length >= 2, f"max_length={self.max_length} must be at least 2")
        check(self.eval_rows >= 0, f"eval_rows={self.eval_rows} must be >= 0")
        check(not (self.eval_rows and self.eval_data is not None),
              "give at most one of eval_rows (hold out the last rows of data) or eval_data (a held-out file or split)")
        check(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be at least 1")


def plan(config: RewardConfig) -> str:
    source = config.model or f"a fresh encoder {config.model_config}"
    held_out = (f", eval on the last {config.eval_rows} rows" if config.eval_rows else
                f", eval on {config.eval_data.path} ({config.eval_data.split})" if config.eval_data else "")
    return (f"reward model ({config.kind}): {source} on {config.data.path}{held_out}, {config.train.steps} steps of "
            f"batch {config.train.batch_size} -> {config.train.output_dir}/final")


def _encode(config: RewardConfig, tokenizer, rows) -> dict:
    """Rows of the config's kind -> encoder arrays (and `target`, the raw label, for regression)."""
    if config.kind == "regression":
        arrays = data.encode_texts(tokenizer, [r["text"] for r in rows], config.max_length)
        data.warn_cut(arrays.pop("cut"), f"texts cut to max_length={config.max_length} tokens (their start kept)")
        return {**arrays, "target": np.asarray([r["label"] for r in rows], np.float32)}
    chosen = data.encode_texts(tokenizer, [r["chosen"] for r in rows], config.max_length)
    rejected = data.encode_texts(tokenizer, [r["rejected"] for r in rows], config.max_length)
    data.warn_cut(chosen["cut"] | rejected["cut"],
                  f"pairs with a text cut to max_length={config.max_length} tokens (its start kept)")
    return {"chosen_ids": chosen["input_ids"], "chosen_mask": chosen["attention_mask"],
            "rejected_ids": rejected["input_ids"], "rejected_mask": rejected["attention_mask"]}


def _split(config: RewardConfig, tokenizer) -> tuple[dict, dict | None]:
    """(training arrays, held-out arrays or None), targets normalised with the training rows'
    mean and std when asked (so eval/mse is in the units the model learns)."""
    columns = tuple(COLUMNS[config.kind])
    text, numbers = (columns[:1], columns[1:]) if config.kind == "regression" else (columns, ())
    rows = data.load_rows(config.data, text, numbers)
    held = rows[len(rows) - config.eval_rows:] if config.eval_rows else None
    if config.eval_rows:
        if config.eval_rows >= len(rows):
            raise ConfigError(f"eval_rows={config.eval_rows} leaves no training rows of the {len(rows)} in "
                              f"{config.data.path}")
        rows = rows[: len(rows) - config.eval_rows]
    elif config.eval_data is not None:
        held = data.load_rows(config.eval_data, text, numbers)
    train, held_out = _encode(config, tokenizer, rows), None if held is None else _encode(config, tokenizer, held)
    if config.kind == "regression" and config.normalize_targets:
        mean, std = float(train["target"].mean()), max(float(train["target"].std()), 1e-6)
        for arrays in (a for a in (train, held_out) if a is not None):
            arrays["target"] = (arrays["target"] - mean) / std
    return train, held_out


def held_out_metrics(kind: str, scores: dict[str, np.ndarray], held_out: dict) -> dict[str, float]:
    """The held-out metrics from the model's scores: regression (`scores["text"]` against
    `held_out["target"]`): eval/mse, eval/pearson, eval/spearman (Pearson of average ranks, so
    ties share a rank); pairwise: eval/accuracy, the share of pairs scored chosen > rejected."""
    if kind == "pairwise":
        return {"eval/accuracy": float(np.mean(scores["chosen"] > scores["rejected"]))}
    pred, target = scores["text"].astype(np.float64), held_out["target"].astype(np.float64)
    return {"eval/mse": float(np.mean((pred - target) ** 2)), "eval/pearson": _pearson(pred, target),
            "eval/spearman": _pearson(_ranks(pred), _ranks(target))}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0  # a constant has no correlation


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, tie_group = np.unique(x, return_inverse=True)
    return (np.bincount(tie_group, ranks) / np.bincount(tie_group))[tie_group]


def preflight(config: RewardConfig, resume: bool = False) -> dict:
    """Every check the run makes before it writes (model and tokenizer, the data, its columns
    and values, the held-out rows, the mesh, the run folder), writing nothing -> what the run
    needs. `--dry-run` runs exactly this."""
    train = config.train
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, _, tokenizer = common.load_model(
            config.model, config.model_config, config.tokenizer, train.seed, head="classification", num_labels=1,
            pad_token=config.pad_token, compute=config.compute)
    arrays, held_out = _split(config, tokenizer)
    n = len(next(iter(arrays.values())))
    mesh = common.train_mesh(train)
    output = common.check_output("reward", train, config, resume, n,
                                 inputs=(config.model, config.tokenizer, config.data.path, common.adapter_input(config),
                                         config.eval_data and config.eval_data.path))
    adapters, params = common.starting_adapters(config.lora, params, module.config.model_type)
    return {"module": module, "params": params, "tokenizer": tokenizer, "arrays": arrays, "held_out": held_out,
            "rows": n, "mesh": mesh, "output": output, "adapters": adapters}


def training(config: RewardConfig) -> common.Training:
    return common.Training(make_reward_step(config.kind), lora=common.lora_settings(config.lora))


def run(config: RewardConfig, resume: bool = False):
    train = config.train
    ready = preflight(config, resume)
    module, tokenizer, arrays, held_out, n, mesh = (
        ready[k] for k in ("module", "tokenizer", "arrays", "held_out", "rows", "mesh"))
    out, state, lr = common.start_training(ready, train, spec := training(config))
    step = data_parallel(spec.step, mesh, state)
    forward = classifier_forward(module)

    def evaluate(state) -> dict[str, float]:
        if held_out is None:
            return {}
        def scored(ids, mask):
            return score_rows(forward, state.model_params(state.params), held_out[ids], held_out[mask], mesh,
                              config.eval_batch_size)

        scores = {"text": scored("input_ids", "attention_mask")} if config.kind == "regression" else \
            {side: scored(f"{side}_ids", f"{side}_mask") for side in ("chosen", "rejected")}
        return held_out_metrics(config.kind, scores, held_out)

    def step_fn(state, i):
        batch = data.take(arrays, data.batch_indices(n, train.batch_size, i, train.seed))
        return step(state, batch, common.step_key(train.seed, i))

    state = common.train_loop(out, state, step_fn, train, resume, "reward", evaluate=evaluate,
                              extra_metrics=lambda s: {"learning_rate": lr(s), "epoch": s / max(n // train.batch_size, 1)})
    return common.export(out, module, state, tokenizer, spec.lora, config.model)
