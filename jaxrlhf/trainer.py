"""The loop plumbing every stage shares: steps, progress, metric logs, checkpoints, resume.

A stage supplies `step_fn(state, step) -> (state, metrics)`, pure in `step` for its data and
randomness (batch `step` and key `fold_in(seed, step)`), so resuming from a checkpoint of
step k replays exactly what an uninterrupted run would have done from k on.
"""

import contextlib
import datetime
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax

from jaxrlhf import outputs, parallel
from jaxrlhf.errors import CheckpointError, JaxRLHFError, OutputError, first_line


class MetricLog:
    """Metric lines like the HF Trainer's on stdout, one JSON object per log in metrics.jsonl,
    and TensorBoard scalars when asked."""

    def __init__(self, out_dir: Path, tensorboard: bool = False, start: int = 0):
        """Records past step `start` (written after the checkpoint a run resumes from) are
        dropped, so that metrics.jsonl tells one story."""
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if _record_step(line) <= start]
            outputs.replace_file(self.path, "".join(kept), overwrite=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise JaxRLHFError("tensorboard: true needs the tensorboardX package (pip install tensorboardX)") from None
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float], echo: Callable[[str], None] = print) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        echo(str({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}))
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)
            self.writer.flush()


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: dropped


def last_good(directory, latest: int | None) -> str:
    """Where a run whose checkpoints are in `directory`, the latest complete one `latest`, can
    resume from, for a message."""
    return f"no checkpoint was written yet in {directory}" if latest is None else \
        f"the last good checkpoint is step {latest} in {directory}"


class Checkpoints:
    """orbax CheckpointManager over out_dir/checkpoints: the whole train state plus a JSON
    record (step, config). Writes are atomic (orbax finalises a step only when complete),
    so a killed save leaves the previous checkpoint as the latest."""

    def __init__(self, out_dir: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            (out_dir / "checkpoints").resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    @classmethod
    def latest_in(cls, out_dir: Path) -> int | None:
        """The latest complete checkpoint in `out_dir`, without creating anything."""
        return cls(out_dir, keep=1).latest() if (out_dir / "checkpoints").is_dir() else None

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def last_good(self) -> str:
        """Where a run stopped by a failure can resume from, for its error message."""
        return last_good(self.manager.directory, self.latest())

    def save(self, step: int, state: Any, record: dict) -> None:
        """Save `state` (`saved_part` of it) as checkpoint `step`; a failed write raises an
        OutputError naming the folder, the cause and the last good checkpoint (which a failed
        save leaves as it was)."""
        state = saved_part(state)
        directory = Path(self.manager.directory)
        last_good = self.last_good()
        # Checked first, because orbax reports a full or read-only disk from many threads at once;
        # by every process, and all stop if one cannot write (or they would wait for it in orbax).
        need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        failure = None
        try:
            probe = directory / f".write-test-{jax.process_index()}"
            probe.write_text("")
            probe.unlink()
            free = shutil.disk_usage(directory).free
        except OSError as e:
            failure = outputs.write_failed(directory, e, last_good)
        else:
            if free < need:
                failure = OutputError(f"cannot write checkpoint {step} to {directory}: not enough space "
                                      f"({free / 2**20:.1f} MiB free, {need / 2**20:.1f} MiB needed); {last_good}")
        if not parallel.all_ok(failure is None):
            raise failure or OutputError(f"cannot write checkpoint {step} to {directory}: another process "
                                         f"cannot (its error is in its own output); {last_good}")
        args = self.ocp.args
        try:
            with _interrupt_after():
                self.manager.save(step, args=args.Composite(state=args.StandardSave(state),
                                                            record=args.JsonSave(record)))
                self.manager.wait_until_finished()
        except Exception as e:  # orbax and tensorstore raise many types for one failed write
            raise OutputError(f"cannot write checkpoint {step} to {directory}: {first_line(e)}; {last_good}") from e

    def restore(self, step: int, template: Any) -> tuple[Any, dict]:
        """Checkpoint `step` in the layout of `template` (whatever mesh wrote it); what it does
        not hold (`saved_part`) is the template's."""
        args = self.ocp.args
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                saved_part(template))
        try:
            out = self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract),
                                                                 record=args.JsonRestore()))
        except Exception as e:  # orbax raises many types for a tree that does not fit
            raise CheckpointError(f"checkpoint {step} in {self.manager.directory} does not fit this model "
                                  f"and optimizer ({type(e).__name__}: {e})") from e
        state = out["state"]
        if getattr(template, "base_params", None) is not None:
            state = state.replace(base_params=template.base_params)
        return state, out["record"]

    def restore_params(self, step: int) -> Any:
        """The params of checkpoint `step` on this host's CPU, whatever mesh (devices, processes)
        wrote it: read into the layout its own metadata describes, placed on one device."""
        saved = self.ocp.StandardCheckpointer().metadata(Path(self.manager.directory) / str(step) / "state")
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host),
                              saved.item_metadata.tree)
        args = self.ocp.args
        return self.manager.restore(step, args=args.Composite(state=args.StandardRestore(target)))["state"]["params"]


def saved_part(state: Any) -> Any:
    """What a checkpoint holds of a train state: all of it but a LoRA run's frozen base, which
    the run reloads from its starting model (the checkpoint holds the adapters and heads)."""
    return state.replace(base_params=None) if getattr(state, "base_params", None) is not None else state


class Progress:
    """Steps done, shown by process 0: tqdm's bar on stderr when that is a terminal; anywhere else
    (nohup, SLURM, CI logs), where tqdm switches its bar off, a plain line on stdout (beside the
    metric records; stderr keeps what went wrong) when the loop starts, then at most every
    `every` seconds, and at the end."""

    def __init__(self, desc: str, total: int, start: int, every: float):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=sys.stderr,
                        disable=None if parallel.is_main() else True, mininterval=1.0)
        self.plain = parallel.is_main() and self.bar.disable
        self.desc, self.total, self.start, self.every = desc, total, start, every
        self.started = self.shown = time.perf_counter()
        if self.plain:
            print(progress_line(desc, start, total, 0, 0.0), flush=True)

    def update(self, done: int) -> None:
        self.bar.update(1)
        now = time.perf_counter()
        if self.plain and (done == self.total or now - self.shown >= self.every):
            self.shown = now
            print(progress_line(self.desc, done, self.total, done - self.start, now - self.started), flush=True)

    def write(self, line: str) -> None:
        """A line of its own (a metric record) that leaves the bar intact."""
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def progress_line(desc: str, done: int, total: int, ran: int, seconds: float) -> str:
    """"sft: step 40/600 (7%), 0.519 steps/s, 0:01:17 elapsed, ETA 0:17:58" (a slow run's rate as
    "1.93 s/step"): `ran` of the steps done ran in this process, in `seconds` (the rate and the
    time left are theirs)."""
    head = f"{desc}: step {done}/{total} ({100 * done / total:.0f}%)"
    if ran == 0:
        return head
    rate = ran / seconds
    speed = f"{rate:.3g} steps/s" if rate >= 0.5 else f"{1 / rate:.3g} s/step"
    return f"{head}, {speed}, {_clock(seconds)} elapsed, ETA {_clock((total - done) / rate)}"


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))  # 0:17:57, 1 day, 2:03:04


def run_loop(
    *,
    out_dir: Path,
    state: Any,
    step_fn: Callable[[Any, int], tuple[Any, dict]],
    steps: int,
    log_every: int,
    save_every: int,
    keep_checkpoints: int,
    resume: bool,
    record: dict,
    tensorboard: bool = False,
    desc: str = "train",
    extra_metrics: Callable[[int], dict] = lambda step: {},
    evaluate: Callable[[Any], dict] = lambda state: {},
    progress_every: float = 30.0,
) -> Any:
    """Run steps [start, steps) with checkpoints every `save_every` and at the end -> state.

    `out_dir` is a folder `stages.common.check_output` has checked for this run (it refuses
    checkpoints there without `resume`); with `resume`, the run continues from its latest
    checkpoint. NaN or inf in a logged loss stops the run with an error naming the step,
    before anything is saved over the last good checkpoint. `state` is laid out on the run's
    mesh (`parallel.put_state`); a checkpoint is restored into that layout, so a run may resume
    on another mesh. `evaluate(state)` (held-out metrics) runs where the metrics are logged:
    every `log_every` steps and at the end. Without a terminal, progress is a line at most every
    `progress_every` seconds (see `Progress`)."""
    checkpoints = Checkpoints(out_dir, keep_checkpoints)
    start = 0
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        state, _ = checkpoints.restore(latest, state)
        start = latest
        print(f"resuming {desc} from step {start} ({out_dir / 'checkpoints'})", file=sys.stderr)
    # Process 0 keeps the metrics (the others hold None and never write).
    log = parallel.on_main(lambda: MetricLog(out_dir, tensorboard, start), out_dir / "metrics.jsonl")
    bar = Progress(desc, steps, start, progress_every)
    started = time.perf_counter()
    for step in range(start, steps):
        state, metrics = step_fn(state, step)
        done = step + 1
        # Every step's loss and gradient norm are checked (a scalar fetch), so a NaN never
        # reaches a checkpoint; the rest of the metrics are fetched only to be logged.
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}  # replicated scalars
        bad = [k for k in ("loss", "grad_norm") if k in values and not math.isfinite(values[k])]
        if bad and not values.get("skipped"):
            raise JaxRLHFError(f"{desc}: non-finite {bad[0]}={values[bad[0]]} at step {done}; "
                               f"{checkpoints.last_good()} (train.on_nonfinite=skip skips such updates instead)")
        if done % log_every == 0 or done == steps:
            values |= extra_metrics(done) | evaluate(state)
            values["steps_per_second"] = (done - start) / (time.perf_counter() - started)

            def write():
                try:
                    log.write(done, values, echo=bar.write)
                except OSError as e:
                    raise outputs.write_failed(log.path, e, checkpoints.last_good()) from None

            parallel.on_main(write, out_dir / "metrics.jsonl")
        if done % save_every == 0 or done == steps:
            checkpoints.save(done, state, {**record, "step": done})
        bar.update(done)
    bar.close()
    return state


@contextlib.contextmanager
def _interrupt_after():
    """A Ctrl-C during the block takes effect when it ends: a checkpoint write cut short leaves
    orbax's writer threads failing loudly at exit. A second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []

    def defer(signum, frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, defer)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
