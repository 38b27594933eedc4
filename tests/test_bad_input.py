"""Bad input, as a careful user would hit it: each case exits with one line that names the
culprit, and leaves no output behind."""

import json
import re
import shutil
from pathlib import Path

import pytest

from jaxrlhf import cli
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def sft_args(tiny_run, out, *extra):
    data = tiny_run / "data"
    return ["--config", str(TINY / "sft.yaml"), "model_config.n_embd=32", "model_config.n_layer=1", "train.steps=2",
            f"tokenizer={data / 'tokenizers' / 'gpt2'}", f"data.path={data / 'sft.jsonl'}",
            f"train.output_dir={out}", *extra]


def ppo_args(tiny_run, out, *extra):
    return ["--config", str(TINY / "ppo.yaml"), f"policy={tiny_run / 'sft' / 'final'}",
            f"reward.model={tiny_run / 'reward' / 'final'}", f"prompts.path={tiny_run / 'data' / 'prompts.jsonl'}",
            "train.steps=1", "train.batch_size=8", "ppo.num_minibatches=1", f"train.output_dir={out}", *extra]


def group_args(stage):
    """Arguments of a small RLOO or GRPO run (`stage`) on the tiny run's models: 2 prompts x 4 samples."""

    def args(tiny_run, out, *extra):
        return ["--config", str(TINY / f"{stage}.yaml"), f"policy={tiny_run / 'sft' / 'final'}",
                f"reward.model={tiny_run / 'reward' / 'final'}", f"prompts.path={tiny_run / 'data' / 'prompts.jsonl'}",
                "train.steps=1", "train.batch_size=8", f"{stage}.num_minibatches=1", f"train.output_dir={out}", *extra]

    return args


rloo_args, grpo_args = group_args("rloo"), group_args("grpo")


def reward_args(tiny_run, out, *extra):
    data = tiny_run / "data"
    return ["--config", str(TINY / "reward.yaml"), "model_config.hidden_size=32", "model_config.num_hidden_layers=1",
            "train.steps=2", f"tokenizer={data / 'tokenizers' / 'bert'}", f"data.path={data / 'reward.jsonl'}",
            f"train.output_dir={out}", *extra]


def preferences_args(tiny_run, out, *extra):
    return ["--config", str(TINY / "preferences.yaml"), f"policy={tiny_run / 'sft' / 'final'}",
            f"reward.model={tiny_run / 'reward' / 'final'}", f"prompts.path={tiny_run / 'data' / 'prompts.jsonl'}",
            "prompts.max_rows=8", "sampling.max_new_tokens=4", f"output={out}", *extra]


def evaluate_args(tiny_run, out, *extra, policies=("sft",), best_of=None):
    """An evaluation of `policies` (stage names in the tiny run, or paths) and the `best_of`
    entries ({name: {best_of, policy, scorer}}) against the SFT policy."""
    sft = tiny_run / "sft" / "final"
    config = {"policies": {**{Path(p).name: str(tiny_run / p / "final" if "/" not in p else p) for p in policies},
                           **(best_of or {})},
              "reference": str(sft), "prompts": {"path": str(tiny_run / "data" / "eval_prompts.jsonl")},
              "scorers": {"judge": {"function": "jaxrlhf.tasks.politeness:score_responses"}}, "output_dir": str(out),
              "batch_size": 16, "sampling": {"max_new_tokens": 8, "max_prompt_tokens": 16}}
    path = out.parent / "evaluate.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return ["--config", str(path), *extra]


def online_dpo_args(tiny_run, out, *extra):
    return ["--config", str(TINY / "online_dpo.yaml"), f"policy={tiny_run / 'sft' / 'final'}",
            f"reward.model={tiny_run / 'reward' / 'final'}", f"prompts.path={tiny_run / 'data' / 'prompts.jsonl'}",
            "train.steps=1", "train.batch_size=8", f"train.output_dir={out}", *extra]


def frontier_args(tiny_run, out, method):
    """A frontier of one `method` sweep (a dict) over the tiny run, evaluated as `evaluate_args`."""
    evaluate = evaluate_args(tiny_run, out)[1]
    path = out.parent / "frontier.yaml"
    path.write_text(json.dumps({"evaluate": evaluate, "output_dir": str(out), "methods": {"m": method}}))
    return ["--config", str(path)]


def write(path, text):
    path.write_text(text)
    return path


def rows(path, *lines):
    """A JSONL file of these rows (dicts, or raw lines as they would be typed)."""
    return write(path, "".join((line if isinstance(line, str) else json.dumps(line)) + chr(10) for line in lines))


def latin1(path):
    """Rows saved in Latin-1, as a spreadsheet might: the é of the second row is byte 0xe9."""
    path.write_bytes('{"prompt": "a", "response": "b"}\n{"prompt": "café", "response": "b"}\n'.encode("latin-1"))
    return path


def labelled(path, bad):
    """Reward rows whose third row's label is `bad` (a raw JSON value, or None to leave it out)."""
    third = '{"text": "c"' + ("" if bad is None else f', "label": {bad}') + "}"
    return rows(path, {"text": "a", "label": 0.5}, {"text": "b", "label": -0.5}, third)


def policy_without_tokenizer(tiny_run, where):
    where.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / "sft" / "final" / name, where / name)
    return where


def policy_with_bert_tokenizer(tiny_run, where):
    policy_without_tokenizer(tiny_run, where)
    for f in (tiny_run / "data" / "tokenizers" / "bert").iterdir():
        shutil.copy(f, where / f.name)
    return where


def reward_model_without_pad(tiny_run, where):
    """The tiny reward model with its tokenizer saved without a pad token (nor an EOS)."""
    shutil.copytree(tiny_run / "reward" / "final", where)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (where / name).is_file():
            saved = json.loads((where / name).read_text())
            saved.pop("pad_token", None)
            (where / name).write_text(json.dumps(saved))
    return where


def corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    (dst / "model.safetensors").write_bytes(b"\x00not safetensors at all")
    return dst


# (name, stage, args(tiny_run, tmp_path, out), expected message regex)
CASES = [
    ("missing data file", "sft", lambda r, t, o: sft_args(r, o, f"data.path={t / 'nope.jsonl'}"),
     r"data file .*nope.jsonl does not exist"),
    ("malformed JSONL row", "sft", lambda r, t, o: sft_args(
        r, o, f"data.path={write(t / 'bad.jsonl', json.dumps({'prompt': 'a', 'response': 'b'}) + chr(10) + '{oops' + chr(10))}"),
     r"bad.jsonl:2: malformed JSON line"),
    ("JSONL row not an object", "sft", lambda r, t, o: sft_args(r, o, f"data.path={write(t / 'list.jsonl', '[1, 2]' + chr(10))}"),
     r"list.jsonl:1: each line must be a JSON object, not list"),
    ("unreadable data file", "sft", lambda r, t, o: sft_args(r, o, f"data.path={write(t / 'bin.parquet', 'not parquet')}"),
     r"cannot read data file .*bin.parquet"),
    ("missing column", "sft", lambda r, t, o: sft_args(r, o, f"data.path={r / 'data' / 'prompts.jsonl'}"),
     r"prompts.jsonl: column\(s\) \['response'\] not found; it has \['prompt'\]"),
    ("empty dataset", "sft", lambda r, t, o: sft_args(r, o, f"data.path={r / 'data' / 'sft.jsonl'}", "data.skip_rows=100000"),
     r"sft.jsonl: no rows to use \(it has 400; skip_rows=100000\)"),
    ("prompt longer than the context", "sft", lambda r, t, o: sft_args(r, o, "max_length=8", "data.skip_rows=2"),
     r"sft.jsonl: row 3: the prompt has \d+ tokens, leaving no room for a response within max_length=8"),
    ("preference pair's prompt longer than the context", "dpo", lambda r, t, o: [
        "--config", str(TINY / "dpo.yaml"), f"policy={r / 'sft' / 'final'}", f"data.path={r / 'pairs.jsonl'}",
        "max_length=4", f"train.output_dir={o}"],
     r"pairs.jsonl: row 1: the prompt has \d+ tokens, leaving no room for a response within max_length=4"),
    ("max_length over the model's context", "sft", lambda r, t, o: sft_args(r, o, "max_length=100"),
     r"max_length=100 exceeds the model's context \(n_positions=64\)"),
    ("response budget over the context", "ppo", lambda r, t, o: ppo_args(r, o, "sampling.max_new_tokens=60"),
     r"sampling.max_prompt_tokens=16 \+ sampling.max_new_tokens=60 exceeds the model's context \(n_positions=64\)"),
    ("Llama with scaled rotary positions", "sft",
     lambda r, t, o: sft_args(r, o, "model_config.model_type=llama",
                              "model_config.rope_parameters={rope_type: linear, rope_theta: 10000.0, factor: 2.0}"),
     r"model_config: rope_type='linear' is not supported; only the unscaled 'default' rotary embedding is"),
    ("Llama query heads that do not group over the key/value heads", "sft",
     lambda r, t, o: sft_args(r, o, "model_config.model_type=llama", "model_config.hidden_size=32",
                              "model_config.num_attention_heads=4", "model_config.num_key_value_heads=3"),
     r"model_config: num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    ("max_length over a Llama's context", "sft",
     lambda r, t, o: sft_args(r, o, "model_config.model_type=llama", "model_config.hidden_size=32",
                              "model_config.intermediate_size=32", "model_config.num_hidden_layers=1",
                              "model_config.num_attention_heads=4", "model_config.max_position_embeddings=32"),
     r"max_length=48 exceeds the model's context \(max_position_embeddings=32\)"),
    ("tokenizer larger than the model's vocab", "sft", lambda r, t, o: sft_args(r, o, "model_config.vocab_size=100"),
     r"the tokenizer has \d+ tokens but the model's vocab_size is 100"),
    ("unknown config key", "sft", lambda r, t, o: sft_args(r, o, "train.lerning_rate=0.1"),
     r"unknown key 'lerning_rate'; did you mean 'learning_rate'\?"),
    ("key of an older version", "sft", lambda r, t, o: sft_args(r, o, "train.devices=2"),
     r"\.train: key 'devices' was removed; the devices are train\.mesh\.data .* and train\.mesh\.fsdp"),
    ("wrong type", "sft", lambda r, t, o: sft_args(r, o, "train.batch_size=lots"),
     r"train.batch_size='lots' must be int"),
    ("out-of-range value", "sft", lambda r, t, o: sft_args(r, o, "train.learning_rate=-1"),
     r"learning_rate=-1.0 must be > 0"),
    ("not a choice", "sft", lambda r, t, o: sft_args(r, o, "train.schedule=exponential"),
     r"train.schedule='exponential' is not allowed; choose one of \['constant', 'linear', 'cosine'\]"),
    # The mesh (train.mesh, 4 fake devices here) and how every update's rows split over it.
    ("batch not divisible by the devices", "sft", lambda r, t, o: sft_args(r, o, "train.batch_size=6", "train.mesh.data=4"),
     r"train.batch_size = 6 row\(s\) do not split over 4 device\(s\) \(mesh data=4 x fsdp=1\); it must be a multiple of 4"),
    ("PPO minibatch of no rows on a device", "ppo", lambda r, t, o: ppo_args(r, o, "ppo.num_minibatches=8", "train.mesh.data=2"),
     r"train.batch_size / ppo.num_minibatches \(8 / 8\) = 1 row\(s\) do not split over 2 device\(s\) .*multiple of 2"),
    ("microbatches not dividing each device's rows", "sft", lambda r, t, o: sft_args(
        r, o, "train.batch_size=8", "train.mesh.data=4", "train.grad_accum_steps=4"),
     r"train.batch_size = 8 row\(s\) do not split over 4 device\(s\) in 4 microbatches each .*multiple of 16"),
    ("more devices than there are", "sft", lambda r, t, o: sft_args(r, o, "train.batch_size=16", "train.mesh.data=8"),
     r"mesh data=8 x fsdp=1 = 8 device\(s\), but this run has 4 \(4 in each of 1 process\(es\)\); use at most that many"),
    ("fsdp not dividing the devices", "sft", lambda r, t, o: sft_args(r, o, "train.batch_size=12", "train.mesh.fsdp=3"),
     r"mesh fsdp=3 does not divide the 4 device\(s\) of this run"),
    ("preference samples not dividing the devices", "preferences", lambda r, t, o: preferences_args(
        r, o, "batch_size=3", "samples_per_prompt=2"),
     r"batch_size x samples_per_prompt \(3 x 2\) = 6 row\(s\) do not split over 4 device\(s\)"),
    ("--coordinator without --multihost", "sft", lambda r, t, o: [*sft_args(r, o), "--coordinator", "localhost:1234"],
     r"--coordinator is for multi-process runs; add --multihost"),
    ("corrupted safetensors", "ppo", lambda r, t, o: ppo_args(r, o, f"policy={corrupt_copy(r / 'sft' / 'final', t / 'bad')}"),
     r"bad/model.safetensors is not a readable safetensors file"),
    ("missing checkpoint directory", "ppo", lambda r, t, o: ppo_args(r, o, f"policy={t / 'missing'}"),
     r"checkpoint directory .*missing does not exist"),
    ("output folder of a user's files", "sft", lambda r, t, o: sft_args(r, o, f"train.output_dir={write(t / 'notes.txt', 'x').parent}"),
     r"output_dir .* holds files but no jaxrlhf run \(.*notes.txt.*\); choose an empty or new folder"),
    ("output folder not writable", "sft", lambda r, t, o: sft_args(r, o, f"train.output_dir={write(t / 'file', 'x')}/run"),
     r"output_dir .*file/run is not writable"),
    ("missing config file", "sft", lambda r, t, o: ["--config", str(t / "none.yaml")],
     r"cannot read config file .*none.yaml"),
    ("invalid YAML", "sft", lambda r, t, o: ["--config", str(write(t / "bad.yaml", "train: [unclosed"))],
     r"bad.yaml:1: not valid YAML \(expected ',' or '\]', but got '<stream end>'\)"),
    ("a YAML python tag is not code", "sft", lambda r, t, o: ["--config", str(write(t / "tag.yaml", "data: !!python/object/apply:os.system ['echo hacked']"))],
     r"tag.yaml:1: not valid YAML \(could not determine a constructor for the tag"),
    ("missing required key", "sft", lambda r, t, o: ["--config", str(write(t / "empty.yaml", "max_length: 32"))],
     r"empty.yaml: missing required key\(s\) \['data'\]"),
    ("override without =", "sft", lambda r, t, o: sft_args(r, o, "train.steps"),
     r"override 'train.steps' must look like key=value"),
    ("model and model_config both", "sft", lambda r, t, o: sft_args(r, o, f"model={r / 'sft' / 'final'}"),
     r"give exactly one of model .* or model_config"),
    ("reward label the model lacks", "ppo", lambda r, t, o: ppo_args(r, o, "reward.label=POSITIVE"),
     r"reward label 'POSITIVE' is not one of .*\['LABEL_0'\]"),
    ("policy folder as the reward model", "ppo", lambda r, t, o: ppo_args(r, o, f"reward.model={r / 'sft' / 'final'}"),
     r"^error: reward\.model=\S+/sft/final: head='classification' is not available for gpt2"),
    ("reward function that does not import", "ppo", lambda r, t, o: ppo_args(r, o, "reward.model=null", "reward.function=nowhere:f"),
     r"reward function 'nowhere:f' cannot be imported"),
    ("reward function that raises", "ppo", lambda r, t, o: ppo_args(r, o, "reward.model=null", "reward.function=tests.test_stages:raises"),
     r"reward function tests.test_stages:raises raised ZeroDivisionError"),
    ("reward function with the wrong length", "ppo", lambda r, t, o: ppo_args(r, o, "reward.model=null", "reward.function=tests.test_stages:wrong_length"),
     r"reward function tests.test_stages:wrong_length returned 1 scores for 8 responses"),
    ("reward function returning text", "ppo", lambda r, t, o: ppo_args(r, o, "reward.model=null", "reward.function=tests.test_stages:words"),
     r"reward function tests.test_stages:words returned a str 'good' for response 1 \(counted from 1\); it must return one number per response"),
    ("reward function returning a dict", "ppo", lambda r, t, o: ppo_args(r, o, "reward.model=null", "reward.function=tests.test_stages:a_dict"),
     r"reward function tests.test_stages:a_dict returned a dict \{'score': .*; it must return one number per response"),
    ("reward function returning None", "ppo", lambda r, t, o: ppo_args(r, o, "reward.model=null",
                                                                        "reward.function=tests.test_stages:nothing"),
     r"reward function tests.test_stages:nothing returned None; it must return one number per response"),
    ("PPO sampling that is off-policy", "ppo", lambda r, t, o: ppo_args(r, o, "sampling.top_k=5", "sampling.min_new_tokens=2"),
     r"sampling.top_k, sampling.min_new_tokens would make PPO off-policy: the update scores .* under the tempered softmax"),
    # Each row of a data file is checked before anything is written: the error names the row and the column.
    ("label that is text", "reward", lambda r, t, o: reward_args(r, o, f"data.path={labelled(t / 'l.jsonl', chr(34) + 'high' + chr(34))}"),
     r"l.jsonl: row 3, column 'label': expected a finite number, got 'high'"),
    ("null label", "reward", lambda r, t, o: reward_args(r, o, f"data.path={labelled(t / 'l.jsonl', 'null')}"),
     r"l.jsonl: row 3, column 'label': expected a finite number, got nothing \(a missing or null value\)"),
    ("row without a label", "reward", lambda r, t, o: reward_args(r, o, f"data.path={labelled(t / 'l.jsonl', None)}"),
     r"l.jsonl: row 3, column 'label': expected a finite number, got nothing"),
    ("NaN label", "reward", lambda r, t, o: reward_args(r, o, f"data.path={labelled(t / 'l.jsonl', 'NaN')}"),
     r"l.jsonl: row 3, column 'label': expected a finite number, got nan"),
    ("infinite label", "reward", lambda r, t, o: reward_args(r, o, f"data.path={labelled(t / 'l.jsonl', '-Infinity')}"),
     r"l.jsonl: row 3, column 'label': expected a finite number, got -inf"),
    ("mapped column with a number for text", "sft", lambda r, t, o: sft_args(r, o, "data.columns={response: reply}", f"data.path={rows(t / 's.jsonl', {'prompt': 'a', 'reply': 'b'}, {'prompt': 'c', 'reply': 7})}"),
     r"s.jsonl: row 2, column 'reply': expected text, got 7"),
    ("null text", "sft", lambda r, t, o: sft_args(r, o, f"data.path={rows(t / 's.jsonl', {'prompt': 'a', 'response': 'b'}, {'prompt': None, 'response': 'd'})}"),
     r"s.jsonl: row 2, column 'prompt': expected text, got nothing"),
    ("data file that is not UTF-8", "sft", lambda r, t, o: sft_args(r, o, f"data.path={latin1(t / 's.jsonl')}"),
     r"s.jsonl:2: not UTF-8 text \(byte 0xe9\)"),
    ("data path that is a folder", "sft", lambda r, t, o: sft_args(r, o, f"data.path={r / 'data'}"),
     r"data file .*data is a folder; name a .json, .jsonl, .csv or .parquet file"),
    ("empty data file", "sft", lambda r, t, o: sft_args(r, o, f"data.path={write(t / 'empty.jsonl', '')}"),
     r"data file .*empty.jsonl is empty"),
    ("malformed JSON file", "sft", lambda r, t, o: sft_args(r, o, f"data.path={write(t / 'cut.json', '[{' + chr(34) + 'prompt')}"),
     r"cannot read data file .*cut.json: ValueError: Unmatched"),
    ("batch larger than the data", "sft", lambda r, t, o: sft_args(r, o, "train.batch_size=4", f"data.path={rows(t / 's.jsonl', {'prompt': 'a', 'response': 'b'})}"),
     r"batch_size=4 is larger than the 1 rows of data"),
    ("policy folder without a tokenizer", "ppo", lambda r, t, o: ppo_args(r, o, f"policy={policy_without_tokenizer(r, t / 'bare')}"),
     r"bare holds no tokenizer \(none of tokenizer.json, .*\)"),
    ("policy with another model's tokenizer", "ppo", lambda r, t, o: ppo_args(r, o, f"policy={policy_with_bert_tokenizer(r, t / 'mixed')}"),
     r"the tokenizer of .*mixed has no EOS token, so replies could never end"),
    ("RLOO batch that is not whole groups", "rloo", lambda r, t, o: rloo_args(r, o, "train.batch_size=10"),
     r"train.batch_size=10 must be a multiple of rloo.num_generations=4: each step samples 4 responses"),
    ("RLOO with one sample per prompt", "rloo", lambda r, t, o: rloo_args(r, o, "rloo.num_generations=1"),
     r"num_generations=1 must be at least 2: the leave-one-out baseline"),
    ("GRPO with one sample per prompt", "grpo", lambda r, t, o: grpo_args(r, o, "grpo.num_generations=1"),
     r"num_generations=1 must be at least 2"),
    ("GRPO sampling that is off-policy", "grpo", lambda r, t, o: grpo_args(r, o, "sampling.top_p=0.9"),
     r"sampling.top_p would make GRPO off-policy: the update scores .* under the tempered softmax"),
    ("RLOO temperature unlike the sampler's", "rloo", lambda r, t, o: rloo_args(r, o, "sampling.temperature=0.7"),
     r"rloo.temperature=1.0 must equal sampling.temperature=0.7"),
    ("GRPO loss type that does not exist", "grpo", lambda r, t, o: grpo_args(r, o, "grpo.loss_type=dapo2"),
     r"grpo.loss_type='dapo2' is not allowed; choose one of \['grpo', 'dr_grpo', 'dapo', 'bnpo'\]"),
    ("GRPO minibatch of no rows on a device", "grpo", lambda r, t, o: grpo_args(r, o, "grpo.num_minibatches=8", "train.mesh.data=2"),
     r"train.batch_size / grpo.num_minibatches \(8 / 8\) = 1 row\(s\) do not split over 2 device\(s\)"),
    ("GRPO with more prompts per step than the file holds", "grpo", lambda r, t, o: grpo_args(r, o, "prompts.max_rows=1"),
     r"train.batch_size=8 / grpo.num_generations=4 = 2 prompts per step, more than the 1 prompts of"),
    ("RLOO with a negative KL coefficient", "rloo", lambda r, t, o: rloo_args(r, o, "rloo.beta=-0.1"),
     r"rloo: beta=-0.1 must be >= 0"),
    ("evaluation's last policy missing", "evaluate", lambda r, t, o: evaluate_args(r, o, policies=("sft", str(t / "gone"))),
     r"checkpoint directory .*gone does not exist"),
    ("pad_token that is not a token", "sft", lambda r, t, o: sft_args(r, o, "pad_token=<nope>"),
     r"pad_token='<nope>' is not a token of the tokenizer of .*gpt2; name one of its tokens"),
    ("reward model tokenizer without a pad token", "ppo", lambda r, t, o: ppo_args(r, o, f"reward.model={reward_model_without_pad(r, t / 'rm')}"),
     r"the tokenizer of .*rm has no pad token and no EOS to pad with; set the reward source's pad_token to one"),
    ("eval_rows leaving no rows to train on", "reward", lambda r, t, o: reward_args(r, o, "eval_rows=400"),
     r"eval_rows=400 leaves no training rows of the 400 in .*reward.jsonl"),
    ("online DPO pairs not splitting over the devices", "online_dpo", lambda r, t, o: online_dpo_args(
        r, o, "train.batch_size=6", "train.mesh.data=4"),
     r"train.batch_size = 6 row\(s\) do not split over 4 device\(s\)"),
    ("online DPO with a loss that needs no samples' reference", "online_dpo", lambda r, t, o: online_dpo_args(
        r, o, "loss_type=slic"),
     r"loss_type='slic' is not allowed; choose one of \['sigmoid', 'ipo', 'hinge'\]"),
    ("online DPO beta of zero", "online_dpo", lambda r, t, o: online_dpo_args(r, o, "beta=0"),
     r"beta=0.0 must be > 0"),
    ("best-of-N over a policy the evaluation lacks", "evaluate", lambda r, t, o: evaluate_args(
        r, o, best_of={"bon": {"best_of": 4, "policy": "spt", "scorer": "judge"}}),
     r"policies.bon.policy='spt' is not a checkpoint entry of policies; choose one of \['sft'\]"),
    ("best-of-N by an unknown scorer", "evaluate", lambda r, t, o: evaluate_args(
        r, o, best_of={"bon": {"best_of": 4, "policy": "sft", "scorer": "rm"}}),
     r"policies.bon.scorer='rm' is not one of scorers \['judge'\]"),
    ("best-of-0", "evaluate", lambda r, t, o: evaluate_args(
        r, o, best_of={"bon": {"best_of": 0, "policy": "sft", "scorer": "judge"}}),
     r"policies.bon: best_of=0 must be at least 1"),
    ("frontier knob that is no key of its stage", "frontier", lambda r, t, o: frontier_args(r, o, {
        "stage": "ppo", "config": ppo_args(r, o)[1], "knob": "ppo.kl_cof", "values": [0.1]}),
     r"methods.m at ppo.kl_cof=0.1: .*unknown key 'kl_cof'; did you mean 'kl_coef'\?"),
    ("frontier method of a stage that trains nothing", "frontier", lambda r, t, o: frontier_args(r, o, {
        "stage": "preferences", "config": preferences_args(r, o)[1], "knob": "min_margin", "values": [0.1]}),
     r"methods.m.stage='preferences' trains no policy; choose a training stage"),
    ("evaluation into the folder of a policy", "evaluate", lambda r, t, o: evaluate_args(r, o, f"output_dir={r / 'sft'}"),
     r"output_dir .*sft overlaps .*sft/final, which this run reads from"),
]


@pytest.mark.parametrize("name,stage,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_no_output(tiny_run, tmp_path, capsys, name, stage, args, message):
    out = tmp_path / "out"
    assert cli.stage_main(stage, args(tiny_run, tmp_path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    # Not even an empty folder: found before any work, or (a reward function, judged only by
    # calling it on the first rollout) at the first step, whose run folder is then removed.
    assert not out.exists(), sorted(out.rglob("*"))


def test_resuming_with_another_architecture_is_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.stage_main("sft", sft_args(tiny_run, out, "train.save_every=1")) == 0
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert cli.stage_main("sft", [*sft_args(tiny_run, out, "model_config.n_embd=64"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changes model_config.n_embd (32 -> 64)" in err[0], err


def test_a_frontier_report_folder_of_user_files_is_refused_saying_what_to_do(tiny_run, tmp_path, capsys):
    out = tmp_path / "frontier"
    (out / "report").mkdir(parents=True)
    (out / "report" / "notes.txt").write_text("mine")
    args = frontier_args(tiny_run, out, {"stage": "ppo", "config": ppo_args(tiny_run, out)[1], "knob": "ppo.kl_coef",
                                         "values": [0.1]})
    assert cli.stage_main("frontier", args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out / 'report'} already exists and holds files jaxrlhf did not write (notes.txt); move it "
                   "aside, or choose another output_dir (the frontier replaces only its own report)"]
    assert (out / "report" / "notes.txt").read_text() == "mine"


def test_a_malformed_pipeline_entry_is_named_as_the_plan_counts_stages(tmp_path, capsys):
    stages = f"stages:\n  - {{stage: sft, config: {TINY / 'sft.yaml'}}}\n  - {{stage: dpo, cfg: dpo.yaml}}\n"
    path = write(tmp_path / "pipeline.yaml", stages)
    assert cli.pipeline_main(["--config", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path}: stage 2 (counted from 1) must be {{stage: NAME, config: FILE, overrides: [...]}}"]
