"""The stages end to end on a shrunken copy of configs/tiny, resume, configs, rewards, pairs."""

import json
import re
import shutil
import sys
import warnings

import jax
import numpy as np
import pytest
import yaml

from jaxrlhf import cli
from jaxrlhf import config as cfg
from jaxrlhf.config import RewardSource, SamplingSection
from jaxrlhf.errors import ConfigError, JaxRLHFError
from jaxrlhf.stages.preferences import make_pairs
from tests.conftest import ROOT, SHRINK, TINY, interrupt_at_call


@pytest.mark.slow
def test_every_stage_leaves_its_outputs(tiny_run):
    for stage in ("sft", "reward", "ppo", "rloo", "grpo", "dpo", "slic", "online_dpo"):
        assert (tiny_run / stage / "final" / "model.safetensors").is_file(), stage
        assert (tiny_run / stage / "config.json").is_file()
        lines = (tiny_run / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and all("loss" in json.loads(line) for line in lines), stage
    ppo_metrics = json.loads((tiny_run / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "policy/clipfrac", "value/loss",
                "objective/entropy", "response_length", "learning_rate"):
        assert key in ppo_metrics
    for stage, keys in (("rloo", ("kl", "clip_ratio/region_mean")), ("grpo", ("kl", "clip_ratio/low_mean"))):
        last = json.loads((tiny_run / stage / "metrics.jsonl").read_text().splitlines()[-1])
        for key in ("reward", "reward_std", "frac_reward_zero_std", "entropy", "completions/mean_length",
                    "learning_rate", *keys):
            assert key in last, (stage, key)
    pairs = [json.loads(line) for line in (tiny_run / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    results = json.loads((tiny_run / "eval" / "results.json").read_text())
    assert list(results) == ["sft", "ppo", "rloo", "grpo", "dpo", "slic", "online_dpo", "best_of_16"]
    for name in results:
        for key in ("ground_truth/mean", "reward_model/median", "kl_to_reference", "distinct_2", "response_tokens"):
            assert np.isfinite(results[name][key])
    assert results["sft"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)  # the reference itself
    for name in ("rewards.png", "results.md", "samples.md"):
        assert (tiny_run / "eval" / name).stat().st_size > 0


@pytest.mark.slow
def test_ppo_export_loads_in_transformers_and_generates(tiny_run):
    import torch
    import transformers

    path = tiny_run / "ppo" / "final"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    ids = tokenizer("Request: Can you walk the dog?\nReply:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
def test_export_script_turns_a_checkpoint_into_hf_layout(tiny_run, tmp_path):
    from jaxrlhf.models import load_pretrained
    from jaxrlhf.stages.export import export_run

    out = export_run(tiny_run / "sft", tmp_path / "sft-step6", step=6)
    _, params, _ = load_pretrained(out)
    _, final, _ = load_pretrained(tiny_run / "sft" / "final")
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final)))
    with pytest.raises(JaxRLHFError, match=r"has no checkpoint 5; it has \[6, 12\]"):
        export_run(tiny_run / "sft", tmp_path / "nope", step=5)


@pytest.mark.slow
def test_chat_keeps_the_conversation_in_the_prompt(tiny_run):
    from jaxrlhf.chat import ChatSession

    session = ChatSession(str(tiny_run / "sft" / "final"), SamplingSection(max_new_tokens=8), seed=3)
    first = session.reply("Can you walk the dog?")
    session.reply("Thanks!")
    assert session.history.startswith("Request: Can you walk the dog?\nReply:")
    assert first in session.history and "Request: Thanks!\nReply:" in session.history
    session.reset()
    assert session.history == ""


@pytest.mark.slow
def test_chat_script_keeps_the_session_through_a_line_that_is_not_utf8(tiny_run, monkeypatch, capsys):
    import io

    from jaxrlhf.commands import chat_main as main

    lines = b"Can you walk the \xff\xfe dog?\nThanks!\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    assert main([str(tiny_run / "sft" / "final"), "--max-new-tokens", "8", "--seed", "3"]) == 0
    replies = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bot> ")]
    assert len(replies) == 2


@pytest.mark.fast
@pytest.mark.parametrize("lora", [[], ["lora.rank=4", "lora.targets=all-linear"]], ids=["full", "lora"])
def test_resume_after_an_interruption_gives_the_uninterrupted_params(tiny_data, tmp_path, monkeypatch, capsys, lora):
    """With LoRA too: its checkpoints hold the adapters alone (the base reloads from the model)."""
    from jaxrlhf.stages import sft
    from jaxrlhf.models import load_pretrained
    from jaxrlhf.trainer import Checkpoints

    def config(out):
        overrides = SHRINK["sft.yaml"] + [f"train.output_dir={out}", "train.steps=8", "train.save_every=3",
                                          f"tokenizer={tiny_data / 'data' / 'tokenizers' / 'gpt2'}",
                                          f"data.path={tiny_data / 'data' / 'sft.jsonl'}", *lora]
        return cfg.load(sft.SFTConfig, TINY / "sft.yaml", overrides)

    sft.run(config(tmp_path / "straight"))
    assert "sft: step 8/8 (100%), " in capsys.readouterr().out  # no terminal here: progress as plain lines
    interrupt_at_call(monkeypatch, sft, 5)  # after the step-3 checkpoint, before the step-6 one
    with pytest.raises(KeyboardInterrupt):
        sft.run(config(tmp_path / "interrupted"))
    monkeypatch.undo()
    with pytest.raises(JaxRLHFError, match="already holds checkpoints .* pass --resume"):
        sft.run(config(tmp_path / "interrupted"))
    capsys.readouterr()
    sft.run(config(tmp_path / "interrupted"), resume=True)
    assert "sft: step 3/8 (38%)" in capsys.readouterr().out.splitlines()  # where it resumed
    _, a, _ = load_pretrained(tmp_path / "straight" / "final")
    _, b, _ = load_pretrained(tmp_path / "interrupted" / "final")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().metadata(tmp_path / "interrupted" / "checkpoints" / "8" / "state")
    assert saved.item_metadata.tree["base_params"] is None  # LoRA: the base is not in the checkpoint
    assert set(saved.item_metadata.tree["params"]) == ({"lora", "heads"} if lora else {"transformer"})
    from jaxrlhf.models import peft
    from jaxrlhf.stages.export import export_run

    def check_adapter():  # the adapter alone, in PEFT's format beside final/, is the checkpoint's
        adapters, _ = peft.load_adapter(tmp_path / "interrupted" / "adapter", a, "gpt2")
        trained = Checkpoints(tmp_path / "interrupted", keep=2).restore_params(8)["lora"]
        for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(trained), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    if lora:  # the run's end wrote it; export writes it anew
        check_adapter()
        shutil.rmtree(tmp_path / "interrupted" / "adapter")
    # The checkpoint exports as final/ (LoRA: merged onto the base, and the adapter to adapter/).
    _, c, _ = load_pretrained(export_run(tmp_path / "interrupted", tmp_path / "exported"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if lora:
        check_adapter()


@pytest.mark.fast
@pytest.mark.parametrize("pipeline", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").glob("*/pipeline.yaml")))
def test_every_shipped_config_is_valid(pipeline):
    """Every stage config of every shipped pipeline loads and validates (a dry run would also
    load the models, which for the hub configs needs the hub)."""
    stages = cli.load_pipeline(ROOT / pipeline)
    assert len(stages) == len(yaml.safe_load((ROOT / pipeline).read_text())["stages"])
    for name, _, config in stages:  # a run stopped before its end can be resumed
        train = getattr(config, "train", None)
        assert train is None or train.save_every <= train.steps, (name, train.save_every, train.steps)


@pytest.mark.fast
def test_stage_script_dry_run_and_bad_keys(capsys, tmp_path, monkeypatch):
    # The dry run runs the stage's checks: here the policy the config names (relative to the
    # working directory, an empty folder, whatever the checkout's runs/ holds) is not there yet.
    monkeypatch.chdir(tmp_path)
    assert cli.stage_main("ppo", ["--config", str(TINY / "ppo.yaml"), "--dry-run"]) == 2
    said = capsys.readouterr()
    assert "PPO: runs/tiny/sft/final" in said.out and "runs/tiny/sft/final does not exist" in said.err
    assert cli.stage_main("ppo", ["--config", str(TINY / "ppo.yaml"), "--dry-run", "ppo.kl_coeff=0.2"]) == 2
    assert "unknown key 'kl_coeff'; did you mean 'kl_coef'?" in capsys.readouterr().err
    assert cli.stage_main("sft", ["--config", str(TINY / "sft.yaml"), "--dry-run", "train.steps=-1"]) == 2
    assert "steps=-1 must be at least 1" in capsys.readouterr().err
    # A warning is one line on stderr (Python's own showwarning, which pytest replaces, writes it).
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
    assert cli.stage_main("sft", ["--config", str(TINY / "sft.yaml"), "--dry-run", "train.save_every=1000"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "warning: train.save_every=1000 exceeds train.steps=600: the only checkpoint is the last step's, so a run "
        "stopped before its end leaves nothing to --resume")


@pytest.mark.fast
def test_each_stage_script_offers_only_the_flags_it_honours(capsys):
    """--resume where it does something (a training stage continues its run, make_preferences
    keeps its finished pairs file; evaluate, data and gguf write their output whole, the frontier
    always continues), --overwrite where the stage replaces its output when told."""
    resumes = {"sft", "reward", "ppo", "rloo", "grpo", "dpo", "online_dpo", "preferences"}
    overwrites = {"preferences", "evaluate"}
    for name in cli.STAGES:
        with pytest.raises(SystemExit):
            cli.parse_stage_args(name, ["--help"])
        flags = set(re.findall(r"(--[a-z-]+)", capsys.readouterr().out.split("config keys")[0]))
        assert ("--resume" in flags, "--overwrite" in flags) == (name in resumes, name in overwrites), (name, flags)
    with pytest.raises(SystemExit):
        cli.parse_stage_args("evaluate", ["--config", "x.yaml", "--resume"])
    assert "unrecognized arguments: --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_reward_model_scores_text_from_another_tokenizer(tiny_run):
    """The policy's GPT-2 BPE and the reward model's WordPiece differ: scoring decodes to text
    and re-encodes, and gives what the reward model gives on that text directly."""
    from jaxrlhf.data import encode_texts
    from jaxrlhf.models import load_pretrained, load_tokenizer
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.rewards import make_scorer

    rm = tiny_run / "reward" / "final"
    policy_tok = load_tokenizer(tiny_run / "sft" / "final")
    texts = [" Of course! I will walk the dog today.", " Ugh. Go away."]
    responses = [policy_tok.decode(policy_tok(t)["input_ids"]) for t in texts]  # a round trip through BPE
    assert responses == texts
    scores = make_scorer(RewardSource(model=str(rm), max_length=40, batch_size=4), make_mesh())(["", ""], responses)
    module, params, config = load_pretrained(rm)
    enc = encode_texts(load_tokenizer(rm, config), texts, 40)
    want = np.asarray(module.apply({"params": params}, enc["input_ids"], enc["attention_mask"]))[:, 0]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"reward label 'POSITIVE' is not one of .*\['LABEL_0'\]"):
        make_scorer(RewardSource(model=str(rm), label="POSITIVE"), make_mesh())


@pytest.mark.fast
def test_function_rewards_are_checked():
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.rewards import make_scorer

    ok = make_scorer(RewardSource(function="jaxrlhf.tasks.politeness:score_responses"), make_mesh())
    assert ok(["", ""], [" Thank you!", " Go away."]).tolist() == pytest.approx([np.tanh(0.6), np.tanh(-0.7)])
    with pytest.raises(ConfigError, match="cannot be imported"):
        make_scorer(RewardSource(function="jaxrlhf.tasks.politeness:nope"), make_mesh())
    bad = make_scorer(RewardSource(function="tests.test_stages:wrong_length"), make_mesh())
    with pytest.raises(JaxRLHFError, match="returned 1 scores for 2 responses"):
        bad(["", ""], ["a", "b"])
    with pytest.raises(JaxRLHFError, match="raised ZeroDivisionError"):
        make_scorer(RewardSource(function="tests.test_stages:raises"), make_mesh())(["a"], ["b"])
    for name, message in (("nothing", r"returned None; it must return one number per response"),
                          ("a_nan", r"returned a non-finite score for 1 of 3 responses \(the first: response 3, "
                                    r"counted from 1: nan\)")):
        with pytest.raises(JaxRLHFError, match=rf"^reward function tests.test_stages:{name} {message}"):
            make_scorer(RewardSource(function=f"tests.test_stages:{name}"), make_mesh())([""] * 3, ["a", "b", "c"])


def wrong_length(prompts, responses):
    return [0.0]


def raises(prompts, responses):
    return 1 / 0


def words(prompts, responses):
    return ["good"] * len(responses)


def a_dict(prompts, responses):
    return {"score": [1.0] * len(responses)}


def nothing(prompts, responses):
    return None


def a_nan(prompts, responses):
    return [1.0] * (len(responses) - 1) + [float("nan")]


@pytest.mark.fast
def test_pairs_put_the_higher_score_first_and_respect_the_margin():
    responses, scores = ["a", "b", "c", "b"], [0.1, 0.9, 0.5, 0.9]
    pairs = make_pairs("p", responses, scores, "all", 0.0)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("b", "c"), ("b", "a"), ("c", "a")}
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert [(p["chosen"], p["rejected"]) for p in make_pairs("p", responses, scores, "all", 0.45)] == [("b", "a")] * 2
    assert [(p["chosen"], p["rejected"]) for p in make_pairs("p", responses, scores, "best_worst", 0.0)] == [("b", "a")]


@pytest.mark.fast
def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    from jaxrlhf.trainer import MetricLog

    lines = []
    log = MetricLog(tmp_path, tensorboard=True)
    log.write(3, {"loss": 0.5, "grad_norm": 1.25}, echo=lines.append)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 0.5, "grad_norm": 1.25}
    assert lines == ["{'step': 3, 'loss': 0.5, 'grad_norm': 1.25}"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.fast
def test_a_missing_eos_costs_the_penalty_and_an_ended_reply_nothing():
    from jaxrlhf.rewards import penalise_missing_eos
    from jaxrlhf.sampling import GenerateOutput

    eos, pad = 9, 0
    # Prompt [5], then responses: ended at t=1; never ended; EOS only in the padding (not real).
    sequences = np.array([[5, 3, eos, pad], [5, 3, 4, 4], [5, 3, 4, eos]])
    response_mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    rollout = GenerateOutput(sequences, np.ones_like(sequences), response_mask, None, None)
    scores = penalise_missing_eos(np.array([1.0, 1.0, 0.5], np.float32), rollout, eos, penalty=2.0)
    np.testing.assert_array_equal(scores, [1.0, -1.0, -1.5])


def pad_less_copy(policy, where):
    """`policy` with a tokenizer saved without a pad token, as the stock GPT-2 tokenizer ships."""
    import shutil

    shutil.copytree(policy, where)
    config = json.loads((where / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (where / "tokenizer_config.json").write_text(json.dumps(config))
    from jaxrlhf.models import load_tokenizer

    assert load_tokenizer(where).pad_token_id is None
    return where


@pytest.mark.slow
def test_a_tokenizer_without_a_pad_token_pads_with_eos_in_every_stage(tiny_run, tmp_path):
    """TRL's rule for GPT-2: pad with EOS, and let the masks (from lengths and the sampler's
    done flags, never from ids) tell padding from a real EOS."""
    from tests.test_bad_input import evaluate_args, ppo_args

    policy = pad_less_copy(tiny_run / "sft" / "final", tmp_path / "policy")
    assert cli.stage_main("ppo", ppo_args(tiny_run, tmp_path / "ppo", f"policy={policy}")) == 0
    pairs = tmp_path / "pairs.jsonl"
    assert cli.stage_main("preferences", [
        "--config", str(TINY / "preferences.yaml"), *SHRINK["preferences.yaml"], "prompts.max_rows=16",
        f"policy={policy}", f"reward.model={tiny_run / 'reward' / 'final'}",
        f"prompts.path={tiny_run / 'data' / 'prompts.jsonl'}", f"output={pairs}"]) == 0
    assert cli.stage_main("dpo", ["--config", str(TINY / "dpo.yaml"), *SHRINK["dpo.yaml"], f"policy={policy}",
                                  f"data.path={pairs}", "train.steps=1", f"train.output_dir={tmp_path / 'dpo'}"]) == 0
    assert cli.stage_main("evaluate", evaluate_args(tiny_run, tmp_path / "eval", policies=(str(policy),))) == 0
    from jaxrlhf.models import load_tokenizer

    assert load_tokenizer(tmp_path / "ppo" / "final").pad_token == load_tokenizer(policy).eos_token


@pytest.mark.slow
def test_sft_and_reward_inputs_cut_to_fit_keep_what_matters_and_say_how_many(tiny_run, tmp_path, minilm_dir):
    """SFT keeps a cut response's EOS and warns once with the count (counted here from the
    tokenizer directly); a reward model reading prompt + response keeps the end (the response)."""
    from jaxrlhf import data
    from jaxrlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_run / "data" / "tokenizers" / "gpt2")
    rows = [json.loads(line) for line in (tiny_run / "data" / "sft.jsonl").read_text().splitlines()][:64]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    length = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    too_long = sum(length(r["prompt"]) + length(r["response"]) + 1 > 24 for r in rows)
    assert 0 < too_long < len(rows)
    from tests.test_bad_input import sft_args

    with pytest.warns(UserWarning, match=rf"^{too_long} of 64 responses cut to fit max_length=24 \(each keeps its EOS\)"):
        assert cli.stage_main("sft", sft_args(tiny_run, tmp_path / "sft", "max_length=24",
                                              f"data.path={tmp_path / 'sft.jsonl'}")) == 0

    bert = load_tokenizer(minilm_dir)
    text = "a long request that rambles on and on before the reply: thank you kindly"
    enc = data.encode_texts(bert, [text, "short"], max_length=8, keep="end")
    kept = bert.convert_ids_to_tokens(enc["input_ids"][0])
    assert kept[0] == "[CLS]" and kept[-1] == "[SEP]"
    assert kept[1:-1] == bert.tokenize(text)[-6:]
    assert list(enc["cut"]) == [True, False]


@pytest.mark.slow
def test_a_reward_function_beside_the_config_or_in_the_working_directory_is_found(tiny_run, tmp_path, monkeypatch,
                                                                                 capsys):
    from tests.test_bad_input import ppo_args

    beside, elsewhere = tmp_path / "configs", tmp_path / "work"
    beside.mkdir()
    elsewhere.mkdir()
    (beside / "ppo.yaml").write_text((TINY / "ppo.yaml").read_text())
    (beside / "myreward.py").write_text("def score(prompts, responses):\n    return [1.0] * len(responses)\n")
    (elsewhere / "cwdreward.py").write_text("def score(prompts, responses):\n    return [2.0] * len(responses)\n")
    monkeypatch.chdir(elsewhere)
    for function, score in (("myreward:score", 1.0), ("cwdreward:score", 2.0)):
        out = tmp_path / function.split(":")[0]
        args = [*ppo_args(tiny_run, out, "reward.model=null", f"reward.function={function}"), "--config",
                str(beside / "ppo.yaml")]
        assert cli.stage_main("ppo", args) == 0, capsys.readouterr().err
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["objective/scores"] == score
        recorded = json.loads((out / "config.json").read_text())["reward"]["function"]
        assert recorded.endswith(f"{function.split(':')[0]}.py:score") and recorded.startswith("/")
    assert cli.stage_main("ppo", [*ppo_args(tiny_run, tmp_path / "x", "reward.model=null",
                                            "reward.function=nowhere:score")]) == 2
    assert "looked for on the Python path, then as a .py file in the working directory and beside the config" \
        in capsys.readouterr().err
