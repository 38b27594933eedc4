"""The RLOO and GRPO stages through their own `run`: k samples of each prompt on consecutive
rows, the same params on 1 and 4 fake devices, and an interrupted run resumed from its
checkpoint ends with the uninterrupted run's params, bit for bit."""

import importlib

import numpy as np
import pytest

from jaxrlhf.errors import JaxRLHFError
from tests.conftest import interrupt_at_call
from tests.test_reliability import final_params, stage_config

pytestmark = pytest.mark.slow

# 2 prompts x 4 samples a step, groups split over the 4 devices; 2 epochs x 2 minibatches.
SHARED = {"rloo": ["train.steps=2", "train.batch_size=8", "rloo.epochs=2", "rloo.num_minibatches=2"],
          "grpo": ["train.steps=2", "train.batch_size=8", "grpo.epochs=2", "grpo.num_minibatches=2"]}


def run(name, tiny_run, out, extra=(), resume=False):
    module = importlib.import_module(f"jaxrlhf.stages.{name}")
    return module.run(stage_config(module, f"{name}.yaml", tiny_run, out, [*SHARED[name], *extra]), resume=resume)


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_a_group_stage_samples_k_per_prompt_and_ends_the_same_on_one_and_four_devices(tiny_run, tmp_path,
                                                                                     monkeypatch, name):
    from jaxrlhf.stages import grouped

    calls = []
    real = grouped.sample

    def recording(module, params, ids, mask, key, settings, mesh):
        out = real(module, params, ids, mask, key, settings, mesh)
        calls.append((np.asarray(ids), np.asarray(out.sequences)[:, ids.shape[1]:]))
        return out

    monkeypatch.setattr(grouped, "sample", recording)
    one = run(name, tiny_run, tmp_path / "one", ["train.mesh.data=1"])
    prompts, responses = calls[0]
    groups = prompts.reshape(2, 4, -1)
    assert (groups == groups[:, :1]).all(), "a group's rows hold one prompt"
    assert not (groups[0, 0] == groups[1, 0]).all(), "the groups hold different prompts"
    assert len({r.tobytes() for r in responses}) > 4, "each row draws its own sample"
    four = run(name, tiny_run, tmp_path / "four", ["train.mesh.data=4"])
    one, four = (np.concatenate([np.ravel(x) for x in final_params(p)]) for p in (one, four))
    # Adam's step is about lr x sign(g) per element, so where a gradient is about zero the order
    # of float sums (1 or 4 devices) can move that element by up to a step or two differently,
    # and the next updates carry that into the rest at about 1e-5; all but a few elements agree
    # to a third of one step. A wrong split of the groups moves most elements by whole steps.
    off = ~np.isclose(four, one, atol=1e-4, rtol=0)
    assert off.sum() <= 1e-3 * off.size, f"{off.sum()} of {off.size} params differ"
    module = importlib.import_module(f"jaxrlhf.stages.{name}")
    config = stage_config(module, f"{name}.yaml", tiny_run, tmp_path, SHARED[name])
    lr, method = config.train.learning_rate, getattr(config, name)
    updates = config.train.steps * method.epochs * method.num_minibatches
    np.testing.assert_allclose(four, one, atol=2 * lr * updates, rtol=0)


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_a_group_stage_resumed_after_an_interruption_gives_the_uninterrupted_params(tiny_run, tmp_path,
                                                                                   monkeypatch, name):
    from jaxrlhf.stages import grouped

    extra = ["train.steps=5", "train.save_every=2"]
    run(name, tiny_run, tmp_path / "straight", extra)
    interrupt_at_call(monkeypatch, grouped, 4)  # after the step-2 checkpoint, before the step-4 one
    with pytest.raises(KeyboardInterrupt):
        run(name, tiny_run, tmp_path / "interrupted", extra)
    monkeypatch.undo()
    with pytest.raises(JaxRLHFError, match="already holds checkpoints .* pass --resume"):
        run(name, tiny_run, tmp_path / "interrupted", extra)
    run(name, tiny_run, tmp_path / "interrupted", extra, resume=True)
    for a, b in zip(final_params(tmp_path / "straight" / "final"), final_params(tmp_path / "interrupted" / "final"),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
