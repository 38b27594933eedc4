"""kill -9 at a random point, then --resume: the same params as an uninterrupted run, bit for
bit. And a data-parallel step across two processes joined by jax.distributed."""

import os
import random
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from tests.conftest import ROOT
from tests.test_bad_input import ppo_args, sft_args

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}


def script(name, args):
    return [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args]


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


def assert_same_model(a, b):
    ta, tb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.mark.parametrize("stage,make_args,steps,save_every,after", [
    ("sft", sft_args, 300, 20, 20),
    ("ppo", ppo_args, 8, 2, 2),
])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_run, tmp_path, stage, make_args, steps, save_every,
                                                         after):
    def args(out):
        return make_args(tiny_run, out, f"train.steps={steps}", f"train.save_every={save_every}",
                         f"train.log_every={save_every}")

    subprocess.run(script(stage, args(tmp_path / "straight")), env=ENV, cwd=ROOT, check=True, capture_output=True)
    killed = tmp_path / "killed"
    kill_midway(script(stage, args(killed)), killed, after, seed=len(stage))
    done = finished_steps(killed)
    # A kill while writing the next checkpoint leaves only an unfinished temporary folder,
    # which resume must pass over: plant one past the last good step.
    partial = killed / "checkpoints" / f"{done[-1] + save_every}.orbax-checkpoint-tmp-1234"
    shutil.copytree(killed / "checkpoints" / str(done[-1]), partial)
    for f in list(partial.rglob("*"))[:3]:
        if f.is_file():
            f.unlink()
    result = subprocess.run(script(stage, [*args(killed), "--resume"]), env=ENV, cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming {stage} from step {done[-1]}" in result.stderr
    assert_same_model(tmp_path / "straight", killed)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_the_single_process_step(tmp_path):
    from jaxrlhf.parallel import jit_step
    from jaxrlhf.steps import TrainState, make_sft_step
    from tests.test_steps import policy, sft_batch

    port = free_port()
    workers = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(i), str(port),
                                 str(tmp_path)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for i in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()[-3000:]
    module, params, _ = policy()
    want, metrics = jit_step(make_sft_step())(TrainState.create(module, params, optax.sgd(0.5)), sft_batch(),
                                               jax.random.key(0))
    want = flatten_dict(jax.device_get(want.params), sep="/")
    for i in range(2):
        got = np.load(tmp_path / f"params_{i}.npz")
        np.testing.assert_allclose(got["loss"], metrics["loss"], rtol=1e-6)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, atol=1e-6, err_msg=k)
