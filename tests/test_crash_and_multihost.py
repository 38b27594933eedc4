"""kill -9 at a random point, then --resume: the same params as an uninterrupted run, bit for
bit. And two processes of a stage script, joined by jax.distributed, end with the one-process
model; started with different settings, they all refuse; one lost, the other stops in one line."""

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import ROOT, adam_bound, assert_same_update
from tests.test_bad_input import ppo_args, sft_args

pytestmark = pytest.mark.slow

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}


def command(name, args):
    """`jaxrlhf NAME ARGS` (this checkout's, through ENV's PYTHONPATH) as a process's argv."""
    return [sys.executable, "-m", "jaxrlhf", name, *args]


def finished_steps(run):
    ckpts = run / "checkpoints"
    return sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()) if ckpts.exists() else []


def kill_midway(cmd, run, after_step, seed):
    """Start `cmd`, SIGKILL it a random moment after checkpoint `after_step` is on disk."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(15_000):  # polls 20 ms apart: a hung run fails the test after about 5 minutes
        if any(s >= after_step for s in finished_steps(run)):
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"checkpoint {after_step} never appeared in {run}")
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    proc.kill()
    assert proc.wait() == -9, "the run finished before it could be killed"
    assert not (run / "final").exists()


def assert_same_model(a, b, tol=0.0):
    """The exports of runs `a` and `b` agree to `tol` (absolute and relative; 0: bit for bit)."""
    ta, tb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], atol=tol, rtol=tol, err_msg=k)


@pytest.mark.parametrize("stage,make_args,steps,save_every,after", [
    ("sft", sft_args, 100, 20, 20),
    ("ppo", ppo_args, 8, 2, 2),
])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_run, tmp_path, stage, make_args, steps, save_every,
                                                         after):
    def args(out):
        return make_args(tiny_run, out, f"train.steps={steps}", f"train.save_every={save_every}",
                         f"train.log_every={save_every}")

    subprocess.run(command(stage, args(tmp_path / "straight")), env=ENV, cwd=ROOT, check=True, capture_output=True)
    killed = tmp_path / "killed"
    kill_midway(command(stage, args(killed)), killed, after, seed=len(stage))
    done = finished_steps(killed)
    # A kill while writing the next checkpoint leaves only an unfinished temporary folder,
    # which resume must pass over: plant one past the last good step.
    partial = killed / "checkpoints" / f"{done[-1] + save_every}.orbax-checkpoint-tmp-1234"
    shutil.copytree(killed / "checkpoints" / str(done[-1]), partial)
    for f in list(partial.rglob("*"))[:3]:
        if f.is_file():
            f.unlink()
    result = subprocess.run(command(stage, [*args(killed), "--resume"]), env=ENV, cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {stage} from step {done[-1]}" in result.stderr
    assert_same_model(tmp_path / "straight", killed)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multihost_flags(port, process_id, processes=2):
    return ["--multihost", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
            "--process-id", str(process_id)]


@contextlib.contextmanager
def processes(cmds, env, logs, timeout=600, expect=0):
    """Start `cmds` at once (e.g. the processes of one multi-process run), each logging to a file
    in `logs`, -> their Popen objects; leaving the block waits for them all and fails with the
    log of the first that ends otherwise than `expect` (an exit code, or one per command). A
    process whose peer died may wait for it in a collective for a long time, so they are
    watched together and, if anything fails (in the block too), every one still running is
    killed."""
    procs, expect = [], [expect] * len(cmds) if isinstance(expect, int) else expect
    try:
        for n, cmd in enumerate(cmds):
            with open(logs / f"process_{n}.log", "w") as log:
                procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        yield procs
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            for n, p in enumerate(procs):
                assert p.returncode in (None, expect[n]), (logs / f"process_{n}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"still running after {timeout} s: {cmds}"
            time.sleep(0.1)
        for n, p in enumerate(procs):
            assert p.wait(timeout=1) == expect[n], (logs / f"process_{n}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.mark.parametrize("stage,make_args,extra", [
    ("sft", sft_args, ["train.steps=6"]),
    # The tiny default's 2 minibatches, over 2 epochs: the global permutation and its minibatches
    # are split over both processes.
    ("ppo", ppo_args, ["train.steps=2", "ppo.epochs=2", "ppo.num_minibatches=2"]),
])
def test_two_processes_of_a_script_end_with_the_one_process_model(tiny_run, tmp_path, stage, make_args, extra):
    """As a user starts them by hand: the same command twice with its own --process-id, one CPU
    device each, next to the plain one-process command."""
    port = free_port()
    one, two = (make_args(tiny_run, tmp_path / out, *extra) for out in ("one", "two"))
    with processes([command(stage, one), *(command(stage, [*two, *multihost_flags(port, i)]) for i in range(2))],
                   ENV, tmp_path):
        pass
    ta, tb = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "two"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert_same_update(tb[k], ta[k], **adam_bound(f"{stage}.yaml", extra))


def test_processes_started_with_different_settings_all_refuse_before_compiling(tiny_data, tmp_path):
    """Two processes of one run given different learning rates and batch sizes (which trained a
    model neither one-process run gives, or hung after the export): every process refuses in one
    line naming the keys, in seconds, and writes nothing."""
    port, run = free_port(), tmp_path / "run"
    overrides = [["train.learning_rate=1e-3"], ["train.learning_rate=2e-3", "train.batch_size=16"]]
    started = time.monotonic()
    with processes([command("sft", [*sft_args(tiny_data, run, *overrides[i]), *multihost_flags(port, i)])
                    for i in range(2)], ENV, tmp_path, timeout=120, expect=2):
        pass
    took = time.monotonic() - started
    for i in range(2):
        lines = (tmp_path / f"process_{i}.log").read_text().splitlines()
        assert [line for line in lines if not line.startswith("warning: train.save_every")] == [
            "error: the processes of this run were started with different settings (process 0 and process 1 differ "
            "in train.batch_size, train.learning_rate); start every process with the same config, overrides and "
            "flags"]
    assert not run.exists()
    assert took < 60, took


def test_a_process_slow_to_report_the_settings_verdict_still_says_it_in_its_own_line(tmp_path):
    """The verdict on different settings is every process's own: one slow to print it (a loaded
    machine) must not have its line replaced by its watchdog's "process 0 stopped: ..." when
    process 0, quicker, already left its failed word (a flaky CI failure before)."""
    port = free_port()
    (tmp_path / "slow.py").write_text(
        "import sys, time\n"
        "from jaxrlhf import cli, multihost\n"
        "from jaxrlhf.errors import ConfigError\n"
        "me = int(sys.argv[2])\n"
        "multihost.initialize_multihost(f'127.0.0.1:{sys.argv[1]}', 2, me, heartbeat_timeout=1)\n"
        "def body():\n"
        "    try:\n"
        "        multihost.check_same_settings({'train.learning_rate': me})\n"
        "    except ConfigError:\n"
        "        time.sleep(2 * me)  # eight of process 1's heartbeat reads pass before it speaks\n"
        "        raise\n"
        "sys.exit(cli.finish(body, True, lambda: 'start again'))\n")
    with processes([[sys.executable, str(tmp_path / "slow.py"), str(port), str(i)] for i in range(2)], ENV, tmp_path,
                   timeout=60, expect=2):
        pass
    for i in range(2):
        assert (tmp_path / f"process_{i}.log").read_text().splitlines() == [
            "error: the processes of this run were started with different settings (process 0 and process 1 differ "
            "in train.learning_rate); start every process with the same config, overrides and flags"]


def test_a_lost_process_stops_the_other_in_one_line_naming_it_and_the_checkpoint(tiny_data, tmp_path):
    """Two processes of `jaxrlhf sft` checkpointing every step; process 1 is killed: process 0
    stops within the heartbeat timeout with one line naming process 1 and the last complete
    checkpoint (the one on disk), no runtime fatal log or traceback (it used to abort 100 s
    later with both)."""
    port, run, timeout = free_port(), tmp_path / "run", 5
    args = sft_args(tiny_data, run, "train.steps=1000", "train.save_every=1", "train.log_every=1000",
                    "train.keep_checkpoints=2")
    cmds = [command("sft", [*args, *multihost_flags(port, i), "--heartbeat-timeout", str(timeout)]) for i in range(2)]
    with processes(cmds, ENV, tmp_path, timeout=180, expect=[2, -9]) as procs:
        for _ in range(7500):  # polls 20 ms apart, for up to 2.5 minutes
            if finished_steps(run):
                break
            assert procs[0].poll() is None and procs[1].poll() is None, (tmp_path / "process_0.log").read_text()
            time.sleep(0.02)
        procs[1].kill()
        killed = time.monotonic()
        procs[0].wait(timeout=60)
        assert time.monotonic() - killed < 3 * timeout, time.monotonic() - killed
    log = (tmp_path / "process_0.log").read_text()
    assert "Traceback" not in log and "Check failure" not in log, log[-3000:]
    assert [line for line in log.splitlines() if line.startswith("error")] == [
        f"error: process 1 (of 2) of this run was lost: no heartbeat for {timeout} s (--heartbeat-timeout); the last "
        f"good checkpoint is step {finished_steps(run)[-1]} in {run / 'checkpoints'}; start every process again with "
        "--resume"], log[-3000:]


@pytest.mark.parametrize("failing", [1, 0])
def test_a_process_stopped_by_its_own_error_stops_the_other_naming_it(tiny_run, tmp_path, failing):
    """Two processes of `jaxrlhf ppo` whose reward function fails on one of them only: that
    one stops with its one line, and the other, which would wait for it in the update's
    collectives, stops within the heartbeat timeout naming it and its error (process 0, which
    holds the runtime's service, stops after the other has said so)."""
    port, run, timeout = free_port(), tmp_path / "run", 5
    (tmp_path / "flaky.py").write_text(
        f"import jax\n\n\ndef score(prompts, responses):\n    if jax.process_index() == {failing}:\n"
        f"        raise RuntimeError('no scores on process {failing}')\n    return [0.0] * len(responses)\n")
    args = ppo_args(tiny_run, run, "reward.model=null", f"reward.function={tmp_path / 'flaky.py'}:score")
    cmds = [command("ppo", [*args, *multihost_flags(port, i), "--heartbeat-timeout", str(timeout)]) for i in range(2)]
    with processes(cmds, ENV, tmp_path, timeout=180, expect=2):
        pass
    error = f"reward function {tmp_path / 'flaky.py'}:score raised RuntimeError: no scores on process {failing}"
    logs = {i: (tmp_path / f"process_{i}.log").read_text() for i in range(2)}
    errors = {i: [line for line in log.splitlines() if line.startswith("error")] for i, log in logs.items()}
    assert errors[failing] == [f"error: {error}"], logs[failing][-3000:]
    assert errors[1 - failing] == [f"error: process {failing} (of 2) of this run stopped: {error}; no checkpoint was "
                                   "written; start every process again"], logs[1 - failing][-3000:]
    assert not any("Traceback" in log or "Check failure" in log for log in logs.values()), logs
