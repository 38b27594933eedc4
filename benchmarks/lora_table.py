"""The LoRA table of benchmarks/RESULTS.md: full fine-tuning against LoRA in SFT and GRPO.

SFT's and GRPO's own compiled update on one CPU device, full fine-tuning against `lora: {rank:
16, alpha: 32, targets: all-linear}`, on GPT-2 small's and SmolLM2-135M's shapes (random
weights from configs/models, no download): the memory per device from `memory.plan` and the
steady-state step time, the two variants timed in turn (A/B/A/B) so the machine's drift falls
on both. Prints the table; `--write` puts it in RESULTS.md between its markers.

    python benchmarks/lora_table.py --write      # about 25 minutes on 2 shared cores
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.memory_table import REWARD  # noqa: E402
from jaxrlhf import config as cfg, memory, parallel  # noqa: E402
from jaxrlhf.cli import stage  # noqa: E402
from jaxrlhf.models.hub import from_config  # noqa: E402
from jaxrlhf.stages import common  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- lora-table:start (written by benchmarks/lora_table.py) -->", "<!-- lora-table:end -->"
MODELS = ("gpt2-small", "smollm2-135m")
LORA = ["lora.rank=16", "lora.alpha=32", "lora.targets=all-linear"]
# Each stage's config and its step's shapes: SFT 8 rows of 128 tokens; GRPO 16 rollouts (2
# prompts x 8 generations) of 32 prompt + 32 new tokens, beta 0.04, a reward function.
STAGES = {"sft": (ROOT / "configs" / "smollm2" / "sft.yaml", ["train.batch_size=8", "max_length=128"]),
          "grpo": (ROOT / "configs" / "gpt2-imdb" / "grpo.yaml",
                   ["train.batch_size=16", "sampling.max_prompt_tokens=32", "sampling.max_new_tokens=32",
                    "sampling.prompt_length_range=null", *REWARD])}
HEADER = ("| model | stage | training | trained params | params + optimizer + reference MiB | update temporaries MiB "
          "| peak MiB | step s (median) |\n|---|---|---|---|---|---|---|---|")


def load(name: str, lora: bool, extra=()):
    path, shapes = STAGES[name]
    return cfg.load(stage(name)[1], path, [*shapes, *(LORA if lora else []), *extra])


def random_batch(shapes: dict, vocab: int, seed: int = 0) -> dict:
    """A batch of `shapes` (`memory._batch`'s): ids in the vocabulary, masks of ones, scores normal."""
    rng = np.random.default_rng(seed)
    return {k: rng.integers(0, vocab, s.shape, s.dtype) if k.endswith(("ids", "sequences")) else
            np.ones(s.shape, s.dtype) if k.endswith("mask") else rng.standard_normal(s.shape).astype(s.dtype)
            for k, s in shapes.items()}


def update(name: str, config, model: str):
    """The stage's update as it runs (`parallel.data_parallel`) on a random-weight model of
    `model`'s shape -> (step(state) -> state, its starting state, trained params)."""
    hf, build = memory._policy(name, config, model)
    module, params, _ = from_config(hf, jax.random.key(0), where=model, **common.model_options(config.compute), **build)
    training = stage(name)[0].training(config)
    mesh = common.train_mesh(config.train, getattr(getattr(config, name, None), "num_minibatches", 1), name)
    state = parallel.put_state(common.initial_state(module, params, config.train, training)[0], mesh)
    batch = random_batch(memory._batch(name, config, module, params), module.config.vocab_size)
    run, key = parallel.data_parallel(training.step, mesh, state), jax.random.key(1)
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    return lambda s: jax.block_until_ready(run(s, batch, key)[0]), state, trained


def timed(steps: dict, states: dict, repeats: int) -> dict:
    """Median seconds per step of each of `steps`, after one warm step each, the steps taken in
    turn (A/B/A/B) so load on the shared machine lands on every one alike."""
    seconds = {k: [] for k in steps}
    states = {k: steps[k](s) for k, s in states.items()}  # the compile and a first run
    for _ in range(repeats):
        for k, step in steps.items():
            started = time.perf_counter()
            states[k] = step(states[k])
            seconds[k].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in seconds.items()}


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def rows(model: str, name: str, repeats: int, extra=()) -> list[str]:
    """The table's two rows (full, LoRA) of `model` and stage `name`."""
    configs = {"full": load(name, False, extra), "LoRA r16 all-linear": load(name, True, extra)}
    plans = {k: memory.plan(name, c, model_config=model) for k, c in configs.items()}
    built = {k: update(name, c, model) for k, c in configs.items()}
    seconds = timed({k: b[0] for k, b in built.items()}, {k: b[1] for k, b in built.items()}, repeats)
    return [f"| {model} | {name} | {k} | {built[k][2]:,} | {mib(p.resident)} | {mib(p.parts['update temporaries'])} "
            f"| {mib(p.peak)} | {seconds[k]:.2f} |" for k, p in plans.items()]


def write(table: str, command: str) -> None:
    """The table between its markers in RESULTS.md (appended at the end the first time)."""
    text = RESULTS.read_text()
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    block = "\n".join([START, f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load "
                              f"average {load_avg} at the end, on 2 cores shared with other jobs).", "", table, END])
    if START in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each variant (default 3)")
    parser.add_argument("--write", action="store_true", help="put the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    memory.fake_cpu_devices(1)
    lines = [HEADER]
    for model in MODELS:
        for name in STAGES:
            lines += rows(model, name, args.repeats)
            print(*lines[-2:], sep="\n", flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        write(table, "python benchmarks/lora_table.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
