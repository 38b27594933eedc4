"""Where the reward step's time goes, op by op, in jaxrlhf (XLA) and in PyTorch side by side.

    python benchmarks/reward_profile.py            # the MiniLM regression step of benchmarks/run.py
    python benchmarks/reward_profile.py --write    # and rewrite the table in benchmarks/RESULTS.md

Both sides run the reward workload's step (`benchmarks/ours.py`, `benchmarks/reference.py`: the
same random-init weights and batch, one AdamW step). jaxrlhf's step is traced with
`jax.profiler` and every op joined to the compiled program's HLO through its `op_name`, as
`decode_profile.py` does; PyTorch's with `torch.profiler`, each aten op's self time. Both are
summed per category over the traced steps and divided by their number. Op times are summed
over the runtimes' threads, so a step's op time and its wall time differ.
"""

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import ours, reference  # noqa: E402
from benchmarks import workloads as wl  # noqa: E402
from benchmarks.decode_profile import _computations, write  # noqa: E402
from benchmarks.run import markdown_table  # noqa: E402
from jaxrlhf.models import load_pretrained  # noqa: E402
from jaxrlhf.parallel import jit_step  # noqa: E402
from jaxrlhf.updates import make_reward_step  # noqa: E402

START, END = "<!-- reward-profile:start (written by benchmarks/reward_profile.py) -->", "<!-- reward-profile:end -->"
WORKLOAD = next(w for w in wl.workloads(quick=False) if w.name == "reward")
DENSE = r"/(query|key|value|attn_out|ffn_in|ffn_out|dense|classifier)/"
# (category, test on jaxrlhf's lower-cased op_name and HLO instruction name, test on a PyTorch
# aten op's name), first match wins on each side
CATEGORIES = [
    ("dense matmuls", lambda o, n: re.search(DENSE, o) and ("dot_general" in o or n.startswith("dot")),
     lambda a: a in ("aten::mm", "aten::addmm")),
    ("LayerNorm", lambda o, n: re.search(r"(layernorm|_ln)/", o), lambda a: "layer_norm" in a),
    ("attention (scores, softmax, context, head transposes)", lambda o, n: "/attention/" in o,
     lambda a: "attention" in a or a in ("aten::bmm", "aten::baddbmm", "aten::_softmax")),
    ("GELU", lambda o, n: "/activation/" in o, lambda a: "gelu" in a),
    # PyTorch's one large fill is the embedding table's zeroed gradient (jaxrlhf's: a broadcast)
    ("embeddings", lambda o, n: "/embeddings/" in o, lambda a: re.search(r"embedding|index_select|fill_", a)),
    ("dense bias gradients, residuals, other model ops", lambda o, n: "bertforsequenceclassification" in o,
     lambda a: not re.search(r"adam|foreach|norm|clip|mse|zero|fill", a)),
    ("loss, clipping, AdamW", lambda o, n: True, lambda a: True),
]


def _category(side: int, *args) -> str:
    """The category of an op: `side` 1 with (op_name, HLO name) for jaxrlhf, 2 with (aten name,)."""
    return next(c[0] for c in CATEGORIES if c[side](*args))


def ours_ops(workdir: Path, steps: int, w: wl.Workload = WORKLOAD) -> dict:
    """jaxrlhf's step of `w` (its model prepared in `workdir`): op ms per step by category and
    the median wall ms."""
    module, params, _ = load_pretrained(workdir / "model", head="classification", num_labels=1)
    b = wl.regression_batch(w)
    batch = jax.tree.map(jax.numpy.asarray, {"input_ids": b["input_ids"], "attention_mask": np.ones_like(b["input_ids"]),
                                             "target": b["target"]})
    step, state, keys = jit_step(make_reward_step("regression")), ours._state(module, params), ours._keys()
    names = _computations(step.lower(state, batch, next(keys)).compile().as_text())

    def run():
        nonlocal state
        state, metrics = step(state, batch, next(keys))
        jax.block_until_ready((state, metrics))

    walls = _walls(run, steps)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        trace = json.load(gzip.open(next(Path(tmp).rglob("*.trace.json.gz"))))
    ops = collections.Counter()
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if e.get("ph") == "X" and e["name"] in names:
            ops[_category(1, names[e["name"]].lower(), e["name"])] += e["dur"] / 1e3 / steps
    return {"ops": ops, "wall_ms": walls}


def reference_ops(workdir: Path, steps: int, w: wl.Workload = WORKLOAD) -> dict:
    """PyTorch's step of `w`: each aten op's self ms per step by category and the median wall ms."""
    import torch

    run = reference.setup(w, workdir)
    walls = _walls(run, steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    ops = collections.Counter()
    for e in prof.events():
        if e.name.startswith("aten::"):
            ops[_category(2, e.name)] += e.self_cpu_time_total / 1e3 / steps
    return {"ops": ops, "wall_ms": walls}


def _walls(run, steps: int) -> float:
    """The median wall ms of `steps` calls of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def table(results: dict) -> str:
    sides = list(results)
    rows = [[c] + [f"{results[s]['ops'].get(c, 0.0):.1f}" for s in sides] for c, *_ in CATEGORIES]
    rows.append(["**all ops of a step**"] + [f"**{sum(results[s]['ops'].values()):.1f}**" for s in sides])
    rows.append(["whole step, wall ms (median, not profiled)"] + [f"{results[s]['wall_ms']:.0f}" for s in sides])
    return markdown_table(["per reward step, op ms"] + sides, rows)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps timed and steps profiled, per side")
    parser.add_argument("--write", action="store_true", help="rewrite the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ours.prepare(WORKLOAD, Path(tmp))
        results = {"jaxrlhf (XLA)": ours_ops(Path(tmp), args.steps),
                   "PyTorch": reference_ops(Path(tmp), args.steps)}
    w = WORKLOAD
    text = (f"Command: `python benchmarks/reward_profile.py{' --write' if args.write else ''}` "
            f"({time.strftime('%Y-%m-%d')}), the {w.size} reward step, batch {w.batch} x {w.response} tokens, "
            f"jax {jax.__version__}, one CPU device.\n\n{table(results)}")
    print(text)
    if args.write:
        write(text, start=START, end=END)
    return text


if __name__ == "__main__":
    main()
