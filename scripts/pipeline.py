"""Run the jaxrlhf pipeline on a config folder (default: the offline, CPU-sized configs/tiny).

What runs today: the model stage. It builds the policy (GPT-2 with a value head) and the
reward model (BERT regression head) from `models.yaml`, exports both in Hugging Face layout
under the output folder, loads them back and checks that the reload gives the same outputs.
The training stages join this script as they land.
"""

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxrlhf.errors import JaxRLHFError  # noqa: E402
from jaxrlhf.models import from_config, load_pretrained, save_pretrained  # noqa: E402

HEADS = {"policy": dict(head="lm", value_head=True), "reward": dict(head="classification")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=ROOT / "configs" / "tiny")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    models_file = args.config_dir / "models.yaml"
    try:
        models = yaml.safe_load(models_file.read_text())
    except OSError as e:
        print(f"error: cannot read {models_file}: {e}", file=sys.stderr)
        return 2
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    try:
        for i, (role, spec) in enumerate(models.items()):
            if role not in HEADS:
                raise JaxRLHFError(f"{models_file}: unknown model role {role!r}; expected {sorted(HEADS)}")
            module, params, _ = from_config(spec, jax.random.key(args.seed + i), where=f"{models_file}:{role}", **HEADS[role])
            n_params = sum(x.size for x in jax.tree.leaves(params))
            out_dir = save_pretrained(args.out / "models" / role, module, params)
            module2, params2, _ = load_pretrained(out_dir, **HEADS[role])
            before, after = module.apply({"params": params}, ids), module2.apply({"params": params2}, ids)
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
            print(f"{role:7s} {type(module).__name__:30s} {n_params / 1e6:6.2f}M params -> {out_dir} "
                  f"(reload {'identical' if same else 'DIFFERS'})")
            if not same:
                return 1
    except JaxRLHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
