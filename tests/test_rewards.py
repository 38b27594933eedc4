"""Reward sources as TRL users write them: a weighted list of sources whose total and per-source
metrics are NumPy's, a None score as TRL's "not applicable", the prompt rows' other columns as
keyword arguments (aligned with each sample, through the stages' own run on 1 and 4 devices),
conversational prompts as message lists, and one error line for a bad function."""

import json
import shutil
import warnings
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import transformers

from jaxrlhf.config import RewardSource, from_dict
from jaxrlhf.errors import ConfigError, JaxRLHFError
from jaxrlhf.models import load_tokenizer
from jaxrlhf.parallel import make_mesh
from jaxrlhf.tasks.politeness import TASKS, write_jsonl
from jaxrlhf.rewards import make_scorer, penalise_missing_eos, source_metrics
from tests.conftest import randomize
from tests.test_glue_stages import record_step_batches, split_rollout


HERE = __name__


# --- Reward functions the tests name as sources ----------------------------------------------


def length(prompts, responses):
    return [float(len(r)) for r in responses]


def first_word_known(prompts, responses):
    """None (not applicable) for an empty response, else 1.0 or 0.0."""
    return [None if not r else float(r.split()[0] in ("yes", "no")) for r in responses]


def only_long(prompts, responses):
    return [None if len(r) < 3 else 1.0 for r in responses]


def positional_only(prompts, responses):
    """Our original convention: no columns."""
    return [float(len(prompts)) for _ in responses]


def every_column(prompts, responses, **columns):
    every_column.seen = (prompts, responses, columns)
    return [0.0] * len(responses)


def trl_style(completions, answer, **kwargs):
    """Written for TRL: called by keyword, `answer` named, the rest in **kwargs."""
    trl_style.seen = (completions, answer, kwargs)
    return [float(c[0]["content"] == a) if isinstance(c, list) else float(c == a) for c, a in zip(completions, answer)]


def needs_a_column(prompts, responses, solution):
    return [0.0] * len(responses)


def wrong_count(prompts, responses):
    return [0.0]


def not_numbers(prompts, responses):
    return ["high"] * len(responses)


def numeric_strings(prompts, responses):
    return [1.0, "2.5"][:len(responses)]


def bools(prompts, responses):
    return [r == "a" for r in responses]


def raises(prompts, responses):
    raise KeyError("answer")


def raises_lines(prompts, responses):
    raise ValueError("no number in the reply\nTraceback of the parser:\n  ...")


def aligned(prompts, completions, task, n, **kwargs):
    """Raises unless each prompt is its row's (task named in it); scores each reply by its row's n."""
    bad = [i for i, (p, t) in enumerate(zip(prompts, task)) if f"Could you {t}?" not in p]
    assert not bad, f"rows {bad} got another prompt's columns"
    return [float(x) for x in n]


def correct(prompts, responses, answer):
    """1.0 when the reply's last word is the row's answer; None (not applicable) for an empty reply."""
    return [None if not r.split() else float(r.split()[-1] == a) for r, a in zip(responses, answer)]


def source(function: str, **kwargs) -> RewardSource:
    return RewardSource(function=f"{HERE}:{function}", **kwargs)


# --- The scorer ------------------------------------------------------------------------------


@pytest.mark.fast
def test_the_total_is_the_weighted_nansum_and_each_source_logs_trls_mean_and_std():
    """Weights -2 and 0.5 (TRL's reward_weights), a None for some replies: the total and the
    `rewards/<name>/mean|std` metrics equal NumPy's nansum, nanmean and Bessel-corrected nanstd;
    default names are the functions' names, numbered where repeated; one source alone keeps
    the function's scores bit for bit."""
    responses = ["yes sir", "", "no", "maybe later", "yes", "nope"]
    prompts = ["q"] * len(responses)
    scorer = make_scorer((source("length", weight=-2.0), source("first_word_known", weight=0.5),
                          source("length", name="len")), make_mesh())
    assert list(scorer.parts) == ["length", "first_word_known", "len"]
    by_source = scorer.by_source(prompts, responses)
    lengths = np.asarray([len(r) for r in responses], np.float32)
    known = np.asarray([1, np.nan, 1, 0, 1, 0], np.float32)
    np.testing.assert_array_equal(by_source["first_word_known"], known)
    np.testing.assert_allclose(scorer(prompts, responses), np.nansum([-2 * lengths, 0.5 * known, lengths], 0),
                               rtol=1e-6)
    metrics = source_metrics(by_source)
    assert set(metrics) == {f"rewards/{n}/{s}" for n in ("length", "first_word_known", "len") for s in ("mean", "std")}
    assert metrics["rewards/first_word_known/mean"] == pytest.approx(np.nanmean(known))
    assert metrics["rewards/first_word_known/std"] == pytest.approx(np.nanstd(known, ddof=1))
    assert metrics["rewards/length/std"] == pytest.approx(np.std(lengths, ddof=1))
    one = make_scorer(source("length"), make_mesh())(prompts, responses)
    assert one.dtype == np.float32 and one.tobytes() == lengths.tobytes()


@pytest.mark.fast
def test_a_reply_no_source_applies_to_scores_zero_with_trls_warning():
    """None is "not applicable" (NaN for its source, left out of its metrics); a reply every
    source returned None for adds 0 to the total, with a warning naming it, as TRL's nansum,
    or is NaN (unscored) where GRPO and RLOO ask for it, a missing-EOS penalty keeping it so."""
    scorer = make_scorer((source("first_word_known"), source("only_long", weight=2.0)), make_mesh())
    rows = [{"prompt": "q", "id": i} for i in range(3)]
    with pytest.warns(UserWarning, match=r"every reward source returned None for 1 of 3 responses; "
                                         r"the first: prompt 'q', response '', columns \{'id': 1\}"):
        by_source = scorer.by_source(["q"] * 3, ["yes", "", "no thanks"], rows)
    np.testing.assert_array_equal(scorer.total(by_source), [1.0 + 2.0, 0.0, 1.0 + 2.0])
    unscored = scorer.total(by_source, unscored=np.nan)
    assert unscored.dtype == np.float32
    np.testing.assert_array_equal(unscored, [1.0 + 2.0, np.nan, 1.0 + 2.0])
    rollout = SimpleNamespace(sequences=np.array([[7, 0], [7, 0], [7, 0]]), response_mask=np.ones((3, 1)))
    np.testing.assert_array_equal(penalise_missing_eos(unscored, rollout, (1,), 1.0), [2.0, np.nan, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while some source applies
        scorer(["q"] * 2, ["yes", "no thanks"], rows[:2])


@pytest.mark.fast
def test_columns_reach_the_function_as_trl_passes_them():
    """Every column but `prompt` as a keyword list, to a function taking **kwargs; only the named
    ones otherwise, and none to `(prompts, responses)`; a function naming `completions` is called
    by keyword; conversational prompts give message lists and each reply as one assistant
    message; a column the function needs and the rows lack is one error line."""
    rows = [{"prompt": "What is 2+2?", "answer": "4", "level": 1}, {"prompt": "And 3+3?", "answer": "6", "level": 2}]
    texts = [r["prompt"] for r in rows]
    assert make_scorer(source("positional_only"), make_mesh())(texts, ["4", "5"], rows).tolist() == [2.0, 2.0]
    make_scorer(source("every_column"), make_mesh())(texts, ["4", "5"], rows)
    assert every_column.seen == (texts, ["4", "5"], {"answer": ["4", "6"], "level": [1, 2]})
    assert make_scorer(source("trl_style"), make_mesh())(texts, ["4", "5"], rows).tolist() == [1.0, 0.0]
    assert trl_style.seen == (["4", "5"], ["4", "6"], {"prompts": texts, "level": [1, 2]})
    chat = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    make_scorer(source("trl_style"), make_mesh())(["templated 1", "templated 2"], ["4", "6"], chat)
    assert trl_style.seen == ([[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "6"}]],
                              ["4", "6"], {"prompts": [r["prompt"] for r in chat], "level": [1, 2]})
    with pytest.raises(JaxRLHFError, match=rf"^reward function {HERE}:needs_a_column needs column\(s\) \['solution'\], "
                                           r"which the prompt rows lack \(they have \['answer', 'level', 'prompt'\]\)$"):
        make_scorer(source("needs_a_column"), make_mesh()).check_columns(rows)


@pytest.mark.fast
@pytest.mark.parametrize("function, message", [
    ("wrong_count", "returned 1 scores for 2 responses"),
    ("not_numbers", r"returned a str 'high' for response 1 \(counted from 1\); it must return one number per"),
    ("numeric_strings", r"returned a str '2.5' for response 2 \(counted from 1\); it must return one number"),
    ("raises", "raised KeyError: 'answer'"),
    ("raises_lines", "raised ValueError: no number in the reply"),
])
def test_a_bad_function_among_several_is_one_error_line_naming_it(function, message):
    scorer = make_scorer((source("length"), source(function, weight=0.5)), make_mesh())
    with pytest.raises(JaxRLHFError) as error:
        scorer(["q", "q"], ["a", "b"], [{"prompt": "q"}] * 2)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"reward function {HERE}:{function} {message.split(chr(92))[0]}")
    assert error.match(message)


@pytest.mark.fast
def test_a_bool_scores_one_or_zero_as_in_trl():
    """TRL makes a float tensor of what a function returns, so True and False count 1 and 0."""
    np.testing.assert_array_equal(make_scorer(source("bools"), make_mesh())(["q", "q"], ["a", "b"]), [1.0, 0.0])


@pytest.mark.fast
def test_a_list_of_sources_loads_from_yaml_with_each_items_own_errors():
    from jaxrlhf.stages.grpo import GRPOStageConfig

    base = {"policy": "p", "prompts": {"path": "x.jsonl"}}
    config = from_dict(GRPOStageConfig, {**base, "reward": [{"function": "m:f", "weight": 2}, {"model": "rm"}]}, "c")
    assert config.reward == (RewardSource(function="m:f", weight=2.0), RewardSource(model="rm"))
    assert from_dict(GRPOStageConfig, {**base, "reward": {"model": "rm"}}, "c").reward == RewardSource(model="rm")
    with pytest.raises(ConfigError, match=r"^c\.reward\[1\]: unknown key 'wieght'; did you mean 'weight'\?$"):
        from_dict(GRPOStageConfig, {**base, "reward": [{"model": "rm"}, {"model": "rm", "wieght": 1}]}, "c")
    with pytest.raises(ConfigError, match=r"^c\.reward\[0\]: weight=nan must be a finite number$"):
        from_dict(GRPOStageConfig, {**base, "reward": [{"model": "rm", "weight": float("nan")}]}, "c")
    with pytest.raises(ConfigError, match=r"^c\.reward: weight=-inf must be a finite number$"):
        from_dict(GRPOStageConfig, {**base, "reward": {"model": "rm", "weight": float("-inf")}}, "c")
    with pytest.raises(ConfigError, match=r"reward source names \['a', 'a'\] repeat"):
        make_scorer((source("length", name="a"), source("length", name="a")), make_mesh())


@pytest.mark.fast
def test_an_evaluation_scorer_of_several_sources_reports_each_ones_mean_and_standard_error():
    """A scorer listing a 0/1 correctness source and a length source: results.json's row and
    results.md's table hold the weighted total (mean, SE, median, std, per token) and each
    source's mean +- SE (the correctness one: accuracy +- its SE over the replies it applies to),
    as NumPy computes them."""
    from types import SimpleNamespace

    from jaxrlhf import evaluate
    from jaxrlhf.rewards import score_columns

    config = SimpleNamespace(scorers={"task": (), "judge": ()}, collapse_ngram=2)
    scorers = {"task": make_scorer((source("correct"), source("length", weight=0.1)), make_mesh()),
               "judge": make_scorer(source("length"), make_mesh())}
    replies = ["it is 4", "5", "", "so 6", "7", "the answer is 9"]
    rows = [{"prompt": "q", "answer": a} for a in ("4", "4", "2", "6", "8", "9")]
    scores = score_columns(scorers, ["q"] * 6, replies, rows)
    assert list(scores) == ["task", "task/correct", "task/length", "judge"]
    lengths = np.asarray([len(r) for r in replies], np.float64)
    hits = np.asarray([1, 0, np.nan, 1, 0, 1])
    tokens = [[1, 2]] * 6
    row = evaluate._results(config, SimpleNamespace(decode=str), replies, tokens, scores, np.zeros(6),
                            np.full(6, 3), tokens)
    known = hits[~np.isnan(hits)]
    assert row["task/correct/mean"] == pytest.approx(known.mean())
    assert row["task/correct/se"] == pytest.approx(known.std(ddof=1) / np.sqrt(5))
    assert row["task/length/se"] == pytest.approx(lengths.std(ddof=1) / np.sqrt(6))
    total = np.nan_to_num(hits) + 0.1 * lengths
    assert row["task/mean"] == pytest.approx(total.mean()) and row["task/median"] == pytest.approx(np.median(total))
    assert row["task/se"] == pytest.approx(total.std(ddof=1) / np.sqrt(6))
    assert "judge/correct/mean" not in row and row["judge/se"] == pytest.approx(row["task/length/se"])
    head = evaluate._tables({"p": row}, config)[0][0]
    assert head == ("| policy | task/mean | task/se | task/median | task/std | task/per_token | task/correct/mean | "
                    "task/correct/se | task/length/mean | task/length/se | judge/mean | judge/se | judge/median | "
                    "judge/std | judge/per_token | response_tokens | kl_to_reference |")


@pytest.mark.fast
def test_a_run_recorded_before_reward_weights_resumes_but_a_changed_weight_is_refused():
    from jaxrlhf.stages.common import _changes

    old = {"reward": {"function": "m:f", "model": None}}
    assert _changes(old, {"reward": {"function": "m:f", "model": None, "weight": 1.0, "name": None}}, ()) == ""
    assert _changes(old, {"reward": {"function": "m:f", "model": None, "weight": 2.0, "name": None}}, ()) == \
        "reward.weight (1.0 -> 2.0)"


# --- Through the stages' own run -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tiny_data, tmp_path_factory):
    """A tiny random GPT-2 on the tiny data's tokenizer, and a prompts file with two more
    columns (`task`, named in the prompt, and `n`, the row's number) -> (policy, prompts)."""
    work = tmp_path_factory.mktemp("rewards")
    gpt2 = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=1024, bos_token_id=0,
                                   eos_token_id=0)
    randomize(transformers.GPT2LMHeadModel(gpt2), seed=0).save_pretrained(work / "policy")
    for f in (tiny_data / "data" / "tokenizers" / "gpt2").iterdir():
        shutil.copy(f, work / "policy" / f.name)
    write_jsonl([{"prompt": f"Request: Could you {t}?\nReply:", "task": t, "n": i} for i, t in enumerate(TASKS[:12])],
                work / "prompts.jsonl")
    return work / "policy", work / "prompts.jsonl"


def grpo_config(tiny_policy, out, devices: int, steps: int = 1):
    """GRPO, 2 prompts x 4 samples a step, on `devices`, scored by `aligned` plus 1e-3 x `length`."""
    from jaxrlhf.stages.grpo import GRPOStageConfig

    policy, prompts = tiny_policy
    return from_dict(GRPOStageConfig, {
        "policy": str(policy), "prompts": {"path": str(prompts)}, "grpo": {"num_generations": 4},
        "reward": [{"function": f"{HERE}:aligned"}, {"function": f"{HERE}:length", "weight": 1e-3}],
        "sampling": {"max_new_tokens": 4, "max_prompt_tokens": 16},
        "train": {"output_dir": str(out), "batch_size": 8, "steps": steps, "log_every": 1, "save_every": steps,
                  "mesh": {"data": devices}}}, "config")


def check_aligned(batch, metrics, tiny_policy, k: int) -> None:
    """Each rollout row's score is its prompt row's `n` (+ under 0.1) and its decoded prompt is
    row n's; groups of `k` rows share a prompt; `metrics` are each source's mean and std."""
    policy, prompts = tiny_policy
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    pairs = split_rollout(load_tokenizer(policy), batch["sequences"], batch["attention_mask"],
                          batch["response_mask"].shape[1])
    n = np.rint(batch["scores"]).astype(int)
    assert [p for p, _ in pairs] == [rows[i]["prompt"] for i in n]
    groups = n.reshape(-1, k)
    assert (groups == groups[:, :1]).all() and len(set(n)) == len(n) // k
    assert metrics["rewards/aligned/mean"] == pytest.approx(n.mean())
    assert metrics["rewards/aligned/std"] == pytest.approx(n.std(ddof=1))
    assert 1e-3 * metrics["rewards/length/mean"] == pytest.approx((batch["scores"] - n).mean(), abs=1e-5)


@pytest.mark.fast
def test_columns_reach_the_function_aligned_with_each_sample_grouped_and_not(tiny_policy, tmp_path):
    """The online stages' preflight (the prompt rows with every column), sampler and scored
    batch, rows split over 4 devices: with 4 samples of each prompt on consecutive rows (GRPO, RLOO)
    and one each (PPO, online DPO), the function (asserting each prompt is its row's) scores
    each row by its prompt row's number, and that row's decoded prompt is that row's."""
    from jaxrlhf import data
    from jaxrlhf.parallel import put_state
    from jaxrlhf.stages import grouped, rollout

    ready = grouped.preflight(grpo_config(tiny_policy, tmp_path / "grpo", 4), "grpo")
    ids, mask = ready["prompts"][:2]
    params = put_state(ready["params"], ready["mesh"])
    for k in (4, 1):
        idx = np.repeat(data.batch_indices(len(ready["rows"]), 8 // k, 0, 0), k)
        out = rollout.sample(ready["module"], params, ids[idx], mask[idx], jax.random.key(k), ready["sampler"],
                             ready["mesh"])
        batch, metrics = rollout.scored_batch(out, idx, ready["prompts"], ready["tokenizer"], ready["sampler"],
                                              ready["scorer"], None)
        check_aligned(batch, metrics, tiny_policy, k)


@pytest.mark.slow
def test_the_grpo_stage_scores_each_sample_with_its_rows_columns_and_logs_each_source(tiny_policy, tmp_path,
                                                                                      monkeypatch):
    """The GRPO stage's own run (its update skipped), on 1 device: the batch its update gets and
    the metrics it logs, as above."""
    from jaxrlhf.stages import grouped, grpo

    batches = record_step_batches(monkeypatch, grouped, run_step=False)
    grpo.run(grpo_config(tiny_policy, tmp_path / "grpo", 1))
    [record] = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    check_aligned(batches[0], record, tiny_policy, 4)
