"""The mesh changes where rows are computed, never the result: every stage, run through the code
the scripts call, ends with the same params and the same preference pairs on 1 device, on 4 fake
devices, and on 2 processes x 2 devices joined by jax.distributed with gloo; PPO's rollout rows
are the same however the batch is split, and no two hosts sample alike."""

import importlib
import json
import sys

import numpy as np
import pytest

from jaxrlhf.parallel import rows_sharding
from tests.conftest import ROOT, adam_bound, assert_same_update
from tests.test_crash_and_multihost import ENV, free_port, processes
from tests.test_reliability import final_params, stage_config

pytestmark = pytest.mark.slow

# stage -> (module, tiny config, overrides every mesh shares). Each stage reads the session's
# tiny run, never another stage of this test, so a difference cannot travel between stages.
STAGES = {
    "sft": ("jaxrlhf.stages.sft", "sft.yaml", ["train.steps=4", "train.batch_size=16"]),
    "reward": ("jaxrlhf.stages.reward", "reward.yaml", ["train.steps=4", "train.batch_size=16"]),
    "ppo": ("jaxrlhf.stages.ppo", "ppo.yaml", ["train.steps=2", "train.batch_size=16", "ppo.epochs=2",
                                               "ppo.num_minibatches=2"]),
    # 4 prompts x 4 samples = 16 rows per call, two calls.
    "preferences": ("jaxrlhf.stages.preferences", "preferences.yaml", ["prompts.max_rows=8", "batch_size=4"]),
    "dpo": ("jaxrlhf.stages.dpo", "dpo.yaml", ["train.steps=3", "train.batch_size=8", "loss_type=sigmoid"]),
    "slic": ("jaxrlhf.stages.dpo", "slic.yaml", ["train.steps=3", "train.batch_size=8"]),
    "online_dpo": ("jaxrlhf.stages.online_dpo", "online_dpo.yaml", ["train.steps=2", "train.batch_size=8"]),
}
MESHES = ("one_device", "four_devices", "two_processes")


def run_stage(name, tiny_run, out, devices, extra=()):
    """Stage `name` on a mesh of `devices` data replicas, writing under the folder `out` -> its
    final model folder (preferences: its pairs file)."""
    module_name, yaml_name, shared = STAGES[name]
    module = importlib.import_module(module_name)
    mesh = "mesh.data" if name == "preferences" else "train.mesh.data"
    target = out / ("pairs.jsonl" if name == "preferences" else name)
    return module.run(stage_config(module, yaml_name, tiny_run, target, [*shared, f"{mesh}={devices}", *extra]))


def recording(real_sample, calls):
    """A stand-in for the PPO stage's `sample` that calls the real one and appends its rollout to
    `calls`, with `own`: the rows this process's devices sampled."""

    def sample(module, params, ids, mask, key, settings, mesh):
        out = real_sample(module, params, ids, mask, key, settings, mesh)
        own = np.zeros(len(ids), bool)
        for index in rows_sharding(mesh).addressable_devices_indices_map((len(ids),)).values():
            own[index] = True
        calls.append({"sequences": np.asarray(out.sequences), "response_mask": np.asarray(out.response_mask),
                      "logprobs": np.asarray(out.logprobs), "own": own})
        return out

    return sample


def same_prompt_file(tiny_run, path, rows=16):
    """A prompts file whose every row is the tiny run's first prompt."""
    first = (tiny_run / "data" / "prompts.jsonl").read_text().splitlines()[0]
    path.write_text((first + "\n") * rows)
    return path


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """Every stage on each mesh -> {mesh: {stage: output}}, and the first PPO rollout of each
    (in "rollouts"); the two processes also run PPO on one repeated prompt ("same_prompt")."""
    root = tmp_path_factory.mktemp("meshes")
    same_prompt_file(tiny_run, root / "same_prompt.jsonl")
    outputs, rollouts = {}, {}
    from jaxrlhf.stages import ppo

    # Both processes run the worker (their devices form one mesh of 4) while this one runs the
    # other two meshes.
    port, two = free_port(), root / "two_processes"
    two.mkdir()
    with processes([[sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(i), str(port), str(tiny_run),
                     str(root)] for i in range(2)], {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                   two):
        for mesh, devices in (("one_device", 1), ("four_devices", 4)):
            calls = []
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(ppo, "sample", recording(ppo.sample, calls))
                outputs[mesh] = {name: run_stage(name, tiny_run, root / mesh, devices) for name in STAGES}
            rollouts[mesh] = calls[0]
    outputs["two_processes"] = {name: two / ("pairs.jsonl" if name == "preferences" else f"{name}/final")
                                for name in STAGES}
    for what in ("two_processes", "same_prompt"):
        rollouts[what] = [dict(np.load(root / f"{what}_rollout_{i}.npz")) for i in range(2)]
    return {**outputs, "rollouts": rollouts}


def pairs(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows, path
    return rows


@pytest.mark.parametrize("name", list(STAGES))
@pytest.mark.parametrize("mesh", MESHES[1:])
def test_a_stage_ends_the_same_on_one_device_four_devices_and_two_processes(runs, name, mesh):
    want, got = runs["one_device"][name], runs[mesh][name]
    if name == "preferences":
        # The same pairs of texts; their scores are sums over differently split batches.
        want, got = pairs(want), pairs(got)
        assert [(r["prompt"], r["chosen"], r["rejected"]) for r in got] == \
            [(r["prompt"], r["chosen"], r["rejected"]) for r in want]
        for side in ("chosen_score", "rejected_score"):
            np.testing.assert_allclose([r[side] for r in got], [r[side] for r in want], atol=1e-5, rtol=1e-5)
        return
    for a, b in zip(final_params(want), final_params(got), strict=True):
        assert_same_update(b, a, **adam_bound(STAGES[name][1], STAGES[name][2]))


def assert_same_rows(got, want):
    np.testing.assert_array_equal(got["sequences"], want["sequences"])
    np.testing.assert_array_equal(got["response_mask"], want["response_mask"])
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-6, rtol=1e-6)


def test_ppo_rollout_rows_are_the_same_on_one_two_and_four_devices_and_across_two_processes(
        runs, tiny_run, tmp_path, monkeypatch):
    """The first rollout of a PPO run: it samples from the starting policy on every mesh (later
    ones sample from params that differ between meshes in the last bits)."""
    from jaxrlhf.stages import ppo

    calls = []
    monkeypatch.setattr(ppo, "sample", recording(ppo.sample, calls))
    run_stage("ppo", tiny_run, tmp_path, 2, ["train.steps=1"])
    want, two_processes = runs["rollouts"]["one_device"], runs["rollouts"]["two_processes"]
    for got in (calls[0], runs["rollouts"]["four_devices"], *two_processes):
        assert_same_rows(got, want)
    # Each process sampled its own half and holds the whole batch.
    assert not (two_processes[0]["own"] & two_processes[1]["own"]).any()
    assert (two_processes[0]["own"] | two_processes[1]["own"]).all()


def test_two_hosts_given_the_same_prompt_sample_different_rows(runs):
    """Every row of a batch holds the same prompt; a host or device that reused another's
    sampling key would repeat its rows."""
    host0, host1 = runs["rollouts"]["same_prompt"]
    assert_same_rows(host1, host0)  # both hold the whole batch
    n = host0["response_mask"].shape[1]  # sequences are prompt then response
    responses = [tuple(s[m == 1]) for s, m in zip(host0["sequences"][:, -n:], host0["response_mask"])]
    mine, theirs = ([r for r, own in zip(responses, host["own"]) if own] for host in (host0, host1))
    assert len(mine) == len(theirs) == len(responses) // 2
    assert len(set(mine)) == len(mine) and len(set(theirs)) == len(theirs)  # within a host, no two alike
    assert not set(mine) & set(theirs)  # no row of one host is a row of the other
