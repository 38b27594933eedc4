"""One global mesh for 1 device, N devices and N hosts; and `pmap_step` for pmap-style users.

The stages run on a `jax.sharding.Mesh` over the devices of every process, with two axes:
`data` (replicas) and `fsdp` (replicas that also split the params and optimizer state between
them). Batch rows are split over both axes; steps are the update functions written for one
device (`axis_name=None`), compiled with `jax.jit` over global `jax.Array`s, so the math is the
one-device math whatever the mesh (only the order of float sums changes). Every process holds
the same host data (the whole global batch); each puts only its own devices' rows.

Update functions also take `axis_name` for `pmap` (see `losses` for why they sum shares of
the global mean); `pmap_step` keeps that style working on local devices.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrlhf.errors import ConfigError, OutputError

AXIS = "batch"  # pmap_step's axis name
DATA, FSDP = "data", "fsdp"
ROWS = (DATA, FSDP)  # batch rows are split over both mesh axes
# Params smaller than this stay replicated under FSDP: splitting them saves nothing worth a collective.
FSDP_MIN_SIZE = 2**10


def make_mesh(data: int | None = None, fsdp: int = 1) -> Mesh:
    """The `data` x `fsdp` mesh over `jax.devices()` (all processes); `data=None` takes every
    device the fsdp axis leaves. A single process may use its first `data * fsdp` devices; a
    multi-process run must use them all (each process feeds its own devices)."""
    devices, processes = jax.devices(), jax.process_count()
    if fsdp < 1 or (data is not None and data < 1):
        raise ConfigError(f"mesh data={data}, fsdp={fsdp}: each axis must be at least 1")
    if data is None:
        if len(devices) % fsdp:
            raise ConfigError(f"mesh fsdp={fsdp} does not divide the {len(devices)} device(s) of this run")
        data = len(devices) // fsdp
    n = data * fsdp
    if n > len(devices) or (processes > 1 and n != len(devices)):
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} = {n} device(s), but this run has {len(devices)} "
                          f"({jax.local_device_count()} in each of {processes} process(es)); "
                          + ("a multi-process run's mesh must use every device" if processes > 1 else
                             "use at most that many"))
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp), (DATA, FSDP))


def check_rows(rows: int, mesh: Mesh, what: str, microbatches: int = 1) -> None:
    """`rows` must split evenly over the mesh's devices, and each device's share over
    `microbatches`; `what` names where the number comes from, for the error."""
    parts = mesh.size * microbatches  # every device gets its own rows
    if rows % parts:
        per_device = f" in {microbatches} microbatches each" if microbatches > 1 else ""
        raise ConfigError(f"{what} = {rows} row(s) do not split over {mesh.size} device(s){per_device} "
                          f"(mesh data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]}); it must be a multiple of "
                          f"{parts}")


def whole_rows(rows: int, mesh: Mesh) -> int:
    """`rows` rounded up to a multiple of the mesh's devices: the size of a padded chunk that
    gives every device whole rows (for work the caller pads, e.g. scoring in chunks)."""
    return -(-rows // mesh.size) * mesh.size


def rows_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Rows (axis 0) split over every device; replicated for a scalar."""
    return NamedSharding(mesh, P(ROWS) if ndim else P())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _put(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds whole (numpy, a local array or a
    PRNG key): each process puts only the parts its own devices hold."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Host values (the same on every process, e.g. a PRNG key) -> global arrays that every
    device holds whole."""
    return jax.tree.map(lambda x: _put(x, replicated(mesh)), tree)


def put_rows(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (the whole global batch, on every process) -> global arrays with their
    rows split over the mesh."""
    for x in jax.tree.leaves(tree):
        check_rows(np.shape(x)[0], mesh, "a batch")
    return jax.tree.map(lambda x: _put(x, rows_sharding(mesh, np.ndim(x))), tree)


def param_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Replicated on the data axis; under FSDP, split on the fsdp axis along the largest
    dimension that divides evenly (ZeRO-3 style). Optimizer moments have their param's shape,
    so they get the same layout."""
    n = mesh.shape[FSDP]
    if n == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return replicated(mesh)
    dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
    if not dims:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[dims[0]] = FSDP
    return NamedSharding(mesh, P(*spec))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The layout of a train state (or any param tree) on the mesh: see `param_sharding`."""
    return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh), state)


def put_state(state: Any, mesh: Mesh) -> Any:
    """A train state (the same on every process) laid out on the mesh."""
    return jax.tree.map(_put, state, state_shardings(state, mesh))


def constrain_rows(tree: Any, axis: int = 0) -> Any:
    """Inside a step compiled by `data_parallel`: keep axis `axis` of every array split over
    the devices, so a gathered or reshaped batch stays data parallel. A no-op anywhere else
    (plain jit, pmap, a user's own mesh): only a context mesh with our two axes, both left to
    the compiler, is ours."""
    mesh = jax.sharding.get_abstract_mesh()
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types.get(name) != jax.sharding.AxisType.Auto for name in ROWS):
        return tree
    return jax.tree.map(lambda x: lax.with_sharding_constraint(x, P(*[None] * axis, ROWS)), tree)


def jit_for_mesh(step: Callable, mesh: Mesh, state: Any):
    """A one-device `step(state, batch, key)` (an update factory's, `axis_name=None`) under
    `jax.jit` for `mesh`: the state (global arrays, or `jax.ShapeDtypeStruct`s with their
    sharding) kept in its layout and donated, the batch's rows split over the devices. Call,
    or lower, it under `jax.set_mesh(mesh)`."""
    layout = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(step, in_shardings=(layout, rows_sharding(mesh), replicated(mesh)),
                   out_shardings=(layout, replicated(mesh)), donate_argnums=(0,))


def data_parallel(step: Callable, mesh: Mesh, state: Any) -> Callable:
    """`step` compiled for `mesh` (`jit_for_mesh`), the state in `state`'s layout (`put_state`),
    taking the host batch (the whole global batch, numpy) and splitting it over the devices."""
    compiled = jit_for_mesh(step, mesh, state)

    def run(state, batch, key):
        batch = put_rows(batch, mesh)
        with jax.set_mesh(mesh):
            return compiled(state, batch, put_replicated(key, mesh))

    return run


def gather(tree: Any) -> Any:
    """Global arrays -> numpy arrays holding the whole value, on every process. (Not for
    process-local arrays: across processes they would be concatenated.)"""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def is_main() -> bool:
    """Whether this process writes the run's files (exports, metrics, plots): process 0."""
    return jax.process_index() == 0


def all_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (a barrier: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def on_main(write: Callable[[], Any], what: str) -> Any:
    """`write()` on process 0 only, then every process learns whether it worked: a failed write
    stops every process with an error (the others get one pointing at process 0's) instead of
    leaving them waiting for it in the next collective. -> `write()`'s result on process 0."""
    result, error = None, None
    if is_main():
        try:
            result = write()
        except Exception as e:  # re-raised below, after the others have heard of it
            error = e
    if not all_ok(error is None):
        raise error or OutputError(f"process 0 could not write {what} (its error is in its own output)")
    return result


def on_host():
    """A context in which new arrays go to the host CPU, so that a whole model and optimizer
    state are built there (not on one accelerator) before `put_state` lays them out."""
    return jax.default_device(jax.local_devices(backend="cpu")[0])


# pmap style: per-device update bodies with `axis_name` collectives.


def psum(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else lax.psum(tree, axis_name)


def replicate(tree: Any, devices=None) -> Any:
    """Put a copy of `tree` on every local device (leading axis = device), one transfer per
    device and no stacked copy on the host."""
    devices = devices or jax.local_devices()
    sharding = NamedSharding(Mesh(np.array(devices), ("devices",)), P("devices"))

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


def pmap_step(step: Callable, axis_name: str = AXIS, devices=None) -> Callable:
    """`step(state, batch, key)` over local devices: state replicated and donated, batch
    sharded with `shard`, the same key on every device."""
    return jax.pmap(step, axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=(0,), devices=devices)


def jit_step(step: Callable) -> Callable:
    """`step(state, batch, key)` on one device, with the state donated."""
    return jax.jit(step, donate_argnums=(0,))
