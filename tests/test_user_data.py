"""A user's own data, end to end: plain-text SFT, a tokenizer without a pad token, `--dry-run`
running the run's own checks, held-out reward metrics, the columns in --help, and an
evaluation that shows a policy repeating one phrase."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf import config as cfg
from jaxrlhf.models import load_pretrained, load_tokenizer
from jaxrlhf.tasks.politeness import write_jsonl
from tests.conftest import ROOT, SHRINK, TINY
from tests.test_bad_input import (CASES, evaluate_args, grpo_args, online_dpo_args, ppo_args, preferences_args,
                                  reward_args, reward_model_without_pad, rloo_args, sft_args)
from tests.test_glue import rm_scores
from tests.test_stages import pad_less_copy


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- The whole pipeline from a user's files ----------------------------------------------------


def users_files(tiny_run, work: Path) -> Path:
    """What a user brings, where configs/tiny looks for it (runs/tiny/data under `work`):
    utterances as plain text (JSONL {"text"}), scored texts as a CSV (text,label), prompts,
    and a GPT-2 tokenizer saved without a pad token, as the stock one ships."""
    mine = work / "runs" / "tiny" / "data"
    mine.mkdir(parents=True)
    write_jsonl([{"text": r["prompt"] + r["response"]} for r in jsonl(tiny_run / "data" / "sft.jsonl")],
                mine / "utterances.jsonl")
    with (mine / "scored.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "label"])
        out.writerows([r["text"], r["label"]] for r in jsonl(tiny_run / "data" / "reward.jsonl"))
    for name in ("prompts.jsonl", "eval_prompts.jsonl"):
        shutil.copy(tiny_run / "data" / name, mine / name)
    pad_less_copy(tiny_run / "data" / "tokenizers" / "gpt2", mine / "tokenizers" / "gpt2")
    shutil.copytree(tiny_run / "data" / "tokenizers" / "bert", mine / "tokenizers" / "bert")
    return mine


@pytest.mark.slow
def test_a_users_plain_text_and_csv_run_the_whole_pipeline_through_the_script_dry_run_first(
        tiny_run, tmp_path, monkeypatch, capsys):
    """scripts/pipeline.py on configs/tiny without its data stage, on the user's files:
    `--dry-run` checks every stage whose inputs exist (SFT and the reward model, in full) and
    writes nothing; then the run goes through every stage, SFT on plain text padding with EOS."""
    mine = users_files(tiny_run, tmp_path)
    extra = {"sft.yaml": ["data.path=runs/tiny/data/utterances.jsonl"],
             "reward.yaml": ["data.path=runs/tiny/data/scored.csv", "eval_rows=80"]}
    stages = [dict(entry, config=str(TINY / entry["config"]),
                   overrides=SHRINK[entry["config"]] + extra.get(entry["config"], []))
              for entry in yaml.safe_load((TINY / "pipeline.yaml").read_text())["stages"] if entry["stage"] != "data"]
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"stages": stages}))
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)

    assert cli.pipeline_main(["--config", "pipeline.yaml", "--dry-run"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    n = len(stages)
    assert f"[1/{n}] sft: every check passed" in said and f"[2/{n}] reward: every check passed" in said, said
    assert "utterances.jsonl: 400 rows of plain text (column text): loss on every token" in said
    assert f"[3/{n}] ppo: reads the output of sft; checked when it runs" in said
    assert files_under(tmp_path) == before, "a dry run writes nothing"

    assert cli.pipeline_main(["--config", "pipeline.yaml"]) == 0, capsys.readouterr().err
    runs = tmp_path / "runs" / "tiny"
    stock = load_tokenizer(mine / "tokenizers" / "gpt2")
    assert stock.pad_token is None
    evaluated = yaml.safe_load((TINY / "evaluate.yaml").read_text())["policies"]
    trained = [name for name, entry in evaluated.items() if isinstance(entry, str)]
    for policy in trained:
        assert load_tokenizer(runs / policy / "final").pad_token == stock.eos_token, policy
    last = jsonl(runs / "reward" / "metrics.jsonl")[-1]
    assert {"eval/mse", "eval/pearson", "eval/spearman"} <= set(last)
    replies = jsonl(runs / "eval" / "replies.jsonl")
    assert len(replies) == len(evaluated) * 16 and {r["policy"] for r in replies} == set(evaluated)


@pytest.mark.slow
def test_plain_text_rows_learn_every_token_and_their_eos(tiny_run, tmp_path):
    """SFT's preflight (what its run trains on) against the tokenizer applied directly: each
    text's tokens then EOS, the loss on all of them; padded with EOS, the tokenizer having no
    pad token. Rows holding text beside a prompt are neither form: refused."""
    from jaxrlhf.stages import sft

    tokenizer_dir = pad_less_copy(tiny_run / "data" / "tokenizers" / "gpt2", tmp_path / "tokenizer")
    texts = ["Thank you so much!", " Ugh, go away.", "Of course, I will fix my bike today."]
    write_jsonl([{"text": t} for t in texts], tmp_path / "texts.jsonl")
    args = sft_args(tiny_run, tmp_path / "out", f"tokenizer={tokenizer_dir}", f"data.path={tmp_path / 'texts.jsonl'}",
                    "train.batch_size=1", "train.mesh.data=1", "max_length=16")
    config = cfg.load(sft.SFTConfig, args[1], args[2:])
    arrays = sft.preflight(config)["arrays"]
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        want_mask = [1] * len(ids) + [0] * (16 - len(ids))
        assert list(arrays["input_ids"][i]) == ids + [eos] * (16 - len(ids))
        assert list(arrays["loss_mask"][i]) == want_mask and list(arrays["attention_mask"][i]) == want_mask
    assert not (tmp_path / "out").exists()

    write_jsonl([{"text": "a", "prompt": "b"}], tmp_path / "mixed.jsonl")
    mixed = cfg.load(sft.SFTConfig, args[1], [*args[2:], f"data.path={tmp_path / 'mixed.jsonl'}"])
    with pytest.raises(cfg.ConfigError, match=r"column\(s\) \['response'\] not found; it has \['text', 'prompt'\] "
                                              r"\(it needs prompt\+response \(prompt/response\) or text"):
        sft.preflight(mixed)


# --- --dry-run runs the run's own checks ------------------------------------------------------

CASE = {c[0]: c for c in CASES}
# Every kind of check a run makes before it writes: data, columns, values, tokenizer against
# model, special tokens, contexts, mesh, checkpoints, reward sources, output folders.
DRY_RUN_CASES = [
    "missing data file", "malformed JSONL row", "missing column", "null label", "batch larger than the data",
    "prompt longer than the context", "max_length over the model's context", "response budget over the context",
    "tokenizer larger than the model's vocab", "policy with another model's tokenizer", "corrupted safetensors",
    "batch not divisible by the devices", "preference samples not dividing the devices",
    "reward label the model lacks", "reward function that does not import", "output folder of a user's files",
    "output folder not writable", "evaluation's last policy missing", "pad_token that is not a token",
    "reward model tokenizer without a pad token", "eval_rows leaving no rows to train on",
    "GRPO with more prompts per step than the file holds", "online DPO pairs not splitting over the devices",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", DRY_RUN_CASES)
def test_dry_run_fails_with_the_runs_own_one_line_error_and_writes_nothing(tiny_run, tmp_path, capsys, name):
    _, stage, args, message = CASE[name]
    out = tmp_path / "out"
    assert cli.stage_main(stage, [*args(tiny_run, tmp_path, out), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists(), sorted(out.rglob("*"))


def dpo_args(tiny_run, out, *extra):
    return ["--config", str(TINY / "dpo.yaml"), f"policy={tiny_run / 'sft' / 'final'}",
            f"data.path={tiny_run / 'pairs.jsonl'}", f"train.output_dir={out}", *extra]


GOOD = {"sft": sft_args, "reward": reward_args, "ppo": ppo_args, "rloo": rloo_args, "grpo": grpo_args,
        "online_dpo": online_dpo_args, "preferences": preferences_args, "dpo": dpo_args, "evaluate": evaluate_args}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(GOOD))
def test_dry_run_of_good_input_passes_every_check_and_writes_nothing(tiny_run, tmp_path, capsys, stage):
    out = tmp_path / "out"
    args = GOOD[stage](tiny_run, out)
    before = files_under(tmp_path)
    assert cli.stage_main(stage, [*args, "--dry-run"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith("dry run: every check passed; nothing written")
    assert not out.exists() and files_under(tmp_path) == before


@pytest.mark.slow
def test_the_pad_token_key_names_the_token_batches_are_padded_with(tiny_run, tmp_path):
    """An explicit pad_token wins over the tokenizer's own; a reward model's tokenizer without
    one pads with the token its RewardSource names."""
    from jaxrlhf.rewards import make_scorer
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.stages import sft

    args = sft_args(tiny_run, tmp_path / "out", "pad_token=e")
    tokenizer = sft.preflight(cfg.load(sft.SFTConfig, args[1], args[2:]))["tokenizer"]
    assert tokenizer.pad_token == "e" and tokenizer.pad_token_id == tokenizer.get_vocab()["e"] != tokenizer.eos_token_id
    reward = reward_model_without_pad(tiny_run, tmp_path / "rm")
    assert load_tokenizer(reward).pad_token_id is None
    score = make_scorer(cfg.RewardSource(model=str(reward), pad_token="[PAD]", max_length=16), make_mesh())
    module, params, config = load_pretrained(reward)
    enc = load_tokenizer(tiny_run / "reward" / "final", config)(["thank you", "ugh go away now"], padding=True,
                                                                 return_tensors="np")
    np.testing.assert_allclose(score(["", ""], ["thank you", "ugh go away now"]),
                               rm_scores(module, params, enc["input_ids"], enc["attention_mask"]), atol=1e-5)


# --- Held-out reward metrics -------------------------------------------------------------------


def pearson(x, y):
    return np.corrcoef(np.asarray(x, np.float64), np.asarray(y, np.float64))[0, 1]


def average_ranks(x):
    """1-based ranks, by definition: values below, plus the middle of the tied values' ranks."""
    x = np.asarray(x)
    return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression", "pairwise"])
def test_reward_training_logs_held_out_metrics_of_the_model_at_that_step(tiny_run, tmp_path, kind):
    """eval/* in metrics.jsonl at each log step and at the end, against the checkpoint of that
    step (and the export) applied directly to the held-out rows, with the metrics in NumPy:
    regression on the last 48 rows of the file (targets normalised with the training rows'
    mean and std), pairwise on a separate pairs file."""
    from jaxrlhf.trainer import Checkpoints

    rows = jsonl(tiny_run / "data" / "reward.jsonl")
    out = tmp_path / "rm"
    if kind == "regression":
        extra = ["eval_rows=48", "normalize_targets=true"]
        held = rows[-48:]
        train_labels = np.asarray([r["label"] for r in rows[:-48]], np.float64)
        targets = (np.asarray([r["label"] for r in held]) - train_labels.mean()) / train_labels.std()
    else:
        pairs = [{"chosen": a["text"], "rejected": b["text"]} if a["label"] > b["label"] else
                 {"chosen": b["text"], "rejected": a["text"]} for a, b in zip(rows[0::2], rows[1::2])]
        write_jsonl(pairs[:150], tmp_path / "pairs.jsonl")
        write_jsonl(pairs[150:], tmp_path / "held_out_pairs.jsonl")
        extra = ["kind=pairwise", f"data.path={tmp_path / 'pairs.jsonl'}",
                 f"eval_data={{path: {tmp_path / 'held_out_pairs.jsonl'}}}"]
        held = pairs[150:]
    args = reward_args(tiny_run, out, "train.steps=12", "train.log_every=4", "train.save_every=4",
                       "train.keep_checkpoints=5", "eval_batch_size=20", *extra)
    assert cli.stage_main("reward", args) == 0
    logged = {r["step"]: r for r in jsonl(out / "metrics.jsonl")}
    assert sorted(logged) == [4, 8, 12]
    module, _, config = load_pretrained(out / "final")
    tokenizer = load_tokenizer(out / "final", config)

    def scores(params, texts):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=40, return_tensors="np")
        return np.asarray(rm_scores(module, params, enc["input_ids"], enc["attention_mask"]), np.float64)

    checkpoints = Checkpoints(out, keep=5)
    for step in (4, 8, 12):
        params = checkpoints.restore_params(step)
        got = logged[step]
        if kind == "regression":
            pred = scores(params, [r["text"] for r in held])
            want = {"eval/mse": np.mean((pred - targets) ** 2), "eval/pearson": pearson(pred, targets),
                    "eval/spearman": pearson(average_ranks(pred), average_ranks(targets))}
        else:
            chosen, rejected = (scores(params, [p[side] for p in held]) for side in ("chosen", "rejected"))
            want = {"eval/accuracy": np.mean(chosen > rejected)}
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=2e-4, atol=2e-5, err_msg=f"{key} at step {step}")
    if kind == "regression":  # each step's own model: the comparison above tells the steps apart
        assert len({logged[s]["eval/mse"] for s in logged}) == 3


@pytest.mark.fast
def test_reward_metric_helpers_match_numpy_with_ties():
    """Spearman with tied values: the Pearson correlation of average ranks."""
    from jaxrlhf.stages.reward import held_out_metrics

    pred = np.array([0.3, 0.1, 0.1, 0.9, 0.5, 0.5, 0.5])
    target = np.array([1.0, -1.0, 0.0, 0.0, 2.0, 0.5, 0.5])
    by_hand = {"pred": [3, 1.5, 1.5, 7, 5, 5, 5], "target": [6, 1, 2.5, 2.5, 7, 4.5, 4.5]}
    np.testing.assert_array_equal(average_ranks(pred), by_hand["pred"])
    got = held_out_metrics("regression", {"text": pred}, {"target": target})
    np.testing.assert_allclose(got["eval/mse"], np.mean((pred - target) ** 2))
    np.testing.assert_allclose(got["eval/pearson"], pearson(pred, target))
    np.testing.assert_allclose(got["eval/spearman"], pearson(by_hand["pred"], by_hand["target"]))


# --- Columns in --help and the README --------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "rloo", "grpo", "online_dpo", "preferences", "dpo", "evaluate"])
def test_help_and_readme_show_each_stages_columns_with_an_example_row(stage, capsys):
    module, _ = cli.stage(stage)
    with pytest.raises(SystemExit):
        cli.stage_main(stage, ["--help"])
    shown = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text().split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    for form, row in module.COLUMNS.items():
        assert f"{form}: {json.dumps(row)}" in shown, (form, shown)
        assert json.dumps(row) in readme, (stage, form)


# --- Evaluation that shows a collapsed policy ---------------------------------------------------

PLANTED = " Okay. banana banana banana"  # every reply the fine-tuned policy learns


@pytest.mark.slow
def test_evaluation_names_a_planted_phrase_its_share_and_the_references_and_keeps_every_reply(tiny_run, tmp_path,
                                                                                             capsys):
    """A policy fine-tuned to give every prompt one reply: the collapse indicator names an
    n-gram of the phrase, with the share of replies (in replies.jsonl, counted here from the
    text) that carry it, against the SFT reference's share; replies.jsonl holds every reply
    with its prompt, policy, tokens and every scorer's score, as results.json and samples.md."""
    rows = jsonl(tiny_run / "data" / "sft.jsonl")[:64]
    write_jsonl([{"prompt": r["prompt"], "response": PLANTED} for r in rows], tmp_path / "collapsed.jsonl")
    hacked = tmp_path / "hacked"
    assert cli.stage_main("sft", ["--config", str(TINY / "sft.yaml"), "model_config=null",
                                  f"model={tiny_run / 'sft' / 'final'}", "tokenizer=null",
                                  f"data.path={tmp_path / 'collapsed.jsonl'}", "train.steps=80",
                                  "train.batch_size=16", "train.warmup_steps=0", "train.schedule=constant",
                                  "train.learning_rate=3e-3", "train.log_every=80", "train.save_every=80",
                                  f"train.output_dir={hacked}"]) == 0
    args = evaluate_args(tiny_run, tmp_path / "eval", policies=("sft", str(hacked / "final")))
    config = json.loads(Path(args[1]).read_text())
    config["scorers"]["reward_model"] = {"model": str(tiny_run / "reward" / "final"), "max_length": 40}
    config["sampling"]["greedy"] = True  # each policy's most likely reply: the planted one, for the fine-tuned
    Path(args[1]).write_text(json.dumps(config))
    assert cli.stage_main("evaluate", args) == 0
    out = tmp_path / "eval"
    results = json.loads((out / "results.json").read_text())
    replies = jsonl(out / "replies.jsonl")
    prompts = [r["prompt"] for r in jsonl(tiny_run / "data" / "eval_prompts.jsonl")]
    # Each prompt as the policies saw it (its last sampling.max_prompt_tokens tokens), in order.
    assert [r["policy"] for r in replies] == ["sft"] * len(prompts) + ["final"] * len(prompts)
    assert all(q.endswith(r["prompt"]) for r, q in zip(replies, prompts * 2))
    for r in replies:
        assert set(r) == {"policy", "prompt", "reply", "tokens", "kl_to_reference", "kl_estimator", "scores"}
        assert r["kl_to_reference"] is None  # greedy replies: no KL
        assert set(r["scores"]) == {"judge", "reward_model"}
    for name in ("sft", "final"):
        mine = [r for r in replies if r["policy"] == name]
        for scorer in ("judge", "reward_model"):
            np.testing.assert_allclose([r["scores"][scorer] for r in mine], results[name]["_scores"][scorer])
        np.testing.assert_allclose(np.mean([r["tokens"] for r in mine]), results[name]["response_tokens"])

    gram = results["final"]["_collapse_ngram"]
    assert gram and gram.strip() and gram in PLANTED, gram
    share = np.mean([gram in r["reply"] for r in replies if r["policy"] == "final"])
    reference_share = np.mean([gram in r["reply"] for r in replies if r["policy"] == "sft"])
    assert share >= 0.9 and reference_share <= 0.1, (share, reference_share)
    np.testing.assert_allclose(results["final"]["collapse_share"], share)
    np.testing.assert_allclose(results["final"]["collapse_reference_share"], reference_share)
    table = (out / "results.md").read_text()
    assert f"`{gram!r}`" in table and "collapse_share" in table and "judge/per_token" in table
    samples = (out / "samples.md").read_text()
    assert "| policy | reply | judge | reward_model | tokens |" in samples
