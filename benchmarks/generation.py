"""Generation speed: jaxrlhf.sampling.generate vs transformers' GPT2LMHeadModel.generate.

Same random-init weights (ours are exported and loaded by transformers), same prompts,
batch 16, prompt 8, 48 new tokens sampled at temperature 1 with no top-k/top-p and no EOS,
so both produce exactly 48 tokens per row. Run from the repository root:

    python benchmarks/generation.py [--quick] [--repeats N] [--write benchmarks/RESULTS.md]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import machine_summary, markdown_table, run_interleaved  # noqa: E402
from jaxrlhf.models import from_config, save_pretrained  # noqa: E402
from jaxrlhf.sampling import SamplingConfig, generate  # noqa: E402

CONFIGS = {
    "tiny (2x128)": dict(n_layer=2, n_head=4, n_embd=128),
    "gpt2-small (12x768)": dict(n_layer=12, n_head=12, n_embd=768),
}
BATCH, PROMPT, NEW = 16, 8, 48


def bench_config(name, cfg, repeats, batch, prompt, new):
    import torch
    import transformers

    torch.set_num_threads(2)  # both frameworks get the 2 cores
    module, params, _ = from_config({"model_type": "gpt2", "vocab_size": 50257, **cfg}, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(tmp, module, params)
        ref = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    ids = np.random.default_rng(0).integers(0, 50257, size=(batch, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    settings = SamplingConfig(max_new_tokens=new, pad_token_id=50256)
    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

    def ours():
        return generate(module, params, ids_j, mask_j, next(keys), settings).sequences.block_until_ready()

    def theirs():
        with torch.inference_mode():
            return ref.generate(ids_t, attention_mask=mask_t, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                max_new_tokens=new, min_new_tokens=new, pad_token_id=50256)

    r = run_interleaved({"jaxrlhf": ours, "transformers": theirs}, repeats)
    tokens = batch * new
    ratio = r["transformers"]["median_s"] / r["jaxrlhf"]["median_s"]
    return [
        name,
        f"{tokens / r['jaxrlhf']['median_s']:.0f}",
        f"{tokens / r['transformers']['median_s']:.0f}",
        f"**{ratio:.2f}x**",
        f"{r['jaxrlhf']['first_s']:.1f}",
        f"{r['transformers']['first_s']:.1f}",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny config only, 2 repeats, 4 new tokens")
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    configs = {k: v for k, v in CONFIGS.items() if not args.quick or k.startswith("tiny")}
    repeats, new = (2, 4) if args.quick else (args.repeats, NEW)
    header = ["config", "jaxrlhf tok/s", "transformers tok/s", "speed-up", "jaxrlhf first call s (compile)",
              "transformers first call s"]
    rows = [bench_config(name, cfg, repeats, BATCH, PROMPT, new) for name, cfg in configs.items()]
    table = markdown_table(header, rows)
    print(table)
    if args.write:
        command = "python benchmarks/generation.py" + (" --quick" if args.quick else f" --repeats {repeats}")
        text = (f"\n## Generation (batch {BATCH}, prompt {PROMPT}, {new} new tokens, sampling)\n\n"
                f"Machine: {machine_summary()}\n\nCommand: `{command}` (steady-state medians of {repeats} "
                f"interleaved runs; tokens/s counts new tokens)\n\n{table}\n")
        with open(args.write, "a") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
