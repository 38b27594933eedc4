"""What the profiling scripts share (`decode_profile.py`, `reward_profile.py`): timing a call,
tracing it with `jax.profiler`, reading the compiled HLO to name what the trace's ops are, and
rewriting a table between markers in RESULTS.md."""

import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax

# what only moves data: a fusion of these alone is a copy (XLA names fusions after the ops in
# them, so a softmax's backward fused with a transpose is called a copy too). A broadcast
# writes new data (a zero-filled gradient, say), so it is not one of them.
LAYOUT_OPCODES = {"parameter", "copy", "transpose", "bitcast", "reshape", "slice"}


def hlo_op_names(hlo: str) -> dict[str, str]:
    """instruction name -> its op_name metadata (the JAX code it came from), over every
    computation of the HLO text: a trace event's name is its instruction's."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if m:
            meta = re.search(r'op_name="([^"]+)"', line)
            out[m.group(1)] = meta.group(1) if meta else ""
    return out


def layout_only(hlo: str) -> set[str]:
    """The instructions of the HLO text that only move data: copies and transposes, and fusions
    whose computation has nothing but `LAYOUT_OPCODES`."""
    bodies, current, calls = {}, None, {}
    for line in hlo.splitlines():
        head = re.match(r"%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = bodies.setdefault(head.group(1), set())
            continue
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w\-]+)\(", line)
        if m and current is not None:
            current.add(m.group(2))
            called = re.search(r"calls=%([\w.\-]+)", line)
            calls[m.group(1)] = (m.group(2), called.group(1) if called else None)
    return {name for name, (opcode, called) in calls.items()
            if opcode in ("copy", "transpose") or (opcode == "fusion" and bodies.get(called, {"?"}) <= LAYOUT_OPCODES)}


def trace_events(run, calls: int = 1) -> list[dict]:
    """The complete ("X") events of a `jax.profiler` trace of `calls` calls of `run`; each
    event's `name` is an HLO instruction's (or a runtime's) and `dur` its microseconds."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                run()
        trace = json.load(gzip.open(next(Path(tmp).rglob("*.trace.json.gz"))))
    return [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]


def call_ms(run, calls: int) -> list[float]:
    """The wall ms of each of `calls` calls of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def write(text: str, path: Path, start: str, end: str) -> None:
    """Replace what lies between the `start` and `end` markers of `path` with `text`."""
    old = path.read_text()
    if start not in old:
        raise SystemExit(f"{path} has no {start} marker: add one where the table goes")
    head, rest = old.split(start, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
    tmp.replace(path)


