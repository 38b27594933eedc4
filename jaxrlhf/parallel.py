"""Data parallelism with `pmap`: one axis name, replicated state, sharded batches.

Update functions are written per device: they take `axis_name` (None on one device), sum
their gradients and statistics over it (see `losses` for why sums of global-mean shares), and
derive per-device randomness with `device_key`. This module only wraps them.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.errors import ConfigError

AXIS = "batch"


def device_key(key: jax.Array, axis_name: str | None) -> jax.Array:
    """A key of this device's own: `key` folded with the device index (unchanged on one device)."""
    return key if axis_name is None else jax.random.fold_in(key, lax.axis_index(axis_name))


def psum(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else lax.psum(tree, axis_name)


def local_devices(n: int) -> list:
    """The first `n` local devices, or an error saying how many there are."""
    available = jax.local_devices()
    if n > len(available):
        raise ConfigError(f"devices={n} but this process sees {len(available)} device(s): {available}")
    return available[:n]


def replicate(tree: Any, devices=None) -> Any:
    """Put a copy of `tree` on every local device (leading axis = device), one transfer per
    device and no stacked copy on the host."""
    devices = devices or jax.local_devices()
    sharding = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))

    def put(x):
        x = jnp.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices), *x.shape), sharding, shards)

    return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def shard(batch: dict[str, Any], num_devices: int | None = None) -> dict[str, Any]:
    """Split every array's leading (batch) axis into `[num_devices, batch / num_devices, ...]`."""
    n = num_devices or jax.local_device_count()
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ConfigError(
                f"batch field {name!r} has {x.shape[0]} rows, which does not divide over {n} devices; "
                f"use a batch size that is a multiple of {n}"
            )
        out[name] = x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return out


def host_share(indices: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch's row indices (all of them when
    there is one process): each host feeds only its own devices."""
    return np.array_split(indices, jax.process_count())[jax.process_index()]


def pmap_step(step: Callable, axis_name: str = AXIS, devices=None) -> Callable:
    """`step(state, batch, key)` over local devices: state replicated and donated, batch
    sharded with `shard`, the same key on every device (steps fold in the device index)."""
    return jax.pmap(step, axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=(0,), devices=devices)


def data_parallel(make_step: Callable[[str | None], Callable], devices: int) -> Callable:
    """The compiled `step(state, batch, key)` of a step factory on `devices` local devices:
    jit on one; on several, pmap with the host batch sharded over them (the state passed in
    must be replicated, as `trainer.run_loop` does)."""
    if devices == 1:
        return jit_step(make_step(None))
    step = pmap_step(make_step(AXIS), devices=local_devices(devices))
    return lambda state, batch, key: step(state, shard(batch, devices), key)


def jit_step(step: Callable) -> Callable:
    """`step(state, batch, key)` on one device, with the state donated."""
    return jax.jit(step, donate_argnums=(0,))


def initialize_multihost(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, cpu: bool = False) -> None:
    """Join the processes of a multi-host run (`jax.distributed.initialize`); call it before
    anything else touches JAX. On GPU/TPU clusters with a scheduler (SLURM, Cloud TPU) the
    arguments are discovered and may be omitted; `cpu=True` selects the gloo collectives so
    `pmap` sums work across CPU processes."""
    if cpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
