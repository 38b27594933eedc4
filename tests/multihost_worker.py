"""One process of the two-process data-parallel SFT step in test_crash_and_multihost.py:
`python tests/multihost_worker.py PROCESS_ID PORT OUT_DIR`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrlhf.parallel import initialize_multihost  # noqa: E402

process_id, port, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
initialize_multihost(f"127.0.0.1:{port}", num_processes=2, process_id=process_id, cpu=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from jaxrlhf.parallel import AXIS, pmap_step, replicate, shard, unreplicate  # noqa: E402
from jaxrlhf.steps import TrainState, make_sft_step  # noqa: E402
from tests.test_steps import policy, sft_batch  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 2, (jax.process_count(), jax.devices())
module, params, _ = policy()
state = TrainState.create(module, params, optax.sgd(0.5))
batch = sft_batch()
half = len(batch["input_ids"]) // 2
local = {k: v[process_id * half: (process_id + 1) * half] for k, v in batch.items()}  # this host's share
new_state, metrics = pmap_step(make_sft_step(AXIS))(replicate(state), shard(local, 1), jax.random.key(0))
flat = flatten_dict(jax.device_get(unreplicate(new_state.params)), sep="/")
np.savez(out / f"params_{process_id}.npz", loss=np.asarray(unreplicate(metrics)["loss"]), **flat)
print("done", process_id)
