"""The processes of a multi-process run: joining them (`initialize_multihost`), agreeing on
their settings before anything runs (`check_same_settings`), and a heartbeat watchdog, so that a
process lost or stopped by its own error ends the others with one line naming it and the way on
(`finished`, `stopped`, `await_lost_process`: how `cli` ends a command). The mesh they share is
`parallel`'s."""

import atexit
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from itertools import count
from typing import Any, Callable

import jax
from jax._src import distributed  # the runtime's client and its key-value store, which jax does not export

from jaxrlhf.errors import ConfigError


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
        # Set once this process reached, by itself, the verdict that stops every process (settings
        # that differ): its own line says why, whatever word another leaves first.
        self.own_verdict = False

    def run(self) -> None:
        beat, silent_since = 0, None  # when the store stopped answering
        while not self.stopped.is_set():
            beats = self.post(self.last_word or str(beat))  # a beat must not overwrite this process's word
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
                if failed and not self.own_verdict:
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


def _own_verdict(own: bool) -> None:
    """While the settings check runs, every process stops on its verdict and says so in its own
    line; another's failed word, which may arrive first, must not replace it."""
    if _watchdog is not None:
        _watchdog.own_verdict = own


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
    # Every process reaches the verdict itself: from here on, another's failed word (its own line
    # of the same verdict, posted while this one still reads) must not replace this one's.
    _own_verdict(True)
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
    _own_verdict(False)  # all agree: a later failure elsewhere is reported as the other's
