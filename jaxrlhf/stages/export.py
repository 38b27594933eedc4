"""Any stage checkpoint -> Hugging Face layout, rebuilt on the model the run started from."""

import json
from pathlib import Path

import jax
import numpy as np

from jaxrlhf.errors import CheckpointError
from jaxrlhf.models import load_pretrained, load_tokenizer, save_pretrained
from jaxrlhf.stages.common import load_model
from jaxrlhf.trainer import Checkpoints


def export_run(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """A stage's checkpoint (the latest, or `step`) -> HF layout in `out`, rebuilt on the
    model the run started from (named in its config.json)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{run_dir} is not a stage run folder (no readable config.json: {e})") from None
    base = Path(config.pop("_working_dir", "."))

    def local(path):  # the run's relative paths, from wherever export is run; hub names unchanged
        return str(base / path) if path and (base / path).exists() else path

    checkpoints = Checkpoints(run_dir, keep=1000)
    step = checkpoints.latest() if step is None else step
    if step is None or step not in checkpoints.manager.all_steps():
        raise CheckpointError(f"{run_dir / 'checkpoints'} has no checkpoint {'at all' if step is None else step}; "
                              f"it has {list(checkpoints.manager.all_steps())}")
    args = checkpoints.ocp.args
    params = checkpoints.manager.restore(step, args=args.Composite(state=args.StandardRestore()))["state"]["params"]
    if "policy" in config:  # PPO / DPO runs: a GPT-2 LM (PPO's value head is left out)
        module, _, model_config = load_pretrained(local(config["policy"]), head="lm")
        tokenizer = load_tokenizer(local(config["policy"]), model_config)
        params = {"transformer": params["transformer"]}
    else:  # SFT (an LM) or reward (a 1-output regression head) runs
        head = {"head": "classification", "num_labels": 1} if "kind" in config else {"head": "lm"}
        module, _, _, tokenizer = load_model(local(config.get("model")), config.get("model_config"),
                                             local(config.get("tokenizer")), 0, **head)
    return save_pretrained(out, module, jax.tree.map(np.asarray, params), tokenizer=tokenizer)
