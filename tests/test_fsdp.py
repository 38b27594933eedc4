"""FSDP through the stage path: `train.mesh.fsdp` splits params and optimizer state over the
devices, trains the replicated layout's params, and holds a fraction of its bytes per device."""

import jax
import numpy as np
import pytest

from jaxrlhf import parallel
from tests.test_reliability import final_params, stage_config


def device_bytes(tree, device) -> int:
    """Bytes of `tree`'s arrays that `device` holds (its addressable shard of each leaf)."""
    return sum(next(s for s in x.addressable_shards if s.device == device).data.nbytes
               for x in jax.tree.leaves(tree))


def run_sft(tiny_run, out, monkeypatch, mesh_overrides):
    """SFT on the shrunk tiny config for 3 steps -> (export path, per-device bytes of the
    state the stage trains: as laid out before the first step, and as each step returns it)."""
    from jaxrlhf.stages import sft

    real, seen = parallel.data_parallel, {"before": None, "after": []}

    def measuring(make_step, mesh, state):
        device = mesh.devices.flat[0]
        seen["before"] = device_bytes(state, device)  # before the first step donates it
        compiled = real(make_step, mesh, state)

        def step(state, batch, key):
            state, metrics = compiled(state, batch, key)
            seen["after"].append(device_bytes(state, device))
            return state, metrics

        return step

    monkeypatch.setattr(sft, "data_parallel", measuring)
    path = sft.run(stage_config(sft, "sft.yaml", tiny_run, out, [
        "train.steps=3", "train.batch_size=16", "train.log_every=1", "train.save_every=3", *mesh_overrides]))
    assert len(seen["after"]) == 3
    return path, seen


@pytest.mark.slow
def test_fsdp_trains_the_replicated_params_in_under_30_percent_of_the_bytes(tiny_run, tmp_path, monkeypatch):
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
    replicated, rep_bytes = run_sft(tiny_run, tmp_path / "replicated", monkeypatch, ["train.mesh.data=4"])
    sharded, fsdp_bytes = run_sft(tiny_run, tmp_path / "fsdp", monkeypatch, ["train.mesh.data=1", "train.mesh.fsdp=4"])
    for a, b in zip(final_params(replicated), final_params(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    # Every step keeps the layout it was given.
    assert rep_bytes["after"] == [rep_bytes["before"]] * 3
    assert fsdp_bytes["after"] == [fsdp_bytes["before"]] * 3
    ratio = fsdp_bytes["before"] / rep_bytes["before"]
    print(f"per-device bytes of params + optimizer state: fsdp=4 {fsdp_bytes['before']}, "
          f"replicated {rep_bytes['before']} (ratio {ratio:.3f})")
    assert ratio <= 0.30, (fsdp_bytes, rep_bytes, ratio)


@pytest.mark.fast
def test_fsdp_splits_large_leaves_and_keeps_small_ones_whole():
    """`param_sharding`: leaves of >= FSDP_MIN_SIZE elements split on their largest evenly
    dividing dim; smaller ones, and ones with no dividing dim, replicated."""
    mesh = parallel.make_mesh(data=1, fsdp=4)
    n = parallel.FSDP_MIN_SIZE
    state = {"big": np.zeros((8, n // 4), np.float32), "odd": np.zeros((n + 1,), np.float32),
             "small": np.zeros((n // 2,), np.float32), "scalar": np.float32(0)}
    laid_out = parallel.put_state(state, mesh)
    shard_shapes = {k: x.addressable_shards[0].data.shape for k, x in laid_out.items()}
    assert shard_shapes == {"big": (8, n // 16), "odd": (n + 1,), "small": (n // 2,), "scalar": ()}


@pytest.mark.slow
def test_a_run_resumes_on_another_mesh_and_exports_on_one_device(tiny_run, tmp_path, monkeypatch):
    """Checkpoints hold global arrays in the layout of the mesh that wrote them: a run stopped on
    4 data-parallel devices resumes on an fsdp=4 mesh with the uninterrupted run's params, and
    `jaxrlhf export` in a one-device process exports its fsdp checkpoint unchanged."""
    import subprocess

    from safetensors.numpy import load_file

    from jaxrlhf.stages import sft
    from tests.conftest import ROOT, interrupt_at_call
    from tests.test_crash_and_multihost import ENV, command

    def config(out, *mesh):
        return stage_config(sft, "sft.yaml", tiny_run, out, ["train.steps=6", "train.batch_size=16",
                                                             "train.save_every=3", "train.log_every=3", *mesh])

    straight = sft.run(config(tmp_path / "straight", "train.mesh.data=4"))
    interrupt_at_call(monkeypatch, sft, 5)  # after the step-3 checkpoint, before the step-6 one
    with pytest.raises(KeyboardInterrupt):
        sft.run(config(tmp_path / "moved", "train.mesh.data=4"))
    monkeypatch.undo()
    resumed = sft.run(config(tmp_path / "moved", "train.mesh.data=1", "train.mesh.fsdp=4"), resume=True)
    for a, b in zip(final_params(straight), final_params(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    # The step-6 checkpoint was written by the fsdp=4 mesh; export it where there is one device.
    result = subprocess.run(command("export", [str(tmp_path / "moved"), str(tmp_path / "exported")]), env=ENV,
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    want, got = load_file(resumed / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
