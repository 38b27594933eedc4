"""Where a decode step's time goes: the sampler's compiled call profiled op by op.

    python benchmarks/decode_profile.py            # GPT-2 small and SmolLM2-135M, batch 16 and 64
    python benchmarks/decode_profile.py --write    # and rewrite the table in benchmarks/RESULTS.md

It also times the step's matmuls alone, in XLA and in PyTorch (the rate the whole step could
reach if nothing but its matmuls took time), and the same FLOPs as one matmul in XLA; it
measures the matmul peak as `benchmarks/run.py` does and gives each rate as a share of it.

Each case runs `sampling.generate` on the generation workload's shape (random-init weights of
the model's config, 8-token prompts, 48 new tokens at temperature 1), takes a
`jax.profiler` trace of one call after warm-ups, and joins every op of the trace to the
compiled program (`_generate`'s HLO) through its `op_name`, which names the JAX code it came
from. Ops inside the decoding `while_loop` are summed per category and divided by the decode
steps (new tokens - 1: the first token comes from the prefill). Op times are summed over the
runtime's threads (two ops may run at once), so a step's op time can exceed its wall time.
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
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import workloads as wl  # noqa: E402
from benchmarks.profiling import call_ms, hlo_op_names, trace_events, write  # noqa: E402
from benchmarks.run import RESULTS, markdown_table, matmul_peak  # noqa: E402
from jaxrlhf.models import from_config  # noqa: E402
from jaxrlhf.models.layers import init_cache  # noqa: E402
from jaxrlhf.sampling import SamplingConfig, _generate, generate  # noqa: E402

ONE_MATMUL = "jaxrlhf (XLA) as one matmul"
ALONE_REPEATS = 10  # calls of the matmuls alone, the fastest counted (as the peak's best of 10)
START, END = "<!-- decode-profile:start (written by benchmarks/decode_profile.py) -->", "<!-- decode-profile:end -->"
CASES = [("gpt2-small", 16), ("smollm2-135m", 16), ("gpt2-small", 64), ("smollm2-135m", 64)]
# (category, test on the op's lower-cased op_name and HLO instruction name), first match wins
CATEGORIES = [
    ("q/k/v projections", lambda o, n: "dot_general" in o and re.search(r"/(c_attn|q_proj|k_proj|v_proj)/", o)),
    ("attention output projection", lambda o, n: "dot_general" in o and re.search(r"/(attn/c_proj|o_proj)/", o)),
    ("MLP matmuls", lambda o, n: "dot_general" in o and "/mlp/" in o),
    ("LM head", lambda o, n: "dot_general" in o and re.search(r"(lmheadmodel|forcausallm|lm_head)/dot_general", o)),
    ("attention over the cache", lambda o, n: re.search(r"/(attn|self_attn)/", o) and re.search(
        r"einsum|dot_general|softmax|reduce_max|reduce_sum|exp|div|select|where|sub", o)
        and "dynamic_update_slice" not in o),
    ("copies and transposes", lambda o, n: re.search(r"transpose|copy", n) or re.search(r"transpose|repeat|pad", o)),
    ("cache and output writes", lambda o, n: "dynamic_update_slice" in o or "scatter" in o),
    ("random numbers", lambda o, n: re.search(r"threefry|random|uniform|fold_in", o)),
    ("sampling (vocabulary passes, search)", lambda o, n: not re.search(r"lmheadmodel|forcausallm", o)),
    ("norms, activations, residuals", lambda o, n: True),
]


def _category(op_name: str, name: str) -> str:
    o = op_name.lower()
    return next(c for c, test in CATEGORIES if test(o, name))


def profile(size: str, batch: int, calls: int = 3) -> dict:
    """-> wall ms of a call, op ms per decode step by category, prefill op ms, the call's model
    GFLOP/s."""
    w = wl.Workload("generation", size, batch=batch, prompt=8, response=48)
    module, params, _ = from_config(w.model_config(), jax.random.key(0), head="lm")
    ids = jnp.asarray(wl.prompts(w))
    mask = jnp.ones_like(ids)
    settings = SamplingConfig(max_new_tokens=w.response, pad_token_id=w.eos)
    rows = jnp.arange(batch, dtype=jnp.int32)

    seeds = iter(range(1_000_000))

    def call():  # a fresh key each call, as a user's rollouts
        generate(module, params, ids, mask, jax.random.key(next(seeds)), settings).sequences.block_until_ready()

    wall_ms = statistics.median(call_ms(call, calls))
    cache = init_cache(module.config, batch, w.prompt + w.response, module.dtype)
    names = hlo_op_names(_generate.lower(module, settings, params, cache, ids, mask, jax.random.key(0), rows)
                         .compile().as_text())
    steps = w.response - 1
    per_step, prefill = collections.Counter(), 0.0
    for e in trace_events(call):
        if e["name"] not in names:
            continue
        op_name = names[e["name"]]
        if "/while/body/" in op_name and "_generate" in op_name:
            per_step[_category(op_name, e["name"])] += e["dur"] / 1e3 / steps
        elif "_generate" in op_name:
            prefill += e["dur"] / 1e3
    return {"wall_ms": wall_ms, "per_step": per_step, "prefill_ms": prefill,
            "gflop_per_s": wl.step_flops(w) / wall_ms / 1e6}


def matmuls_alone(size: str, rows: int, repeats: int = ALONE_REPEATS) -> dict[str, float]:
    """GFLOP/s of one decode step's matmuls timed alone, the best of `repeats` calls ->
    {"jaxrlhf (XLA)": ..., "PyTorch": ..., ONE_MATMUL: ...}: every 2-D kernel of the model (and
    its LM head) times `rows` rows, each weight distinct and streamed from memory as in a decode
    step, nothing else (no attention, norms or sampling); and the same FLOPs and weight bytes as
    one `[rows, D] @ [D, N]` matmul in XLA: whether one large call at that row count does better
    than the step's many."""
    import numpy as np
    import torch

    w = wl.Workload("generation", size, batch=rows, prompt=8, response=48)
    _, params, _ = from_config(w.model_config(), jax.random.key(0), head="lm")
    kernels = [np.array(x) for path, x in jax.tree_util.tree_leaves_with_path(params)
               if x.ndim == 2 and "kernel" in jax.tree_util.keystr(path)]
    head = [np.ascontiguousarray(np.asarray(x).T) for path, x in jax.tree_util.tree_leaves_with_path(params)
            if re.search(r"wte|embed_tokens|lm_head", jax.tree_util.keystr(path))][:1]  # tied or not: one [D, V]
    weights = kernels + head
    xs = {k: np.random.default_rng(0).normal(size=(rows, k)).astype(np.float32) for k in {m.shape[0] for m in weights}}
    flops = sum(2 * rows * m.shape[0] * m.shape[1] for m in weights)
    step = jax.jit(lambda xs, ws: [xs[m.shape[0]] @ m for m in ws])
    on_device = jax.device_put((xs, weights))
    d = head[0].shape[0]
    wide = np.random.default_rng(1).standard_normal((d, flops // (2 * rows * d)), np.float32)
    one = jax.device_put((xs[d], wide))
    xt, wt = {k: torch.from_numpy(v) for k, v in xs.items()}, [torch.from_numpy(m) for m in weights]

    def torch_step():
        with torch.no_grad():
            return [xt[m.shape[0]] @ m for m in wt]

    runs = (("jaxrlhf (XLA)", lambda: jax.block_until_ready(step(*on_device))), ("PyTorch", torch_step),
            (ONE_MATMUL, lambda: jax.block_until_ready(jnp.matmul(*one))))
    # the fastest call, as the peak is measured: what the kernels can do at these shapes
    return {name: flops / min(call_ms(run, repeats)) / 1e6 for name, run in runs}


def table(results: dict, peak: float | None = None) -> str:
    """The per-step table of `profile`'s results by case; with `peak` (GFLOP/s), each call's
    model FLOP rate also as a share of it."""
    cases = list(results)
    header = ["per decode step, op ms"] + [f"{s} b{b}" for s, b in cases]
    rows = []
    for category, _ in CATEGORIES:
        cells = [results[c]["per_step"].get(category, 0.0) for c in cases]
        totals = [sum(results[c]["per_step"].values()) for c in cases]
        rows.append([category] + [f"{x:.2f} ({100 * x / t:.0f}%)" for x, t in zip(cells, totals)])
    rows.append(["**all ops of a step**"] + [f"**{sum(results[c]['per_step'].values()):.2f}**" for c in cases])
    rows.append(["prefill, op ms"] + [f"{results[c]['prefill_ms']:.1f}" for c in cases])
    rows.append(["whole call, wall ms (median)"] + [f"{results[c]['wall_ms']:.0f}" for c in cases])
    rows.append(["model GFLOP/s (benchmarks/workloads.py)"] + [
        f"{results[c]['gflop_per_s']:.1f}"
        + (f" ({100 * results[c]['gflop_per_s'] / peak:.0f}% of peak)" if peak else "") for c in cases])
    return markdown_table(header, rows)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(f"{s}:{b}" for s, b in CASES), help="model:batch,...")
    parser.add_argument("--write", action="store_true", help="rewrite the table in benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # the larger of XLA's and PyTorch's, as run.py's % columns
        peak = max(matmul_peak(Path(tmp)).values()) / 1e9
    results, alone = {}, []
    for case in args.cases.split(","):
        size, batch = case.split(":")
        print(f"profiling {size} batch {batch}", file=sys.stderr)
        results[(size, int(batch))] = profile(size, int(batch))
        alone.append(f"{size} at {batch} rows: " + ", ".join(
            f"{k} {v:.0f} ({100 * v / peak:.0f}%)" for k, v in matmuls_alone(size, int(batch)).items()))
    text = (f"Command: `python benchmarks/decode_profile.py{' --write' if args.write else ''}` "
            f"({time.strftime('%Y-%m-%d')}), jax {jax.__version__}, one CPU device; float32 matmul peak "
            f"{peak:.0f} GFLOP/s (as benchmarks/run.py measures it).\n\n{table(results, peak)}\n\n"
            "The same step's matmuls timed alone (every dense kernel and the LM head at the step's rows, distinct "
            "weights, nothing else; and the same FLOPs as one `[rows, D] @ [D, N]` matmul; the best of "
            f"{ALONE_REPEATS} calls, as the peak), "
            f"GFLOP/s (% of the peak): {'; '.join(alone)}.")
    print(text)
    if args.write:
        write(text, RESULTS, START, END)
    return text


if __name__ == "__main__":
    main()
