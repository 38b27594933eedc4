"""The memory table of benchmarks/RESULTS.md: `memory.plan` on 8 fake CPU devices for PPO, GRPO
and DPO on GPT-2 small's, SmolLM2-135M's and Llama-3.1-8B's shapes, before and after each lever
this checkout has, pulled one after another. Rewrites only the table (between its markers),
after every row, so a stopped run leaves the rows it finished.

    python benchmarks/memory_table.py            # about 40 minutes on 2 cores
    python benchmarks/memory_table.py --only llama-3.1-8b:grpo
"""

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxrlhf import config as cfg, memory  # noqa: E402
from jaxrlhf.cli import stage  # noqa: E402

DEVICES = 8
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- memory-table:start (written by benchmarks/memory_table.py) -->", "<!-- memory-table:end -->"
MODELS = ("gpt2-small", "smollm2-135m", "llama-3.1-8b")
STAGES = ("ppo", "grpo", "dpo")
# What a step holds: (rollouts per step, prompt tokens, new tokens) for PPO and GRPO (GRPO: 8
# samples per prompt), (pairs per step, tokens per sequence) for DPO. The 8B rows are the goal's
# GRPO step: 64 prompts x 8 generations of 1,024 tokens, beta 0.04.
SHAPES = {"small": {"rollouts": (64, 64, 256), "pairs": (64, 320)},
          "llama-3.1-8b": {"rollouts": (512, 128, 1024), "pairs": (64, 1152)}}
REWARD = ["reward.model=null", "reward.function=reward:score"]  # a function: no reward model's bytes


def overrides(model: str, name: str) -> list[str]:
    """The stage's shapes, on configs/gpt2-imdb's settings (PPO: 4 epochs; GRPO: beta 0.04)."""
    shapes = SHAPES.get(model, SHAPES["small"])
    if name == "dpo":
        pairs, length = shapes["pairs"]
        return [f"train.batch_size={pairs}", f"max_length={length}"]
    rollouts, prompt, new = shapes["rollouts"]
    return [f"train.batch_size={rollouts}", f"sampling.max_prompt_tokens={prompt}", f"sampling.max_new_tokens={new}",
            "sampling.prompt_length_range=null", *REWARD]


def levers(name: str) -> list[tuple[str, list[str]]]:
    """Each row's levers, pulled one after another: the mesh's fsdp axis, microbatches, then
    the compute levers where the stage configs have them (a `compute` section)."""
    rows = [("data 8, fsdp 1 (none)", ["train.mesh.data=8", "train.mesh.fsdp=1"]),
            ("+ train.mesh.fsdp=8", ["train.mesh.data=1", "train.mesh.fsdp=8"]),
            ("+ train.grad_accum_steps=8", ["train.grad_accum_steps=8"])]
    fields = {f.name for f in dataclasses.fields(stage(name)[1])}
    if "compute" in fields:
        rows += [("+ compute.dtype=bfloat16", ["compute.dtype=bfloat16"]),
                 ("+ compute.remat=block", ["compute.remat=block"])]
    return rows


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def row(model: str, name: str, label: str, p: memory.Plan, seconds: float) -> str:
    parts = [gib(p.parts[k]) for k in memory.PARTS if k != "reward model"]
    return f"| {model} | {name} | {label} | {' | '.join(parts)} | **{gib(p.peak)}** | {seconds:.0f} |"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def order(line: str) -> tuple:
    """A row's place: by model, stage, then lever as pulled (rows of models or stages this
    script no longer plans go last)."""
    model, name, label = cells(line)[:3]
    labels = [l for l, _ in levers(name)] if name in STAGES else []
    return (MODELS.index(model) if model in MODELS else len(MODELS), STAGES.index(name) if name in STAGES else 9,
            labels.index(label) if label in labels else 9)


def write(rows: list[str]) -> None:
    """The table in RESULTS.md with `rows`, keeping the rows of other models, stages and levers
    it holds (so `--only` updates its own)."""
    header = ("| model | stage | levers (cumulative) | params | optimizer | reference | batch | update temporaries | "
              "KV cache | peak GiB | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    text = RESULTS.read_text()
    old = re.search(re.escape(START) + "(.*?)" + re.escape(END), text, flags=re.S)
    kept = {tuple(cells(r)[:3]): r for r in (old[1].splitlines() if old else [])
            if r.startswith("| ") and not r.startswith("| model")}
    kept |= {tuple(cells(r)[:3]): r for r in rows}
    table = "\n".join([START, f"Command: `python benchmarks/memory_table.py` (last run {time.strftime('%Y-%m-%d')}); "
                              f"GiB per device of {DEVICES} fake CPU devices (XLA's CPU compiler).", "", header,
                       *sorted(kept.values(), key=order), END])
    if old:
        text = text[:old.start()] + table + text[old.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    RESULTS.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="model:stage,... in this order (default: all); the table keeps the other rows")
    args = parser.parse_args(argv)
    memory.fake_cpu_devices(DEVICES)
    wanted = [tuple(w.split(":")) for w in args.only.split(",")] if args.only else \
        [(m, s) for m in MODELS for s in STAGES]
    rows = []
    for model, name in wanted:
        config_path = ROOT / "configs" / "gpt2-imdb" / f"{name}.yaml"
        pulled = ["grpo.beta=0.04"] if name == "grpo" else []
        for label, extra in levers(name):
            pulled += extra
            config = cfg.load(stage(name)[1], config_path, [*overrides(model, name), *pulled])
            started = time.perf_counter()
            p = memory.plan(name, config, model_config=model)
            rows.append(row(model, name, label, p, time.perf_counter() - started))
            print(rows[-1], flush=True)
            write(rows)


if __name__ == "__main__":
    main()
