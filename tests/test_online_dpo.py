"""Online DPO: its pairs are each prompt's two fresh replies ordered by score (ties to the first,
as TRL), its loss is offline DPO's on the same pairs, and a run interrupted between
checkpoints resumes to the uninterrupted run's model, bit for bit."""

import json

import jax
import numpy as np
import optax
import pytest

from jaxrlhf.tasks import politeness
from jaxrlhf.models import load_pretrained, load_tokenizer
from jaxrlhf.parallel import data_parallel, make_mesh, put_state
from jaxrlhf.stages import dpo, online_dpo
from jaxrlhf.stages.rollout import encode_prompt_rows, sample, sampling_config
from jaxrlhf.updates.common import TrainState
from jaxrlhf.updates.dpo import make_dpo_step
from tests.conftest import interrupt_at_call
from tests.test_crash_and_multihost import assert_same_model
from tests.test_glue import preference_formula, response_logps
from tests.test_glue_stages import altered_copy, record_generations, record_step_batches
from tests.test_reliability import stage_config

pytestmark = pytest.mark.slow


def config(tiny_run, out, *extra):
    return stage_config(online_dpo, "online_dpo.yaml", tiny_run, out, extra)


def test_each_pair_is_one_prompts_two_replies_the_higher_scored_chosen_ties_to_the_first(
        tiny_run, tmp_path, monkeypatch):
    """Against the ground truth (a coarse score: many ties), recomputed here from the decoded
    replies; the loss covers each reply's own tokens and nothing of its prompt."""
    batches = record_step_batches(monkeypatch, online_dpo)
    generations = record_generations(monkeypatch, online_dpo)
    online_dpo.run(config(tiny_run, tmp_path / "run", "reward.model=null",
                          "reward.function=jaxrlhf.tasks.politeness:score_responses", "train.steps=3"))
    tokenizer = load_tokenizer(tiny_run / "sft" / "final")
    ties = 0
    for batch, gen in zip(batches, generations, strict=True):
        b, n = len(batch["chosen_ids"]), gen.response_mask.shape[1]
        p = gen.sequences.shape[1] - n
        np.testing.assert_array_equal(gen.sequences[:b, :p], gen.sequences[b:, :p])  # row b and B + b: one prompt
        replies = [tokenizer.decode(s[m == 1], skip_special_tokens=True)
                   for s, m in zip(gen.sequences[:, p:], gen.response_mask)]
        prompts = [tokenizer.decode(s[m == 1]) for s, m in zip(gen.sequences[:, :p], gen.attention_mask[:, :p])]
        scores = politeness.score_responses(prompts, replies)
        for i in range(b):
            first, second = i, b + i
            chosen, rejected = (second, first) if scores[second] > scores[first] else (first, second)
            ties += scores[first] == scores[second]
            for side, row in (("chosen", chosen), ("rejected", rejected)):
                np.testing.assert_array_equal(batch[f"{side}_ids"][i], gen.sequences[row])
                np.testing.assert_array_equal(batch[f"{side}_mask"][i], gen.attention_mask[row])
                np.testing.assert_array_equal(batch[f"{side}_loss_mask"][i],
                                              np.concatenate([np.zeros(p, int), gen.response_mask[row]]))
    assert ties > 0  # the tie rule was exercised
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"objective/kl", "objective/scores", "objective/scores_margin", "val/contain_eos_token",
            "rewards/accuracies", "pairs/ties"} <= set(metrics[-1])
    assert all(m["objective/scores_margin"] >= 0 for m in metrics)  # chosen never scored below rejected


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_online_dpo_loss_is_offline_dpos_on_the_same_pairs(loss_type, tiny_run, tmp_path):
    """One step on pairs built from fresh samples: the online path (reference scored in the
    step) and the offline DPO stage's (reference logprobs computed up front by its own
    `_reference_logps`) give the same loss, metrics and params, and the loss is the paper's
    formula on logprobs computed here from the model applied directly."""
    sft = tiny_run / "sft" / "final"
    module, ref_params, model_config = load_pretrained(sft)
    policy = altered_copy(sft, tmp_path / "policy", seed=1, std=0.05)  # not the reference: a nonzero log ratio
    _, params, _ = load_pretrained(policy)
    tokenizer = load_tokenizer(sft, model_config)
    cfg = config(tiny_run, tmp_path / "unused")
    rows = [json.loads(line) for line in (tiny_run / "data" / "prompts.jsonl").read_text().splitlines()[:8]]
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, cfg.sampling, 0, cfg.prompts, cfg.policy)
    mesh = make_mesh(1, 1)
    both = np.concatenate([np.arange(8), np.arange(8)])
    gen = sample(module, put_state(params, mesh), ids[both], mask[both], jax.random.key(3),
                 sampling_config(cfg.sampling, tokenizer, model_config), mesh)
    scores = np.random.default_rng(0).normal(size=16).astype(np.float32)
    batch, _ = online_dpo.make_pairs(gen.sequences, gen.attention_mask, gen.response_mask.shape[1], scores)

    tx = optax.sgd(0.1)  # plain SGD: the params move by the gradient itself, which Adam's first step would not show

    def state():  # a fresh one for each step: the compiled step donates its input state
        return put_state(TrainState.create(module, params, tx, ref_params=ref_params), mesh)

    step = data_parallel(make_dpo_step(loss_type, 0.1), mesh, state())
    online_state, online = step(state(), batch, jax.random.key(0))
    offline_batch = batch | dpo._reference_logps(module, put_state(ref_params, mesh), batch, mesh, 4)  # 2 calls
    offline_state, offline = step(state(), offline_batch, jax.random.key(0))
    for k in online:
        np.testing.assert_allclose(online[k], offline[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(online_state.params), jax.tree.leaves(offline_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    pi_c, pi_r, ref_c, ref_r = (response_logps(module, p, batch, side)
                                for p, side in ((params, "chosen"), (params, "rejected"),
                                                (ref_params, "chosen"), (ref_params, "rejected")))
    n_c, n_r = (np.sum((batch[f"{s}_loss_mask"] * batch[f"{s}_mask"])[:, 1:], 1) for s in ("chosen", "rejected"))
    want = preference_formula(loss_type, pi_c, pi_r, ref_c, ref_r, n_c, n_r, 0.1).mean()
    np.testing.assert_allclose(online["loss"], want, rtol=1e-4)


def test_a_run_interrupted_between_checkpoints_resumes_to_the_uninterrupted_model(tiny_run, tmp_path, monkeypatch):
    args = ("train.steps=4", "train.save_every=2", "train.log_every=1")
    online_dpo.run(config(tiny_run, tmp_path / "straight", *args))
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at_call(patch, online_dpo, call=4)  # after the checkpoint of step 2, before step 4's
        with pytest.raises(KeyboardInterrupt):
            online_dpo.run(config(tiny_run, tmp_path / "resumed", *args))
    assert not (tmp_path / "resumed" / "final").exists()
    online_dpo.run(config(tiny_run, tmp_path / "resumed", *args), resume=True)
    assert_same_model(tmp_path / "straight", tmp_path / "resumed")
    records = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("straight", "resumed")]
    assert [json.loads(line)["step"] for line in records[1]] == [1, 2, 3, 4]
