"""Timing helpers shared by the benchmarks: interleaved runs, medians, a results table.

Each workload is a zero-argument callable that runs one step to completion (blocking on its
outputs). The first call of each is timed apart as compile/warm-up; the steady-state calls of
all contenders are interleaved (A B A B ...) so machine drift hits them alike.
"""

import platform
import statistics
import subprocess
import time
from importlib.metadata import version
from typing import Callable


def run_interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """-> {name: {"first_s": first call, "median_s": steady-state median, "times": [...]}}."""
    results = {}
    for name, fn in contenders.items():
        start = time.perf_counter()
        fn()
        results[name] = {"first_s": time.perf_counter() - start, "times": []}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            results[name]["times"].append(time.perf_counter() - start)
    for r in results.values():
        r["median_s"] = statistics.median(r["times"])
    return results


def machine_summary() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    import os

    packages = ", ".join(f"{p} {version(p)}" for p in ("jax", "flax", "torch", "transformers"))
    return f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}; {packages}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
