"""Users never lose work or get a silently wrong result: devices, NaN guard, determinism."""

import json

import jax
import numpy as np
import pytest

from jaxrlhf import config as cfg
from jaxrlhf.errors import JaxRLHFError
from jaxrlhf.models import load_pretrained
from tests.conftest import SHRINK, TINY

pytestmark = pytest.mark.slow


def stage_config(module, name, tiny_run, out, extra=()):
    """A configs/tiny stage config, shrunk, reading the session's tiny run, writing to `out`."""
    writes = "output" if name == "preferences.yaml" else "train.output_dir"  # preferences writes one file
    return cfg.load(module.CONFIG if hasattr(module, "CONFIG") else _config_cls(module), TINY / name,
                    [*tiny_overrides(name, tiny_run), f"{writes}={out}", *extra])


def tiny_overrides(name, tiny_run):
    """The overrides that shrink configs/tiny's `name` and point it at the session's tiny run."""
    data, runs = tiny_run / "data", tiny_run
    paths = {
        "sft.yaml": [f"tokenizer={data / 'tokenizers' / 'gpt2'}", f"data.path={data / 'sft.jsonl'}"],
        "reward.yaml": [f"tokenizer={data / 'tokenizers' / 'bert'}", f"data.path={data / 'reward.jsonl'}"],
        "ppo.yaml": [f"policy={runs / 'sft' / 'final'}", f"reward.model={runs / 'reward' / 'final'}",
                     f"prompts.path={data / 'prompts.jsonl'}"],
        "rloo.yaml": [f"policy={runs / 'sft' / 'final'}", f"reward.model={runs / 'reward' / 'final'}",
                      f"prompts.path={data / 'prompts.jsonl'}"],
        "grpo.yaml": [f"policy={runs / 'sft' / 'final'}", f"reward.model={runs / 'reward' / 'final'}",
                      f"prompts.path={data / 'prompts.jsonl'}"],
        "dpo.yaml": [f"policy={runs / 'sft' / 'final'}", f"data.path={runs / 'pairs.jsonl'}"],
        "slic.yaml": [f"policy={runs / 'sft' / 'final'}", f"data.path={runs / 'pairs.jsonl'}"],
        "preferences.yaml": [f"policy={runs / 'sft' / 'final'}", f"reward.model={runs / 'reward' / 'final'}",
                             f"prompts.path={data / 'prompts.jsonl'}"],
        "online_dpo.yaml": [f"policy={runs / 'sft' / 'final'}", f"reward.model={runs / 'reward' / 'final'}",
                            f"prompts.path={data / 'prompts.jsonl'}"],
        "evaluate.yaml": [f"reference={runs / 'sft' / 'final'}", f"prompts.path={data / 'eval_prompts.jsonl'}",
                          f"scorers.reward_model.model={runs / 'reward' / 'final'}"],
    }[name]
    return [*SHRINK[name], *paths]


def _config_cls(module):
    from jaxrlhf.cli import STAGES

    return next(getattr(module, cls) for mod, cls in STAGES.values() if mod == module.__name__)


def final_params(path):
    return jax.tree.leaves(load_pretrained(path)[1])


@pytest.mark.parametrize("name,extra", [
    ("sft.yaml", ["train.steps=3", "train.batch_size=16"]),
    ("dpo.yaml", ["train.steps=2", "train.batch_size=8"]),
    ("dpo.yaml", ["train.steps=2", "train.batch_size=8", "lora.rank=4", "lora.targets=all-linear"]),
])
def test_stages_in_two_microbatches_end_with_the_one_batch_params(tiny_run, tmp_path, name, extra):
    """What lets a resume change train.grad_accum_steps: the stage's update is the whole batch's
    (with LoRA too, against its base as the reference)."""
    from jaxrlhf.stages import dpo, sft

    module = {"sft.yaml": sft, "dpo.yaml": dpo}[name]
    whole = module.run(stage_config(module, name, tiny_run, tmp_path / "whole", [*extra, "train.grad_accum_steps=1"]))
    split = module.run(stage_config(module, name, tiny_run, tmp_path / "split", [*extra, "train.grad_accum_steps=2"]))
    for a, b in zip(final_params(whole), final_params(split)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_devices_must_exist_and_divide_the_batch(tiny_run, tmp_path):
    """Refused by the stage when it builds its mesh, before it writes anything."""
    from jaxrlhf.errors import ConfigError
    from jaxrlhf.stages import sft

    with pytest.raises(ConfigError, match=r"train.batch_size = 10 row\(s\) do not split over 4 device\(s\) "
                                          r"\(mesh data=4 x fsdp=1\); it must be a multiple of 4"):
        sft.run(stage_config(sft, "sft.yaml", tiny_run, tmp_path / "x", ["train.batch_size=10", "train.mesh.data=4"]))
    with pytest.raises(ConfigError, match=r"mesh data=8 x fsdp=1 = 8 device\(s\), but this run has 4"):
        sft.run(stage_config(sft, "sft.yaml", tiny_run, tmp_path / "y", ["train.batch_size=16", "train.mesh.data=8"]))
    with pytest.raises(ConfigError, match=r"mesh fsdp=3 does not divide the 4 device\(s\) of this run"):
        sft.run(stage_config(sft, "sft.yaml", tiny_run, tmp_path / "z", ["train.batch_size=12", "train.mesh.fsdp=3"]))
    assert not any((tmp_path / d).exists() for d in "xyz")


def metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_second"}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_run, tmp_path):
    from jaxrlhf.stages import sft

    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        sft.run(stage_config(sft, "sft.yaml", tiny_run, tmp_path / out, ["train.steps=6", f"train.seed={seed}"]))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


@pytest.fixture
def poisoned_reward_data(tiny_run, tmp_path, monkeypatch):
    """64 reward rows, one of which turns into a NaN label once loaded (a data file with one is
    refused at load, so the NaN is planted past that check): the batch that draws it has a NaN
    loss, as a numerical blow-up would."""
    from jaxrlhf import data

    path = tmp_path / "reward.jsonl"
    path.write_text("".join((tiny_run / "data" / "reward.jsonl").read_text().splitlines(keepends=True)[:64]))
    real = data.load_rows

    def poisoned(*args, **kwargs):
        rows = real(*args, **kwargs)
        rows[5]["label"] = float("nan")
        return rows

    monkeypatch.setattr(data, "load_rows", poisoned)
    return path


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        tiny_run, tmp_path, poisoned_reward_data):
    from jaxrlhf.stages import reward
    from jaxrlhf.stages.export import export_run

    config = stage_config(reward, "reward.yaml", tiny_run, tmp_path / "run",
                          [f"data.path={poisoned_reward_data}", "train.steps=8", "train.batch_size=16",
                           "train.save_every=1"])
    with pytest.raises(JaxRLHFError, match=r"reward: non-finite loss=nan at step (\d+); the last good checkpoint is "
                                           r"step (\d+) in .*on_nonfinite=skip") as error:
        reward.run(config)
    bad_step, good_step = map(int, __import__("re").search(r"step (\d+); .* step (\d+)", str(error.value)).groups())
    assert good_step == bad_step - 1
    assert not (tmp_path / "run" / "final").exists()
    params = final_params(export_run(tmp_path / "run", tmp_path / "good", good_step))
    assert all(np.isfinite(np.asarray(p)).all() for p in params)


def test_on_nonfinite_skip_skips_the_poisoned_updates(tiny_run, tmp_path, poisoned_reward_data):
    from jaxrlhf.stages import reward

    config = stage_config(reward, "reward.yaml", tiny_run, tmp_path / "run",
                          [f"data.path={poisoned_reward_data}", "train.steps=8", "train.batch_size=16",
                           "train.log_every=1", "train.on_nonfinite=skip"])
    params = final_params(reward.run(config))
    assert all(np.isfinite(np.asarray(p)).all() for p in params)
    skipped = [m["skipped"] for m in metrics(tmp_path / "run")]
    assert 0 < sum(skipped) < len(skipped)
