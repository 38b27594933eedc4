"""One benchmark contender in its own process, driven by `benchmarks/run.py`.

    python -m benchmarks.worker ROLE WORKLOAD_JSON WORKDIR

ROLE is `prepare` (write the shared random-init weights, then exit), `ours` / `reference`
(set a workload up, then run one step per `step` line read on stdin) or `peak-ours` /
`peak-reference` (measure that framework's float32 matmul rate). Replies are JSON lines on
the original stdout; everything the libraries print goes to stderr.
"""

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

MATMUL_N = 2048  # big enough to reach the matmul peak on a CPU, small enough to be quick


def _matmul_flops_per_s(role: str, repeats: int = 10) -> float:
    """Best of `repeats` timed float32 MATMUL_N^2 matmuls (after a warm-up)."""
    import numpy as np

    a = np.random.default_rng(0).normal(size=(MATMUL_N, MATMUL_N)).astype(np.float32)
    if role == "peak-ours":
        import jax

        x = jax.device_put(a)
        mm = jax.jit(lambda x: x @ x)

        def run():
            mm(x).block_until_ready()
    else:
        import torch

        x = torch.from_numpy(a)

        def run():
            x @ x

    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_N**3 / best


def main(argv: list[str]) -> None:
    role, workload_json, workdir = argv
    # Keep the protocol channel to ourselves: library output on fd 1 goes to stderr instead.
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(**fields):
        reply_to.write(json.dumps(fields) + "\n")

    try:
        if role.startswith("peak-"):
            reply(flops_per_s=_matmul_flops_per_s(role))
            return
        from benchmarks.workloads import Workload

        workload, workdir = Workload(**json.loads(workload_json)), Path(workdir)
        if role == "prepare":
            from benchmarks import ours

            ours.prepare(workload, workdir)
            reply(prepared=True)
            return
        from benchmarks import ours, reference

        step = {"ours": ours, "reference": reference}[role].setup(workload, workdir)
        reply(ready=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            start = time.perf_counter()
            step()
            reply(seconds=time.perf_counter() - start)
        reply(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    except Exception as e:  # noqa: BLE001 - reported to the driver, traceback in the log
        traceback.print_exc()
        reply(error=f"{type(e).__name__}: {e}")
    finally:
        reply_to.flush()
        sys.stderr.flush()
        # TRL's trainer thread is paused mid-train(); leave without waiting for it.
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
