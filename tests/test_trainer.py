"""The training loop's plumbing (`jaxrlhf.trainer.run_loop`, which every stage's steps run in)
on a toy step: what it shows of its progress."""

import math
import re

import jax.numpy as jnp
import pytest

from jaxrlhf.trainer import run_loop

pytestmark = pytest.mark.fast


def test_without_a_terminal_progress_is_a_plain_line_at_the_start_at_most_every_interval_and_at_the_end(
        tmp_path, capsys):
    """Under nohup, SLURM or CI (no terminal: here pytest's captured streams) tqdm's bar is off,
    so the loop's sign of life is a plain line with the step, rate and time left."""
    def toy_step(state, step):
        return state, {"loss": jnp.float32(step)}

    for every, shown in ((0.0, [0, 1, 2, 3, 4]), (math.inf, [0, 4])):
        run_loop(out_dir=tmp_path / str(every), state={"w": jnp.zeros(2)}, step_fn=toy_step, steps=4, log_every=10,
                 save_every=4, keep_checkpoints=1, resume=False, record={}, desc="toy", progress_every=every)
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy: ")]
        assert [int(re.match(r"toy: step (\d+)/4 ", line)[1]) for line in lines] == shown, lines
        assert lines[0] == "toy: step 0/4 (0%)"
        assert re.fullmatch(r"toy: step 4/4 \(100%\), [\d.e+-]+ (steps/s|s/step), \d+:\d\d:\d\d elapsed, ETA 0:00:00",
                            lines[-1]), lines[-1]
