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

import atexit
import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import time
from itertools import count
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import distributed  # the runtime's client and its key-value store, which jax does not export
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


def data_parallel(step: Callable, mesh: Mesh, state: Any) -> Callable:
    """A one-device `step(state, batch, key)` (an update factory's, `axis_name=None`) compiled
    for `mesh` under `jax.jit`: the state kept in `state`'s layout (`put_state`) and donated,
    the host batch (the whole global batch, numpy) split over the devices."""
    layout = jax.tree.map(lambda x: x.sharding, state)
    compiled = jax.jit(step, in_shardings=(layout, rows_sharding(mesh), replicated(mesh)),
                       out_shardings=(layout, replicated(mesh)), donate_argnums=(0,))

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


# Seconds a process may go without a heartbeat before the others count it lost.
HEARTBEAT_TIMEOUT = 60
# A heartbeat's key, and the values a process leaves there: "done" at its end, "failed: WHY" when
# it stopped on an error, "stopping" while it stops because another was lost.
_ALIVE, _STOPPING, _DONE, _FAILED = "jaxrlhf/alive/", "stopping", "done", "failed: "
_watchdog = None  # this process's `_Watchdog`, once it has joined a multi-process run


def initialize_multihost(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, heartbeat_timeout: int = HEARTBEAT_TIMEOUT) -> None:
    """Join the processes of a multi-process run (`jax.distributed.initialize`); call it before
    anything else touches JAX. On GPU/TPU clusters with a scheduler (SLURM, Cloud TPU) the
    arguments are discovered and may be omitted. The CPU backend's collectives are switched to
    gloo, so CPU processes can sum across each other (GPU and TPU collectives are untouched).
    A process silent for `heartbeat_timeout` seconds is lost: see `_Watchdog`."""
    global _watchdog
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's own heartbeat ends the others with a C++ fatal log that names no process and no way on
    # (jaxlib takes a Python callback for it but cannot call one: std::bad_cast). Give it twice as
    # long, so that ours speaks first.
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=2 * heartbeat_timeout)
    _watchdog = _Watchdog(heartbeat_timeout)
    _watchdog.start()
    atexit.register(_watchdog.stop)  # before JAX's own exit handler (atexit runs last-registered first)


def when_a_process_is_lost(advice: Callable[[], str]) -> None:
    """`advice()` (called when a process is lost, e.g. naming the checkpoint to resume from) ends
    the line every remaining process prints then."""
    if _watchdog is not None:
        _watchdog.advice = advice


def finished() -> None:
    """This process ended its work: the others, still ending theirs, must not count it lost."""
    if _watchdog is not None:
        _watchdog.leave(_DONE)


def stopped(code: int, why: str) -> int:
    """This process stops on an error (`why`, already reported) -> `code`, or, in a
    multi-process run, exit with it at once: the others are told, and stop naming this process
    and the error's first line rather than wait for it in a collective; process 0, which holds
    the runtime's service, first waits for them to stop."""
    if _watchdog is not None:
        _watchdog.stop_run(code, _FAILED + (why.strip().splitlines() or ["an error"])[0])
    return code


def await_lost_process() -> None:
    """After a collective failed in a multi-process run: wait until a lost process would have
    been noticed (which ends this process with its line); returns at once every other process is
    seen beating after the failure (none was lost: the error is this process's own)."""
    if _watchdog is not None:
        _watchdog.await_verdict()


class _Watchdog(threading.Thread):
    """Every process posts a heartbeat (a count) to the runtime's key-value store four times per
    `timeout` and watches the others': one whose count stands still for `timeout` seconds is
    lost, and one that left "failed: WHY" stopped on an error; this process then says so in one
    line (which process, why, and `advice()`) and exits with 2 at once: its collectives would
    fail or wait for the other. If process 0, which holds the runtime's service, is lost, the
    store stops answering (and JAX usually ends the others at once with its own fatal error);
    a store that does not answer for `timeout` seconds counts as process 0 lost."""

    def __init__(self, timeout: int):
        super().__init__(name="jaxrlhf-heartbeat", daemon=True)
        self.timeout, self.interval, self.advice = timeout, timeout / 4, lambda: "start every process again"
        self.stopped, self.lock, self.last_word = threading.Event(), threading.Lock(), None
        self.client, self.me = distributed.global_state.client, distributed.global_state.process_id
        self.others = sorted(set(range(distributed.global_state.num_processes)) - {self.me})
        now = time.monotonic()
        self.seen = {p: (None, now) for p in self.others}  # p -> (its last beat, when that changed)
        self.reads = 0  # reads of the others' beats so far

    def run(self) -> None:
        beat, silent_since = 0, None  # when the store stopped answering
        while not self.stopped.is_set():
            beats = self.post(str(beat))
            now = time.monotonic()
            if beats is None:
                silent_since = silent_since or now
                if now - silent_since > self.timeout:
                    self.exit_with(f"process 0 (of {len(self.others) + 1}) of this run was lost: the runtime's "
                                   f"service there has not answered for {self.timeout} s", lost=[0])
            else:
                silent_since = None
                self.seen = {p: self.seen[p] if beats.get(p) == self.seen[p][0] else (beats.get(p), now)
                             for p in self.others}
                self.reads += 1
                failed = [p for p in self.others if (beats.get(p) or "").startswith(_FAILED)]
                lost = [p for p, (last, since) in self.seen.items()
                        if last != _DONE and p not in failed and now - since > self.timeout]
                if failed:
                    self.exit_with(f"process {failed[0]} (of {len(self.others) + 1}) of this run stopped: "
                                   f"{beats[failed[0]].removeprefix(_FAILED)}", lost=failed)
                if lost:
                    self.exit_with(f"process {', '.join(map(str, lost))} (of {len(self.others) + 1}) of this run "
                                   f"was lost: no heartbeat for {self.timeout} s (--heartbeat-timeout)", lost=lost)
            beat += 1
            self.stopped.wait(self.interval)
        # Told nothing (a library user's own script): an exception that ended the program is a
        # failure, an ordinary exit the end of its work.
        error = getattr(sys, "last_value", None)
        self.post(self.last_word or (_FAILED + f"{type(error).__name__}: {error}" if error is not None else _DONE))

    def post(self, value: str) -> dict[int, str] | None:
        """Post this process's `value` -> every process's latest, or None if the store did not answer."""
        try:
            self.client.key_value_set(f"{_ALIVE}{self.me}", value, allow_overwrite=True)
            return {int(key.rsplit("/", 1)[1]): v for key, v in self.client.key_value_dir_get(_ALIVE)}
        except Exception:  # the runtime raises one type for every failure; the store lives in process 0
            return None

    def exit_with(self, what: str, lost: list[int]) -> None:
        """Say `what` happened to the processes `lost`, and what to do, in one line; exit with 2."""
        with self.lock:
            if self.last_word is not None:  # this process is ending on its own account: it has spoken
                return
            self.last_word = _STOPPING
        print(f"error: {what}; {self.advice()}", file=sys.stderr, flush=True)
        self.exit(2, _STOPPING, lost)

    def stop_run(self, code: int, word: str) -> None:
        with self.lock:
            if self.last_word is not None:  # already ending: the watchdog's line has the last word
                return
            self.last_word = word
        self.exit(code, word, [])

    def exit(self, code: int, word: str, lost: list[int]) -> None:
        """Leave `word` for the others and exit with `code` now (JAX's own exit would wait for
        them at a barrier). Process 0, whose exit ends the runtime's service (and JAX then aborts
        whoever still runs), goes last: once every other process but the `lost` has left its
        word (so each could say why it stops), and a moment more, for their exits to finish."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.me != 0:
            with contextlib.suppress(Exception):  # the store may be gone with process 0 already
                self.client.key_value_set(f"{_ALIVE}{self.me}", word, allow_overwrite=True)
            os._exit(code)
        waiting_for = [p for p in self.others if p not in lost]
        deadline = time.monotonic() + self.timeout
        beats = self.post(word)
        while beats and waiting_for and time.monotonic() < deadline and any(
                beats.get(p) not in (_STOPPING, _DONE) and not (beats.get(p) or "").startswith(_FAILED)
                for p in waiting_for):
            time.sleep(0.1)
            beats = self.post(word)
        if waiting_for:
            time.sleep(1.0)  # each exits right after its word
        os._exit(code)

    def leave(self, word: str) -> None:
        with self.lock:
            self.last_word = self.last_word or word

    def await_verdict(self) -> None:
        """Return once every other process posted a beat after this process's collective failed
        (so none was lost), or after the time a lost one takes to be noticed."""
        deadline = time.monotonic() + self.timeout + 3 * self.interval
        # The second read from now starts after the failure, so it holds every beat a process
        # that died before the failure posted; a beat changed after that one is a live process's.
        first = self.reads + 2
        while self.reads < first and time.monotonic() < deadline:
            time.sleep(0.05)
        then = {p: last for p, (last, _) in self.seen.items()}
        while time.monotonic() < deadline:
            if all(last == _DONE or last != then[p] for p, (last, _) in self.seen.items()):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


_settings_round = count()  # each call of `check_same_settings` reads and writes its own keys


def check_same_settings(settings: dict[str, Any] | Exception) -> None:
    """Refuse, on every process of a multi-process run, unless all hold the same `settings` (flat
    key -> JSON value: the config and flags each was started with): processes with different
    settings would train a different model in lockstep, or wait for each other forever. Pass
    the error met making them instead, and the others stop pointing at it. Runs on the
    runtime's key-value store (each process posts a hash of each value), so nothing is compiled.
    Keys that may differ between processes (the process id, the coordinator) are not settings."""
    client = distributed.global_state.client
    if client is None:
        return
    n, me, prefix = distributed.global_state.num_processes, distributed.global_state.process_id, \
        f"jaxrlhf/settings/{next(_settings_round)}"
    if isinstance(settings, Exception):
        client.key_value_set(f"{prefix}/{me}", json.dumps({"error": str(settings)}))
        return
    digests = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in settings.items()}
    client.key_value_set(f"{prefix}/{me}", json.dumps({"settings": digests}))
    # As long as JAX waits for the processes to join (a lost one ends this sooner: see above).
    posted = [json.loads(client.blocking_key_value_get(f"{prefix}/{p}", 300_000)) for p in range(n)]
    for p, post in enumerate(posted):
        if "error" in post:
            raise ConfigError(f"process {p} of this run could not start: {post['error']}")
    first = posted[0]["settings"]
    differ = {p: sorted(k for k in first.keys() | post["settings"].keys() if first.get(k) != post["settings"].get(k))
              for p, post in enumerate(posted)}
    differ = {p: keys for p, keys in differ.items() if keys}
    if differ:
        keys = sorted({k for ks in differ.values() for k in ks})
        raise ConfigError(f"the processes of this run were started with different settings (process 0 and "
                          f"process {', '.join(map(str, differ))} differ in {', '.join(keys)}); start every process "
                          "with the same config, overrides and flags")
