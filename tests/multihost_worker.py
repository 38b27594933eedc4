"""One of the two processes of tests/test_mesh.py's run, 2 CPU devices each (one mesh of 4):
`python tests/multihost_worker.py PROCESS_ID PORT TINY_RUN ROOT`. Runs every stage of
test_mesh.STAGES into ROOT/two_processes, then PPO on ROOT/same_prompt.jsonl, saving the first
rollout of each PPO run to ROOT/{two_processes,same_prompt}_rollout_PROCESS_ID.npz."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrlhf.multihost import initialize_multihost  # noqa: E402

process_id, port, tiny_run, root = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
# Before anything starts a JAX backend: the processes' devices then form one list.
initialize_multihost(f"127.0.0.1:{port}", 2, process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxrlhf.stages import ppo  # noqa: E402
from tests.test_mesh import STAGES, recording, run_stage  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
calls = []
ppo.sample = recording(ppo.sample, calls)
for name in STAGES:
    run_stage(name, tiny_run, root / "two_processes", 4)
np.savez(root / f"two_processes_rollout_{process_id}.npz", **calls[0])
calls.clear()
run_stage("ppo", tiny_run, root / "same_prompt", 4, [f"prompts.path={root / 'same_prompt.jsonl'}", "train.steps=1"])
np.savez(root / f"same_prompt_rollout_{process_id}.npz", **calls[0])
print("done", process_id)
