"""Where the reward step's time goes, op by op, in jaxrlhf (XLA) and in PyTorch side by side.

    python benchmarks/reward_profile.py            # the MiniLM regression step of benchmarks/run.py
    python benchmarks/reward_profile.py --write    # and rewrite the table in benchmarks/RESULTS.md

Both sides run the reward workload's step (`benchmarks/ours.py`, `benchmarks/reference.py`: the
same random-init weights and batch, one AdamW step). jaxrlhf's step is traced with
`jax.profiler` and every op joined to the compiled program's HLO through its `op_name`, as
`decode_profile.py` does (trace events not named after an instruction of the step are runtime
and Python spans, not ops); PyTorch's with `torch.profiler`, each aten op's self time, counted
in the category of its outermost aten caller that has one (the zero-fills and copies inside
PyTorch's attention kernel are attention), else its own. Both are summed per category over
the traced steps and divided by their number. Op times are summed over the runtimes'
threads, so a step's op time and its wall time differ.
"""

import argparse
import collections
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import ours, reference  # noqa: E402
from benchmarks import workloads as wl  # noqa: E402
from benchmarks.profiling import call_ms, hlo_op_names, layout_only, trace_events, write  # noqa: E402
from benchmarks.run import RESULTS, markdown_table  # noqa: E402

START, END = "<!-- reward-profile:start (written by benchmarks/reward_profile.py) -->", "<!-- reward-profile:end -->"
WORKLOAD = next(w for w in wl.workloads(quick=False) if w.name == "reward")
DENSE = r"/(query|key|value|attn_out|ffn_in|ffn_out|pooler|classifier)/"
OTHER, LAST = "dense bias gradients, residuals, other model ops", "loss, clipping, AdamW"
# (category, test on a jaxrlhf op: its lower-cased op_name, HLO instruction name and whether it
# only moves data, test on a PyTorch aten op's name); the first match wins. The last two are
# what is left on each side.
CATEGORIES = [
    ("dense matmuls", lambda o, n, moves: re.search(DENSE, o) and ("dot_general" in o or n.startswith("dot")),
     lambda a: a in ("aten::mm", "aten::addmm")),
    # XLA's batched matmul wants each head's rows contiguous: the head transposes and other
    # layout changes; PyTorch's `contiguous` / `reshape` copies
    ("copies and transposes", lambda o, n, moves: moves,
     lambda a: a in ("aten::copy_", "aten::clone", "aten::contiguous")),
    ("LayerNorm", lambda o, n, moves: re.search(r"(layernorm|_ln)/", o), lambda a: "layer_norm" in a),
    ("attention (scores, mask, softmax, context)", lambda o, n, moves: "/attention/" in o,
     lambda a: "attention" in a or a in ("aten::bmm", "aten::baddbmm", "aten::_softmax")),
    ("GELU", lambda o, n, moves: "/activation/" in o, lambda a: "gelu" in a),
    ("embeddings", lambda o, n, moves: "/embeddings/" in o,
     lambda a: "embedding" in a or a == "aten::index_select"),
    (OTHER, lambda o, n, moves: "bertforsequenceclassification" in o,
     lambda a: not re.search(r"adam|foreach|norm|clip|mse|zero|fill", a)),
    (LAST, lambda o, n, moves: True, lambda a: True),
]


def xla_category(op_name: str, instruction: str, moves_data_only: bool) -> str:
    """The category of a jaxrlhf op, from its op_name, HLO instruction name and whether it only
    moves data (`profiling.layout_only`)."""
    return next(c for c, test, _ in CATEGORIES if test(op_name.lower(), instruction, moves_data_only))


def torch_category(event) -> str:
    """The category of a PyTorch profiler event (an aten op): that of its outermost aten
    caller (or itself) with one of the named categories; else one of the last two, by its
    outermost aten caller (the fill inside `mse_loss` is the loss's)."""
    chain = []
    while event is not None:
        if event.name.startswith("aten::"):  # autograd nodes and Python spans are not ops
            chain.append(event.name)
        event = event.cpu_parent
    for name in reversed(chain):
        named = next((c for c, _, test in CATEGORIES[:-2] if test(name)), None)
        if named:
            return named
    return next(c for c, _, test in CATEGORIES[-2:] if test(chain[-1]))


def dense_flops(params, tokens: int) -> int:
    """The FLOPs of a training step's encoder matmuls: every 2-D kernel of the encoder layers
    times `tokens` rows, forward and the two gradients (the pooler and head see one row per
    sequence and are left out)."""
    kernels = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
               if x.ndim == 2 and re.search(r"layer_\d+/.*kernel", "/".join(str(getattr(k, "key", k)) for k in path))]
    return 6 * tokens * sum(x.size for x in kernels)


def ours_ops(workdir: Path, steps: int, w: wl.Workload = WORKLOAD) -> dict:
    """jaxrlhf's step of `w` (its model prepared in `workdir`) -> op ms per step by category,
    the median wall ms, the encoder matmuls' FLOPs."""
    step, state, batch = ours.reward_step(w, workdir / "model")
    hlo = step.lower(state, batch, jax.random.key(0)).compile().as_text()
    names, moves = hlo_op_names(hlo), layout_only(hlo)
    flops = dense_flops(state.params, w.batch * w.response)
    run = ours.runner(step, state, batch)
    wall_ms = statistics.median(call_ms(run, steps))
    ops = collections.Counter()
    for e in trace_events(run, steps):
        if e["name"] in names:
            ops[xla_category(names[e["name"]], e["name"], e["name"] in moves)] += e["dur"] / 1e3 / steps
    return {"ops": ops, "wall_ms": wall_ms, "dense_flops": flops}


def reference_ops(workdir: Path, steps: int, w: wl.Workload = WORKLOAD) -> dict:
    """PyTorch's step of `w` -> each aten op's self ms per step by category, the median wall ms."""
    import torch

    run = reference.setup(w, workdir)
    wall_ms = statistics.median(call_ms(run, steps))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    ops = collections.Counter()
    for e in prof.events():
        if e.name.startswith("aten::"):
            ops[torch_category(e)] += e.self_cpu_time_total / 1e3 / steps
    return {"ops": ops, "wall_ms": wall_ms}


def table(results: dict, flops: int) -> str:
    """Op ms per category, their sum and the wall time, one column per side of `results`; and
    the dense matmuls' rate from their `flops` (both sides do the same)."""
    sides = list(results)
    rows = [[c] + [f"{results[s]['ops'].get(c, 0.0):.1f}" for s in sides] for c, *_ in CATEGORIES]
    rows.append(["**all ops of a step**"] + [f"**{sum(results[s]['ops'].values()):.1f}**" for s in sides])
    rows.append(["whole step, wall ms (median, not profiled)"] + [f"{results[s]['wall_ms']:.0f}" for s in sides])
    rows.append(["dense matmuls, GFLOP/s (the encoder layers' FLOPs over the row's op ms, which hold the "
                 "pooler and head too)"] + [f"{flops / max(results[s]['ops']['dense matmuls'], 1e-9) / 1e6:.0f}"
                                            for s in sides])
    return markdown_table(["per reward step, op ms"] + sides, rows)


def main(argv=None) -> str:
    """Profile both sides, print the table (and with `--write`, put it in RESULTS.md)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps timed and steps profiled, per side")
    parser.add_argument("--write", action="store_true", help="rewrite the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ours.prepare(WORKLOAD, Path(tmp))
        results = {"jaxrlhf (XLA)": ours_ops(Path(tmp), args.steps), "PyTorch": reference_ops(Path(tmp), args.steps)}
    w = WORKLOAD
    text = (f"Command: `python benchmarks/reward_profile.py{' --write' if args.write else ''}` "
            f"({time.strftime('%Y-%m-%d %H:%M')}), the {w.size} reward step, batch {w.batch} x {w.response} tokens, "
            f"jax {jax.__version__}, one CPU device.\n\n{table(results, results['jaxrlhf (XLA)']['dense_flops'])}")
    print(text)
    if args.write:
        write(text, RESULTS, START, END)
    return text


if __name__ == "__main__":
    main()
