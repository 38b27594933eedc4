"""The glue of the stages: what each step, scorer and output file is fed, compared with an
independent computation (the tokenizer or the model applied directly, NumPy), never with the
code under test. The update functions' own glue is in test_glue.py."""

import json

import jax
import numpy as np
import pytest

from jaxrlhf import config as cfg
from jaxrlhf.config import DataConfig, RewardSource, SamplingSection, TrainConfig
from jaxrlhf.models import load_pretrained, load_tokenizer, save_pretrained
from jaxrlhf.tasks.politeness import TASKS, write_jsonl
from jaxrlhf.updates.ppo import PPOConfig
from tests.conftest import SHRINK, TINY
from tests.test_glue import next_token_logps, noisy, response_logps, rm_scores

pytestmark = pytest.mark.slow


# --- Stages: what each step, scorer and file is fed -------------------------------------------


PROMPTS = [f"Request: Could you {task}?\nReply:" for task in TASKS[:16]]


def altered_copy(src, dst, seed: int, std: float = 0.3):
    """A checkpoint in HF layout: `src`'s weights plus noise, with `src`'s tokenizer."""
    module, params, config = load_pretrained(src)
    return save_pretrained(dst, module, noisy(params, seed, std), tokenizer=load_tokenizer(src, config))


def record_step_batches(monkeypatch, stage, run_step: bool = True) -> list[dict]:
    """Every batch `stage` hands its compiled step, as NumPy, in order. The real step then
    runs, or with `run_step=False` is skipped (the state stays as it was, no metrics)."""
    real, batches = stage.data_parallel, []

    def recording(make_step, mesh, state):
        compiled = real(make_step, mesh, state) if run_step else None

        def step(state, batch, key):
            batches.append(jax.tree.map(np.asarray, batch))
            return compiled(state, batch, key) if run_step else (state, {})

        return step

    monkeypatch.setattr(stage, "data_parallel", recording)
    return batches


def record_generations(monkeypatch, stage) -> list:
    """Every output of `stage`'s calls to `sample` (`generate` on the mesh, gathered), as
    NumPy, in order."""
    real, outputs = stage.sample, []

    def recording(*args):
        out = real(*args)
        outputs.append(jax.tree.map(np.asarray, out))
        return out

    monkeypatch.setattr(stage, "sample", recording)
    return outputs


def split_rollout(tokenizer, sequences_BxS, attention_mask_BxS, n_new: int) -> list[tuple[str, str]]:
    """(prompt, response) text of each generated row: the prompt's real tokens, and the
    response's tokens before its first EOS."""
    rows = []
    for seq, attn in zip(np.asarray(sequences_BxS), np.asarray(attention_mask_BxS)):
        prompt, response = seq[:-n_new][attn[:-n_new] == 1], list(seq[-n_new:])
        if tokenizer.eos_token_id in response:
            response = response[: response.index(tokenizer.eos_token_id)]
        rows.append((tokenizer.decode(prompt), tokenizer.decode(response)))
    return rows


def prompt_and_response_reward(prompts, responses):
    """A reward that reads both texts, so a response scored with another row's prompt shows."""
    return [len(p) + len(r) / 1000 for p, r in zip(prompts, responses)]


def test_ppo_stage_scores_each_rollout_with_its_own_prompt_and_sees_each_prompt_once(tiny_run, tmp_path, monkeypatch):
    """The batches PPO's update receives: every row's score is the reward of that row's own
    prompt and response (decoded from the batch's sequences), and one epoch of steps covers
    every prompt exactly once. The update itself is skipped (tested above; compiling it here
    would only cost time)."""
    from jaxrlhf.stages import ppo

    write_jsonl([{"prompt": p} for p in PROMPTS], tmp_path / "prompts.jsonl")
    config = ppo.PPOStageConfig(
        policy=str(tiny_run / "sft" / "final"), reward=RewardSource(function=f"{__name__}:prompt_and_response_reward"),
        prompts=DataConfig(path=str(tmp_path / "prompts.jsonl")), ppo=PPOConfig(epochs=1),
        sampling=SamplingSection(max_new_tokens=8, max_prompt_tokens=16),
        train=TrainConfig(output_dir=str(tmp_path / "ppo"), batch_size=8, steps=2, log_every=1, save_every=2))
    batches = record_step_batches(monkeypatch, ppo, run_step=False)
    ppo.run(config)
    tokenizer = load_tokenizer(config.policy)
    seen = []
    for batch in batches:
        rows = split_rollout(tokenizer, batch["sequences"], batch["attention_mask"], batch["response_mask"].shape[1])
        np.testing.assert_allclose(batch["scores"], prompt_and_response_reward(*zip(*rows)), rtol=1e-6)
        seen += [prompt for prompt, _ in rows]
    assert sorted(seen) == sorted(PROMPTS)


def test_sft_stage_feeds_each_row_once_per_epoch_with_the_loss_on_its_response(tiny_run, tmp_path, monkeypatch):
    """Over each epoch (3 steps of 8 of 24 rows) the SFT step sees every row exactly once;
    in each row the tokens under the loss decode to the response and EOS, the others to the
    prompt. A stage that fed batch 0 at every step would see 8 rows, 3 times each."""
    from jaxrlhf.stages import sft

    rows = [{"prompt": f"Request: Can you {task}?\nReply:", "response": f" Sure, I will {task} soon."}
            for task in TASKS[:24]]
    write_jsonl(rows, tmp_path / "sft.jsonl")
    config = cfg.load(sft.SFTConfig, TINY / "sft.yaml", SHRINK["sft.yaml"] + [
        f"train.output_dir={tmp_path / 'sft'}", "train.steps=6", "train.batch_size=8", "train.save_every=6",
        f"tokenizer={tiny_run / 'data' / 'tokenizers' / 'gpt2'}", f"data.path={tmp_path / 'sft.jsonl'}"])
    batches = record_step_batches(monkeypatch, sft)
    sft.run(config)
    tokenizer = load_tokenizer(config.tokenizer)
    seen = [(tokenizer.decode(ids[(attn == 1) & (loss == 0)]), tokenizer.decode(ids[loss == 1]))
            for batch in batches
            for ids, attn, loss in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])]
    want = sorted((r["prompt"], r["response"] + tokenizer.eos_token) for r in rows)
    for epoch, rows_seen in enumerate((seen[:24], seen[24:]), 1):
        assert sorted(rows_seen) == want, f"epoch {epoch} saw {len(set(rows_seen))} distinct rows of 24"


def reward_stage_config(tiny_run, tmp_path, kind, rows, *overrides):
    """The shrunk tiny reward config on `rows` (written to a file): 3 steps of 8 rows."""
    from jaxrlhf.stages import reward

    write_jsonl(rows, tmp_path / "reward.jsonl")
    return cfg.load(reward.RewardConfig, TINY / "reward.yaml", SHRINK["reward.yaml"] + [
        f"kind={kind}", f"train.output_dir={tmp_path / 'reward'}", "train.steps=3", "train.batch_size=8",
        "train.save_every=3", f"tokenizer={tiny_run / 'data' / 'tokenizers' / 'bert'}",
        f"data.path={tmp_path / 'reward.jsonl'}", *overrides])


def test_reward_stage_pairs_each_text_with_its_own_normalised_label(tiny_run, tmp_path, monkeypatch):
    """Regression batches: each row's ids are one text's tokens (found by tokenising the texts
    directly) and its target is that text's label, standardised over the file in NumPy; one
    epoch holds every text once."""
    from jaxrlhf.stages import reward

    labels = np.random.default_rng(0).normal(size=24)
    rows = [{"text": f" I will {task} today.", "label": float(y)} for task, y in zip(TASKS, labels)]
    config = reward_stage_config(tiny_run, tmp_path, "regression", rows, "normalize_targets=true")
    batches = record_step_batches(monkeypatch, reward)
    reward.run(config)
    tokenizer = load_tokenizer(config.tokenizer)
    row_of = {tuple(tokenizer(r["text"])["input_ids"]): i for i, r in enumerate(rows)}
    standardised = (labels - labels.mean()) / labels.std()
    seen = []
    for batch in batches:
        for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], batch["target"]):
            seen.append(row_of[tuple(ids[mask == 1])])
            np.testing.assert_allclose(target, standardised[seen[-1]], rtol=1e-5)
    assert sorted(seen) == list(range(24))


def test_reward_stage_keeps_chosen_and_rejected_of_the_same_pair_in_place(tiny_run, tmp_path, monkeypatch):
    """Pairwise batches: in each row, `chosen_*` holds a pair's chosen text and `rejected_*`
    the rejected text of that same pair; one epoch holds every pair once."""
    from jaxrlhf.stages import reward

    rows = [{"chosen": f" Of course, I will {task}.", "rejected": f" Ugh. {task.capitalize()} yourself."}
            for task in TASKS[:24]]
    config = reward_stage_config(tiny_run, tmp_path, "pairwise", rows)
    batches = record_step_batches(monkeypatch, reward)
    reward.run(config)
    tokenizer = load_tokenizer(config.tokenizer)

    def texts(batch, side):
        return [tokenizer.decode(ids[mask == 1], skip_special_tokens=True)
                for ids, mask in zip(batch[f"{side}_ids"], batch[f"{side}_mask"])]

    seen = [pair for batch in batches for pair in zip(texts(batch, "chosen"), texts(batch, "rejected"))]
    want = [tuple(tokenizer.decode(tokenizer(r[side])["input_ids"], skip_special_tokens=True)
                  for side in ("chosen", "rejected")) for r in rows]
    assert sorted(seen) == sorted(want)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_stage_batches_hold_each_pair_with_its_reference_logprobs(loss_type, tiny_run, tmp_path, monkeypatch):
    """The DPO stage's batches: chosen and rejected rows are prompt + response + EOS of the
    same pair (the loss mask on the response and EOS), one epoch holds every pair once, and the
    precomputed reference logprobs are those of the named reference (not the policy) applied
    directly to that row, summed (IPO too: its step averages them for the loss alone)."""
    from jaxrlhf.stages import dpo

    rows = [{"prompt": p, "chosen": f" Of course, I will {task}.", "rejected": f" Ugh. Go {task} yourself."}
            for p, task in zip(PROMPTS[:12], TASKS)]
    write_jsonl(rows, tmp_path / "pairs.jsonl")
    reference = altered_copy(tiny_run / "sft" / "final", tmp_path / "reference", seed=7)
    config = cfg.load(dpo.DPOConfig, TINY / "dpo.yaml", SHRINK["dpo.yaml"] + [
        f"loss_type={loss_type}", f"policy={tiny_run / 'sft' / 'final'}", f"reference={reference}",
        f"data.path={tmp_path / 'pairs.jsonl'}", f"train.output_dir={tmp_path / 'dpo'}", "train.steps=3",
        "train.batch_size=4", "train.save_every=3"])
    batches = record_step_batches(monkeypatch, dpo)
    dpo.run(config)
    module, ref_params, _ = load_pretrained(reference)
    tokenizer = load_tokenizer(reference)
    seen = []
    for batch in batches:
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(batch[f"ref_{side}_logps"],
                                       response_logps(module, ref_params, batch, side),
                                       rtol=1e-4, atol=1e-4, err_msg=side)
        split = [[(tokenizer.decode(ids[(attn == 1) & (loss == 0)]), tokenizer.decode(ids[loss == 1]))
                  for ids, attn, loss in zip(*(batch[f"{side}_{k}"] for k in ("ids", "mask", "loss_mask")))]
                 for side in ("chosen", "rejected")]
        seen += [(c_prompt, c, r_prompt, r) for (c_prompt, c), (r_prompt, r) in zip(*split)]
    eos = tokenizer.eos_token
    assert sorted(seen) == sorted((r["prompt"], r["chosen"] + eos, r["prompt"], r["rejected"] + eos) for r in rows)


def test_preference_pairs_are_every_differently_scored_pair_of_each_prompts_own_samples(tiny_run, tmp_path,
                                                                                         monkeypatch):
    """The pairs file, against pairs built by hand from the recorded samples: for each of the
    10 prompts (3 generation calls of 4 prompts x 4 samples, the last one padded), every two
    of its own 4 samples whose rewards differ by more than the margin, higher score chosen,
    the scores those of the reward applied directly; nothing from the padding rows."""
    from jaxrlhf.stages import preferences

    write_jsonl([{"prompt": p} for p in PROMPTS[:10]], tmp_path / "prompts.jsonl")
    config = preferences.PreferencesConfig(
        policy=str(tiny_run / "sft" / "final"), reward=RewardSource(function=f"{__name__}:prompt_and_response_reward"),
        prompts=DataConfig(path=str(tmp_path / "prompts.jsonl")), output=str(tmp_path / "pairs.jsonl"),
        samples_per_prompt=4, batch_size=4, sampling=SamplingSection(max_new_tokens=8),
        min_margin=0.0025)  # between the reward's steps of 0.001, so float32 rounding decides no pair
    outputs = record_generations(monkeypatch, preferences)
    preferences.run(config)
    tokenizer = load_tokenizer(config.policy)
    samples = [row for out in outputs for row in split_rollout(tokenizer, out.sequences, out.attention_mask,
                                                                out.response_mask.shape[1])]
    want = []
    for i, prompt in enumerate(PROMPTS[:10]):
        group = samples[4 * i: 4 * i + 4]
        assert {p for p, _ in group} == {prompt}, f"generation rows {4 * i}..{4 * i + 3} are not prompt {i}'s"
        scores = prompt_and_response_reward(*zip(*group))
        for a in range(4):
            for b in range(4):
                if scores[a] - scores[b] > config.min_margin:
                    want.append((prompt, group[a][1], group[b][1], scores[a], scores[b]))
    fields = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")
    got = sorted(tuple(pair[k] for k in fields)
                 for pair in map(json.loads, (tmp_path / "pairs.jsonl").read_text().splitlines()))
    assert len(want) >= 10, "too few pairs for the comparison to mean much"
    assert [g[:3] for g in got] == [w[:3] for w in sorted(want)]
    np.testing.assert_allclose([g[3:] for g in got], [w[3:] for w in sorted(want)], rtol=1e-6)


@pytest.mark.parametrize("text", ["response", "prompt+response"])
def test_reward_model_scorer_reads_the_text_its_source_names(text, tiny_run, tmp_path):
    """With non-empty prompts (where the two modes differ), a reward model scorer gives the
    model applied directly to the response alone, or to prompt + response, tokenised here."""
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.rewards import make_scorer

    rm = altered_copy(tiny_run / "reward" / "final", tmp_path / "rm", seed=8)
    prompts = PROMPTS[:4]
    responses = [" Of course! I will walk the dog.", " Ugh. Go away.", " Fine.", " Thank you, happy to help."]
    # As the stages score: the texts split over all 4 devices.
    scores = make_scorer(RewardSource(model=str(rm), text=text, max_length=40, batch_size=4), make_mesh())(
        prompts, responses)
    module, params, config = load_pretrained(rm)
    read = responses if text == "response" else [p + r for p, r in zip(prompts, responses)]
    enc = load_tokenizer(rm, config)(read, padding=True, return_tensors="np")
    want = np.asarray(rm_scores(module, params, enc["input_ids"], enc["attention_mask"]))
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_evaluation_reports_the_kl_and_distinct_n_of_the_responses_it_sampled(tiny_run, tmp_path, monkeypatch,
                                                                              temperature):
    """results.json against the recorded samples: KL to the reference is the mean over rows of
    the summed response-token log p_policy - log p_reference (both models applied directly, at
    the sampling temperature: the KL of the distributions the replies were drawn from),
    distinct-n the share of distinct whitespace n-grams, pooled; response tokens and the
    ground-truth mean likewise, all over the first 16 rows sampled (the 16 prompts in order; the
    second batch of 12 is filled up with repeats). The policy is the SFT model plus noise, so
    the KL is far from 0."""
    from jaxrlhf import evaluate
    from jaxrlhf.tasks.politeness import score_responses

    write_jsonl([{"prompt": p} for p in PROMPTS], tmp_path / "prompts.jsonl")
    reference = tiny_run / "sft" / "final"
    noisy_policy = altered_copy(reference, tmp_path / "noisy", seed=9)
    config = evaluate.EvaluateConfig(
        policies={"noisy": str(noisy_policy)}, reference=str(reference), output_dir=str(tmp_path / "eval"),
        prompts=DataConfig(path=str(tmp_path / "prompts.jsonl")), batch_size=12,
        scorers={"ground_truth": RewardSource(function="jaxrlhf.tasks.politeness:score_responses")},
        sampling=SamplingSection(max_new_tokens=8, max_prompt_tokens=16, temperature=temperature))
    outputs = record_generations(monkeypatch, evaluate)
    evaluate.run(config)
    got = json.loads((tmp_path / "eval" / "results.json").read_text())["noisy"]

    tokenizer, models = load_tokenizer(reference), [load_pretrained(path)[:2] for path in (noisy_policy, reference)]
    # The policy's two batches; the reference's two, its collapse baseline, are sampled first.
    seq, attn, resp = (np.concatenate(parts)[: len(PROMPTS)] for parts in zip(
        *((out.sequences, out.attention_mask, out.response_mask) for out in outputs[-2:])))
    n = resp.shape[1]
    prompts, responses = zip(*split_rollout(tokenizer, seq, attn, n))
    assert list(prompts) == PROMPTS, "the first 16 samples are of the prompts in order"
    policy_logps, ref_logps = (next_token_logps(module, params, seq, attn, temperature)[:, -n:]
                               for module, params in models)
    kls = np.sum((policy_logps - ref_logps) * resp, axis=1)

    def distinct(n):
        grams = [tuple(w[i: i + n]) for r in responses for w in [r.split()] for i in range(len(w) - n + 1)]
        return len(set(grams)) / len(grams)

    assert abs(np.mean(kls)) > 0.5 and abs(distinct(1) - distinct(2)) > 0.02, "the checks below must discriminate"
    np.testing.assert_allclose(got["kl_to_reference"], np.mean(kls), rtol=1e-4)
    np.testing.assert_allclose([got["distinct_1"], got["distinct_2"]], [distinct(1), distinct(2)], rtol=1e-12)
    np.testing.assert_allclose(got["response_tokens"], resp.sum(1).mean())
    np.testing.assert_allclose(got["ground_truth/mean"], np.mean(score_responses(prompts, responses)), rtol=1e-6)
