"""The evaluation across tokenizers, sampling settings, batch sizes and devices: each policy reads
prompts in its own tokens; a KL between different vocabularies, or a best-of-N too large to
sample, is refused before anything runs; a KL the sampler does not estimate is reported n/a;
a prompt's reply does not depend on the batch or the devices; a policy's results are kept
once it is done, whatever happens to the next."""

import json
import re
import shutil

import pytest
import transformers

from jaxrlhf import best_of_n, cli
from tests.conftest import randomize
from tests.test_bad_input import evaluate_args


def altered_tokenizer(src, dst, change):
    """`dst` holding the tokenizer files of `src`, its tokenizer.json changed by `change(dict)`."""
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)
    spec = json.loads((src / "tokenizer.json").read_text())
    change(spec)
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst


def swap_two_ids(spec):
    """Two tokens trade ids: the same size and tokens, another vocabulary."""
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]


def lowercase(spec):
    """The same vocabulary, but prompts are lowercased before they are split."""
    spec["normalizer"] = {"type": "Lowercase"}


@pytest.fixture(scope="module")
def policies(tiny_data, tmp_path_factory):
    """Tiny random checkpoints on the tiny data's GPT-2-style tokenizer: a GPT-2 (the
    reference), a Llama with the same vocabulary and a Llama whose tokenizer has two ids
    swapped -> {name: folder}."""
    tokenizer = tiny_data / "data" / "tokenizers" / "gpt2"
    work = tmp_path_factory.mktemp("policies")
    shape = {"vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0}
    gpt2 = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, **shape)
    llama = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, max_position_embeddings=64, **shape)
    out = {}
    for name, model, change in (("gpt2", transformers.GPT2LMHeadModel(gpt2), None),
                                ("llama", transformers.LlamaForCausalLM(llama), None),
                                ("llama_other_vocab", transformers.LlamaForCausalLM(llama), swap_two_ids)):
        randomize(model, seed=len(out)).save_pretrained(work / name)
        altered_tokenizer(tokenizer, work / name, change or (lambda spec: None))
        out[name] = work / name
    return out


def args(tiny_data, out, policies, reference, *extra, best_of=None):
    """An evaluation of `policies` ({name: folder}) and `best_of` entries against `reference`."""
    config = {"policies": {**{n: str(p) for n, p in policies.items()}, **(best_of or {})}, "reference": str(reference),
              "prompts": {"path": str(tiny_data / "data" / "eval_prompts.jsonl")},
              "scorers": {"judge": {"function": "jaxrlhf.tasks.politeness:score_responses"}}, "output_dir": str(out),
              "batch_size": 16, "sampling": {"max_new_tokens": 8, "max_prompt_tokens": 16}}
    path = out.parent / "evaluate.yaml"
    path.write_text(json.dumps(config))
    return ["--config", str(path), *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.fast
def test_a_kl_between_different_vocabularies_is_refused_at_the_dry_run_naming_both(tiny_data, policies, tmp_path,
                                                                                 capsys):
    """A Llama policy whose tokenizer is as large as the GPT-2 reference's but maps two ids the
    other way round: the reference would score its ids as other tokens."""
    out = tmp_path / "eval"
    assert cli.stage_main("evaluate", args(tiny_data, out, {"llama": policies["llama_other_vocab"]},
                                           policies["gpt2"], "--dry-run")) == 2
    line = one_error_line(capsys)
    assert (f"policies.llama ({policies['llama_other_vocab']}) and the reference ({policies['gpt2']}) have different "
            "tokenizers") in line, line
    assert not out.exists()


@pytest.mark.fast
def test_a_best_of_n_too_large_to_sample_is_refused_at_the_dry_run(tiny_data, policies, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(best_of_n, "device_memory", lambda mesh: 16 << 30)  # a 16 GiB device, whatever this host has
    out = tmp_path / "eval"
    bon = {"bon": {"best_of": 1_000_000, "policy": "ref", "scorer": "judge"}}
    assert cli.stage_main("evaluate", args(tiny_data, out, {"ref": policies["gpt2"]}, policies["gpt2"], "--dry-run",
                                           best_of=bon)) == 2
    line = one_error_line(capsys)
    assert re.search(r"policies.bon: best_of=1000000 x batch_size=16 = 16000000 rows of 24 tokens need at least "
                     r"27.1 GiB a device to sample .* more than its 16.0 GiB; lower best_of or batch_size", line), line
    assert not out.exists()


@pytest.mark.fast
def test_a_llama_policy_is_evaluated_in_its_own_tokens_and_top_k_reports_no_kl(tiny_data, policies, tmp_path):
    """A Llama policy and a GPT-2 reference sharing a vocabulary are evaluated together. With
    top-k sampling, the summed log ratio of the tempered softmaxes estimates no KL: it is n/a in
    every output, the other columns as usual."""
    out = tmp_path / "eval"
    assert cli.stage_main("evaluate", args(tiny_data, out, {"ref": policies["gpt2"], "llama": policies["llama"]},
                                           policies["gpt2"], "sampling.top_k=5")) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["ref", "llama"] and all(r["kl_to_reference"] is None for r in results.values())
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 32 and {(r["kl_to_reference"], r["kl_estimator"]) for r in replies} == {(None, None)}
    md = (out / "results.md").read_text()
    assert "kl_to_reference is n/a: with sampling.top_k set, the replies are not drawn from the tempered softmax" in md
    assert md.count("| n/a |") == 2


@pytest.mark.slow
def test_replies_follow_the_prompt_not_the_batch_and_a_failed_policy_keeps_the_finished_ones(tiny_run, tmp_path,
                                                                                            capsys):
    """The SFT policy's replies at batch size 6 on 2 devices are the tiny pipeline's own
    evaluation's (batch size 16 on 4). A policy whose tokenizer lowercases reads its prompts in
    its own tokens. The last policy's weights are cut short: the run stops with one line, and
    the folder holds the first two policies' results, marked partial."""
    sft = tiny_run / "sft" / "final"
    lower, broken = tmp_path / "lower", tmp_path / "broken"
    shutil.copytree(sft, broken)
    (broken / "model.safetensors").write_bytes((sft / "model.safetensors").read_bytes()[:100])
    shutil.copytree(sft, lower)
    altered_tokenizer(sft, lower, lowercase)
    out = tmp_path / "eval"
    run = evaluate_args(tiny_run, out, "batch_size=6", "mesh.data=2", policies=("sft", str(lower), str(broken)))
    assert cli.stage_main("evaluate", run) == 2
    assert re.search(r"broken/model.safetensors is not a readable safetensors file", one_error_line(capsys))

    def replies(folder, policy):
        return [(r["prompt"], r["reply"]) for line in (folder / "replies.jsonl").read_text().splitlines()
                for r in [json.loads(line)] if r["policy"] == policy]

    pipeline = replies(tiny_run / "eval", "sft")
    assert len(pipeline) == 16 and replies(out, "sft") == pipeline
    full = [json.loads(line)["prompt"] for line in (tiny_run / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    seen = [p for p, _ in replies(out, "lower")]
    assert all(p == p.lower() and f.lower().endswith(p) for p, f in zip(seen, full))
    assert seen != [p for p, _ in pipeline]
    assert list(json.loads((out / "results.json").read_text())) == ["sft", "lower"]
    assert "Partial: broken not evaluated (yet)" in (out / "results.md").read_text()
    assert not (out / "rewards.png").exists()  # drawn once every policy is done
