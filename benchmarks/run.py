"""jaxrlhf against PyTorch transformers and TRL, workload by workload, on the same random-init
weights, data and settings. Run from the repository root, in the test environment
(`pip install -c constraints.txt -e '.[test]'`, which brings torch, transformers and TRL):

    python benchmarks/run.py                 # everything; rewrites the table in RESULTS.md
    python benchmarks/run.py --quick         # tiny model, short batches, 2 repeats, prints only
    python benchmarks/run.py --only sft,dpo  # a subset

Each contender runs in its own process (so threads, caches and peak memory are its own), on
the weights one process prepares per model size. A first step per side is timed apart
(compile / warm-up); then the sides take turns, one step each (A B A B ...), so drift of the
machine hits both alike. TRL 1.12.0, the last release with PPO, is installed (once) into
benchmarks/.trl-1.12.0 and put first on the PPO reference's path.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import workloads as wl  # noqa: E402
from benchmarks.worker import MATMUL_N  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TRL_PPO_VERSION = "1.12.0"
TRL_PPO_DIR = ROOT / "benchmarks" / f".trl-{TRL_PPO_VERSION}"
START, END = "<!-- table:start (written by benchmarks/run.py) -->", "<!-- table:end -->"


class WorkerError(RuntimeError):
    pass


def ensure_trl_for_ppo(target: Path = TRL_PPO_DIR) -> Path:
    """TRL 1.12.0 (no dependencies: the rest of the environment is shared) in `target`."""
    if not (target / "trl").is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        print(f"installing trl=={TRL_PPO_VERSION} into {target} for the PPO reference", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(staging),
                        f"trl=={TRL_PPO_VERSION}"], check=True)
        staging.rename(target)
    return target


class Worker:
    """A `benchmarks.worker` process; its library output goes to `log`."""

    def __init__(self, role: str, w: wl.Workload, workdir: Path, log: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(TRL_PPO_DIR)] * (role == "reference" and w.name == "ppo") + [str(ROOT)]))
        env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        self.role, self.log = role, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", role, json.dumps(dataclasses.asdict(w)), str(workdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True, cwd=ROOT, env=env)

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        reply = json.loads(line) if line else {"error": f"exited with code {self.proc.wait()}"}
        if "error" in reply:
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise WorkerError(f"{self.role} worker: {reply['error']}\n--- end of {self.log} ---\n{tail}")
        return reply

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.receive()["seconds"]

    def finish(self) -> float:
        """Stop the worker -> its peak resident memory in MB."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = self.receive()["peak_rss_mb"]
        self.proc.wait()
        return peak


def _run_once(role: str, w: wl.Workload, workdir: Path, log: Path) -> dict:
    worker = Worker(role, w, workdir, log)
    try:
        return worker.receive()
    finally:
        worker.proc.wait()


def matmul_peak(workdir: Path) -> dict[str, float]:
    """Measured float32 matmul FLOP/s of each framework on this machine."""
    w = wl.workloads(quick=True)[0]
    return {side: _run_once(f"peak-{side}", w, workdir, workdir / f"peak-{side}.log")["flops_per_s"]
            for side in ("ours", "reference")}


def bench(w: wl.Workload, repeats: int, workdir: Path) -> dict:
    """Times of both sides on one workload -> {side: {"first_s", "median_s", "peak_mb"}}.
    The weights of `w`'s model size are prepared in `workdir` by the first workload of that size."""
    if not workdir.exists():
        workdir.mkdir(parents=True)
        _run_once("prepare", w, workdir, workdir / "prepare.log")
    sides = {}
    try:
        for side in ("ours", "reference"):  # one at a time: set-up peaks stay apart
            sides[side] = Worker(side, w, workdir, workdir / f"{w.name}-{side}.log")
            sides[side].receive()
        times = {side: [] for side in sides}
        first = {side: worker.step() for side, worker in sides.items()}
        for i in range(repeats):
            for side, worker in sides.items():
                times[side].append(worker.step())
            print(f"  {w.label} (batch {w.batch}): round {i + 1}/{repeats}: "
                  + ", ".join(f"{s} {t[-1]:.3f} s" for s, t in times.items()), file=sys.stderr)
        return {side: {"first_s": first[side], "median_s": statistics.median(times[side]),
                       "peak_mb": worker.finish()} for side, worker in sides.items()}
    finally:
        for worker in sides.values():
            worker.proc.kill()


def row(w: wl.Workload, r: dict, peak_flops: float) -> list[str]:
    ours, ref = r["ours"], r["reference"]
    flops = wl.step_flops(w)
    return [
        w.name, w.size, str(w.batch),
        f"{ours['median_s'] * 1e3:.1f}", f"{ref['median_s'] * 1e3:.1f}",
        f"**{ref['median_s'] / ours['median_s']:.2f}x**",
        f"{w.tokens() / ours['median_s']:.0f}", f"{w.tokens() / ref['median_s']:.0f}",
        f"{ours['first_s'] - ours['median_s']:.1f}", f"{ref['first_s'] - ref['median_s']:.1f}",
        f"{ours['peak_mb']:.0f}", f"{ref['peak_mb']:.0f}",
        f"{100 * flops / ours['median_s'] / peak_flops:.1f}%", f"{100 * flops / ref['median_s'] / peak_flops:.1f}%",
    ]


HEADER = ["workload", "model", "batch", "jaxrlhf ms", "reference ms", "speed-up", "jaxrlhf tok/s", "reference tok/s",
          "jaxrlhf compile s", "reference warm-up s", "jaxrlhf peak MB", "reference peak MB",
          "jaxrlhf % of matmul peak", "reference % of matmul peak"]
REFERENCES = {
    "sft": "transformers GPT2LMHeadModel / LlamaForCausalLM + torch fused AdamW",
    "generation": "transformers GPT2LMHeadModel / LlamaForCausalLM .generate",
    "dpo": "TRL DPOTrainer",
    "ppo": f"TRL {TRL_PPO_VERSION} trl.experimental.ppo.PPOTrainer",
    "rloo": f"TRL {version('trl')} RLOOTrainer",
    "grpo": f"TRL {version('trl')} GRPOTrainer",
    "reward": "transformers BertForSequenceClassification (regression) + torch fused AdamW",
}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machine_summary() -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    packages = ", ".join(f"{p} {version(p)}" for p in ("jax", "flax", "optax", "torch", "transformers", "trl"))
    return (f"{model}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
            f"Python {platform.python_version()}; {packages}; PPO reference: trl {TRL_PPO_VERSION}")


def report(command: str, peaks: dict, rows: list[list[str]], repeats: int, workloads: list[wl.Workload]) -> str:
    shapes = {w.name: w for w in workloads}
    batches = {name: sorted({w.batch for w in workloads if w.name == name}) for name in shapes}
    lines = [
        f"Machine: {machine_summary()}", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}; steady-state medians of {repeats} interleaved steps "
        "per side, after one first step timed apart; compile / warm-up = that first step minus the median step; "
        "peak MB = the worker process's peak resident memory, loading included).", "",
        f"Measured float32 matmul peak ({MATMUL_N}x{MATMUL_N} @ {MATMUL_N}x{MATMUL_N}, best of 10): jaxrlhf (XLA) "
        f"{peaks['ours'] / 1e9:.0f} GFLOP/s, PyTorch {peaks['reference'] / 1e9:.0f} GFLOP/s; the % columns divide "
        "model FLOPs per second (benchmarks/workloads.py: matmuls only, every position through the LM head, "
        "a training step = 3 forwards) by the larger.", "",
        markdown_table(HEADER, rows), "",
        "References and shapes:", "",
    ]
    for name, ref in REFERENCES.items():
        if name in shapes:
            w = shapes[name]
            lines.append(f"- **{name}**: {ref}; batch {' and '.join(map(str, batches[name]))}, {_shape(w)}.")
    return "\n".join(lines)


def _shape(w: wl.Workload) -> str:
    return {
        "sft": f"{w.prompt}-token prompt + {w.response}-token response (loss on the response), one AdamW step",
        "generation": f"{w.prompt}-token prompts, {w.response} new tokens sampled at temperature 1, no EOS stop",
        "dpo": f"pairs of {w.prompt}-token prompt + {w.response}-token responses, sigmoid loss with the "
               "reference scored in the step, one AdamW step",
        "ppo": f"one iteration: {w.batch} rollouts of {w.response} tokens after {w.prompt}-token prompts, "
               f"reference, value and reward-model scoring, GAE, {wl.PPO_EPOCHS} epochs of 1 minibatch",
        "rloo": _group_shape(w, "the sequence-level KL-shaped reward, leave-one-out advantages"),
        "grpo": _group_shape(w, "group-normalised advantages, the dapo loss with the k3 KL"),
        "reward": f"{w.response} tokens, MSE regression head, one AdamW step",
    }[w.name]


def _group_shape(w: wl.Workload, what: str) -> str:
    return (f"one iteration: {w.batch // wl.GROUP_SIZE} prompts of {w.prompt} tokens x {wl.GROUP_SIZE} samples of "
            f"{w.response} tokens, reward-model, policy and reference scoring (beta {wl.GROUP_BETA}), {what}, "
            "one AdamW step")


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace the generated block of `path` (between the markers), keeping the prose around it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if START not in old or END not in old:  # a file without a table yet: add one at the end
        old = f"{old.rstrip()}\n\n{START}\n{END}\n"
    head, rest = old.split(START, 1)
    tail = rest.split(END, 1)[1]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    tmp.replace(path)


def main(argv=None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only, short batches, 2 repeats; prints, writes nothing")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved steps per side (default 5, quick 2)")
    parser.add_argument("--only", default="",
                        help="comma-separated workloads (sft,generation,dpo,ppo,rloo,grpo,reward)")
    parser.add_argument("--models", default="", help="comma-separated model sizes (tiny,gpt2-small,smollm2-135m,minilm)")
    parser.add_argument("--write", type=Path, default=None,
                        help=f"results file to update (default {RESULTS.relative_to(ROOT)} unless --quick)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    chosen = [w for w in wl.workloads(args.quick) if (not args.only or w.name in args.only.split(","))
              and (not args.models or w.size in args.models.split(","))]
    unknown = set(filter(None, args.only.split(","))) - set(REFERENCES)
    if unknown:
        parser.error(f"--only: unknown workload(s) {sorted(unknown)}; choose from {sorted(REFERENCES)}")
    if any(w.name == "ppo" for w in chosen):
        ensure_trl_for_ppo()
    with tempfile.TemporaryDirectory(prefix="jaxrlhf-bench-") as tmp:
        tmp = Path(tmp)
        print(f"measuring the matmul peak; worker logs in {tmp}", file=sys.stderr)
        peaks = matmul_peak(tmp)
        rows = []
        for i, w in enumerate(chosen):
            print(f"[{i + 1}/{len(chosen)}] {w.label} (batch {w.batch})", file=sys.stderr)
            rows.append(row(w, bench(w, repeats, tmp / w.size), max(peaks.values())))
    command = "python benchmarks/run.py" + " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    text = report(command.strip(), peaks, rows, repeats, chosen)
    print(text)
    target = args.write or (None if args.quick else RESULTS)
    if target:
        write_results(text, target)
    return rows


if __name__ == "__main__":
    main()
