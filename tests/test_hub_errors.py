"""Every loading error says what is wrong and names the file, tensor or key."""

import json

import pytest
import transformers
from safetensors.numpy import load_file, save_file

from jaxrlhf.errors import CheckpointError, ConfigError, OutputError
from jaxrlhf.models import GPT2Config, load_pretrained, load_tokenizer, save_pretrained
from jaxrlhf.models.configs import BertConfig
from tests.test_hub import TINY_BERT, tiny_gpt2

pytestmark = pytest.mark.fast


@pytest.fixture
def gpt2_dir(tmp_path):
    tiny_gpt2(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*/nope does not exist"):
        load_pretrained(tmp_path / "nope")


def test_a_file_instead_of_a_directory(gpt2_dir):
    with pytest.raises(CheckpointError, match=r"config.json is a file; expected a checkpoint directory"):
        load_pretrained(gpt2_dir / "config.json")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty has no config.json"):
        load_pretrained(tmp_path / "empty")


def test_config_that_is_not_json(gpt2_dir):
    (gpt2_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_pretrained(gpt2_dir)


def test_unknown_model_type(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    (gpt2_dir / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(CheckpointError, match=r"model_type 'mamba' is not supported; jaxrlhf loads \['bert', 'distilbert', 'gpt2', 'llama'\]"):
        load_pretrained(gpt2_dir)


def test_bad_config_value_names_the_key_and_file(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    (gpt2_dir / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_mystery"}))
    with pytest.raises(ConfigError, match=r"config.json: activation_function='gelu_mystery' is not supported"):
        load_pretrained(gpt2_dir)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(n_embd=30, n_head=4), r"n_embd=30 must be a multiple of n_head=4"),
        (dict(n_layer="2"), r"n_layer='2' must be int"),
        (dict(n_inner=2.5), r"n_inner=2.5 must be int or null"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GPT2Config(**overrides)


def test_unsupported_bert_variant():
    with pytest.raises(ConfigError, match=r"position_embedding_type='relative_key' is not supported"):
        BertConfig(position_embedding_type="relative_key")


def test_no_weights_file(gpt2_dir):
    (gpt2_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no weights: expected model.safetensors.*found: \['config.json'"):
        load_pretrained(gpt2_dir)


def test_corrupted_safetensors(gpt2_dir):
    (gpt2_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        load_pretrained(gpt2_dir)


def test_corrupted_torch_pickle(gpt2_dir):
    (gpt2_dir / "model.safetensors").unlink()
    (gpt2_dir / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin could not be loaded with torch weights_only=True"):
        load_pretrained(gpt2_dir)


def test_missing_shard(tmp_path):
    tiny_gpt2(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard .*{shard.name} named in .*index.json is missing"):
        load_pretrained(tmp_path)


def test_missing_tensor_is_named(gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, gpt2_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) the model needs are not in the checkpoint, e.g. transformer.h.1.mlp.c_fc.weight"):
        load_pretrained(gpt2_dir)


def test_wrong_shape_is_named_with_both_shapes(gpt2_dir):
    config = json.loads((gpt2_dir / "config.json").read_text())
    (gpt2_dir / "config.json").write_text(json.dumps({**config, "n_positions": 64}))
    with pytest.raises(CheckpointError, match=r"tensor transformer.wpe.weight in .*model.safetensors has shape \(32, 32\); .* expects \(64, 32\)"):
        load_pretrained(gpt2_dir)


def test_head_that_the_family_does_not_have(gpt2_dir):
    with pytest.raises(CheckpointError, match=r"head='classification' is not available for gpt2; choose one of \['base', 'lm'\]"):
        load_pretrained(gpt2_dir, head="classification")


def test_tokenizer_larger_than_the_vocab(tmp_path, minilm_dir):
    transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained(tmp_path)
    _, _, config = load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"the tokenizer has 30522 tokens but the model's vocab_size is 64"):
        load_tokenizer(minilm_dir, config)
    module, params, _ = load_pretrained(tmp_path)
    tokenizer = load_tokenizer(minilm_dir)
    with pytest.raises(CheckpointError, match=r"save_pretrained: the tokenizer has 30522 tokens"):
        save_pretrained(tmp_path / "export", module, params, tokenizer=tokenizer)
    assert not (tmp_path / "export").exists()


def test_saving_over_a_file_keeps_the_file(gpt2_dir, tmp_path):
    module, params, _ = load_pretrained(gpt2_dir)
    (tmp_path / "taken").write_text("precious")
    with pytest.raises(OutputError, match=r"taken already exists and holds a file; .* pass --overwrite"):
        save_pretrained(tmp_path / "taken", module, params)
    assert (tmp_path / "taken").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "taken"]


class _Exploit:
    """Unpickling this runs code: what a malicious pytorch_model.bin would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_torch_pickle_is_refused_without_running_it(gpt2_dir, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    (gpt2_dir / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _Exploit(marker)}, gpt2_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin could not be loaded with torch weights_only=True"):
        load_pretrained(gpt2_dir)
    assert not marker.exists()
