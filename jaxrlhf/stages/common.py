"""What every stage does the same way: models in, optimizer, the run folder, the export."""

import json
from pathlib import Path
from typing import Any

import jax

from jaxrlhf import config as cfg
from jaxrlhf.errors import ConfigError, JaxRLHFError
from jaxrlhf.models import from_config, load_pretrained, load_tokenizer, save_pretrained
from jaxrlhf.parallel import local_devices
from jaxrlhf.steps import make_optimizer


def load_model(path: str | None, model_config: dict | None, tokenizer_path: str | None, seed: int, head: str,
               num_labels: int | None = None):
    """A pretrained checkpoint (`path`), or a fresh model from `model_config` (a config.json
    dict) with the tokenizer at `tokenizer_path` -> (module, params, config, tokenizer).
    `num_labels` sets a classification head's width (a new head where the checkpoint differs)."""
    if (path is None) == (model_config is None):
        raise ConfigError("give exactly one of model (a checkpoint path or hub name) or model_config (a fresh model)")
    if path is not None:
        module, params, config = load_pretrained(path, rng=jax.random.key(seed), head=head, num_labels=num_labels)
        tokenizer = load_tokenizer(tokenizer_path or path, config)
    else:
        if tokenizer_path is None:
            raise ConfigError("model_config needs a tokenizer path (the key 'tokenizer')")
        model_config = dict(model_config) | ({} if num_labels is None else {"num_labels": num_labels})
        module, params, config = from_config(model_config, jax.random.key(seed), where="model_config", head=head)
        tokenizer = load_tokenizer(tokenizer_path, config)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {path or tokenizer_path} has no pad token; set one (e.g. to EOS)")
    return module, params, config, tokenizer


def check_context(tokens: int, what: str, model_config) -> None:
    """`what` (`tokens` long) must fit the model's positions."""
    if tokens > model_config.n_positions:
        raise ConfigError(f"{what} exceeds the model's context (n_positions={model_config.n_positions})")


def optimizer(train: cfg.TrainConfig):
    return make_optimizer(
        train.learning_rate, schedule=train.schedule, warmup_steps=train.warmup_steps, total_steps=train.steps,
        max_grad_norm=train.max_grad_norm, weight_decay=train.weight_decay, grad_accum_steps=train.grad_accum_steps)


def prepare_output(train: cfg.TrainConfig, config: Any, resume: bool) -> Path:
    """Create the run folder and record the resolved config in it (after the last check that
    needs no data: the devices exist)."""
    local_devices(train.devices)
    out = Path(train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise JaxRLHFError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    if (out / "final").exists() and not resume:
        raise JaxRLHFError(f"{out / 'final'} already exists from an earlier run; choose another output_dir "
                           "(or pass --resume to finish that run)")
    # The working directory too: the config's relative paths are relative to it (export needs them).
    record = {**cfg.to_dict(config), "_working_dir": str(Path.cwd())}
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def export(out: Path, module, params, tokenizer) -> Path:
    path = save_pretrained(out / "final", module, params, tokenizer=tokenizer)
    print(f"exported {type(module).__name__} in Hugging Face layout to {path}")
    return path


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)
