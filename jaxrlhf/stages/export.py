"""Any stage checkpoint -> Hugging Face layout, rebuilt on the model the run started from."""

import json
from pathlib import Path

import jax
import numpy as np

from jaxrlhf import outputs
from jaxrlhf.errors import CheckpointError
from jaxrlhf.models import frozen_params, lora, save_pretrained
from jaxrlhf.stages.common import load_model, load_policy, save_lora_adapter
from jaxrlhf.trainer import Checkpoints


def export_run(run_dir: Path, out: Path, step: int | None = None, overwrite: bool = False) -> Path:
    """A stage's checkpoint (the latest, or `step`) -> HF layout in `out`, rebuilt on the
    model the run started from (named in its config.json). `out` replaces only an earlier
    export (anything else with `overwrite`), and never the run folder or the models it names."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{run_dir} is not a stage run folder (no readable config.json: {e})") from None
    base = Path(config.pop("_working_dir", "."))

    def local(path):  # the run's relative paths, from wherever export is run; hub names unchanged
        return str(base / path) if path and (base / path).exists() else path

    sources = [local(config.get(key)) for key in ("policy", "model", "tokenizer")]
    outputs.check_apart(out, [run_dir, *sources], "the export")
    outputs.check_replaceable(out, "export", overwrite)
    latest = Checkpoints.latest_in(run_dir)
    if latest is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} has no checkpoint at all")
    checkpoints = Checkpoints(run_dir, keep=1000)
    step = latest if step is None else step
    if step not in checkpoints.manager.all_steps():
        raise CheckpointError(f"{run_dir / 'checkpoints'} has no checkpoint {step}; "
                              f"it has {list(checkpoints.manager.all_steps())}")
    params = checkpoints.restore_params(step)
    if "policy" in config:  # PPO / DPO runs: a causal LM
        module, like, _, tokenizer = load_policy(local(config["policy"]))
    else:  # SFT (an LM) or reward (a 1-output regression head) runs
        head = {"head": "classification", "num_labels": 1} if "kind" in config else {"head": "lm"}
        module, like, _, tokenizer = load_model(local(config.get("model")), config.get("model_config"),
                                                local(config.get("tokenizer")), config["train"]["seed"], **head)
    section = config.get("lora")
    if section is not None:  # a LoRA checkpoint holds adapters and heads: merged onto the run's base
        base = frozen_params(like, config.get("compute", {}).get("dtype", "float32"))
        trained, params = params, lora.merged(base, params, section["alpha"] / section["rank"])
    params = {k: v for k, v in params.items() if k != "v_head"}  # PPO's value head is left out
    shapes = lambda tree: jax.tree.map(np.shape, tree)  # noqa: E731
    if jax.tree.structure(shapes(params)) != jax.tree.structure(shapes(like)) or shapes(params) != shapes(like):
        raise CheckpointError(f"checkpoint {step} in {run_dir} does not hold the {type(module).__name__} its "
                              f"config.json describes; is {run_dir / 'config.json'} that run's own?")
    path = save_pretrained(out, module, jax.tree.map(np.asarray, params), tokenizer=tokenizer, overwrite=overwrite,
                           source=str(run_dir.resolve()), step=step)
    if section is not None:  # and the adapter alone, in PEFT's format, where the run's end writes it
        settings = lora.settings(section["rank"], section["alpha"], section["dropout"], section["targets"])
        save_lora_adapter(run_dir / "adapter", trained, settings, module.config.model_type,
                          local(config.get("policy", config.get("model"))), source=str(run_dir.resolve()), step=step)
    return path
