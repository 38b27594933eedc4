"""Loading and saving Hugging Face layouts: round trips, shards, torch pickles, the offline cache."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxrlhf.errors import OutputError
from jaxrlhf.models import load_pretrained, load_tokenizer, save_pretrained
from jaxrlhf.outputs import MARK
from tests.conftest import padded_batch, randomize

TINY_GPT2 = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=32, bos_token_id=96, eos_token_id=96)
TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2(path, **save_kw):
    model = randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2)), seed=0)
    model.save_pretrained(path, **save_kw)
    return model


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


def our_logits(path, ids, mask, **kw):
    module, params, _ = load_pretrained(path, **kw)
    out = module.apply({"params": params}, ids, mask)
    return np.asarray(getattr(out, "logits", out))


IDS, MASK = padded_batch(64, lengths=[6, 4], total=6, side="right", seed=11)


@pytest.mark.fast
@pytest.mark.parametrize(
    "hf_cls,config",
    [
        (transformers.GPT2LMHeadModel, transformers.GPT2Config(**TINY_GPT2)),
        (transformers.BertForSequenceClassification, transformers.BertConfig(num_labels=1, **TINY_BERT)),
        (transformers.DistilBertForSequenceClassification,
         transformers.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=40, n_layers=2, n_heads=2, num_labels=2)),
    ],
    ids=["gpt2-lm", "bert-regression", "distilbert-classifier"],
)
def test_round_trip_through_save_pretrained(tmp_path, hf_cls, config):
    randomize(hf_cls(config), seed=3).save_pretrained(tmp_path / "orig")
    module, params, _ = load_pretrained(tmp_path / "orig")
    save_pretrained(tmp_path / "ours", module, params)
    reloaded, info = hf_cls.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours, want = our_logits(tmp_path / "orig", IDS, MASK), torch_logits(reloaded.eval(), IDS, MASK)
    if ours.ndim == 3:  # per-token logits: pad positions are don't-care (GPT-2 numbers them differently)
        ours, want = ours[MASK == 1], want[MASK == 1]
    np.testing.assert_allclose(ours, want, atol=1e-4)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [hf_cls.__name__]


@pytest.mark.fast
def test_value_head_survives_a_round_trip_and_transformers_ignores_it(tmp_path):
    tiny_gpt2(tmp_path / "orig")
    with pytest.warns(UserWarning, match=r"v_head\.summary\.weight"):
        module, params, _ = load_pretrained(tmp_path / "orig", value_head=True)
    params = jax.tree.map(lambda x: x + 0.01, params)  # a trained value head is non-zero
    save_pretrained(tmp_path / "ours", module, params)
    out = module.apply({"params": params}, IDS, MASK)
    module2, params2, _ = load_pretrained(tmp_path / "ours", value_head=True)
    np.testing.assert_allclose(np.asarray(module2.apply({"params": params2}, IDS, MASK).values), np.asarray(out.values))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    real = MASK == 1
    np.testing.assert_allclose(torch_logits(reloaded, IDS, MASK)[real], np.asarray(out.logits)[real], atol=1e-4)


@pytest.mark.fast
def test_sharded_safetensors(tmp_path):
    ref = tiny_gpt2(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    np.testing.assert_allclose(our_logits(tmp_path, IDS, MASK)[MASK == 1], torch_logits(ref, IDS, MASK)[MASK == 1], atol=1e-4)


@pytest.mark.fast
def test_pytorch_bin_through_weights_only(tmp_path):
    ref = tiny_gpt2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    np.testing.assert_allclose(our_logits(tmp_path, IDS, MASK)[MASK == 1], torch_logits(ref, IDS, MASK)[MASK == 1], atol=1e-4)


@pytest.mark.fast
def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    ref = tiny_gpt2(tmp_path)
    ref.to(torch.bfloat16).save_pretrained(tmp_path)
    _, params, _ = load_pretrained(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    want = torch_logits(ref.float(), IDS, MASK)
    np.testing.assert_allclose(our_logits(tmp_path, IDS, MASK)[MASK == 1], want[MASK == 1], atol=1e-4)


@pytest.mark.fast
def test_legacy_gamma_beta_layer_norm_names(tmp_path):
    ref = randomize(transformers.BertModel(transformers.BertConfig(**TINY_BERT)), seed=5)
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    module, params, _ = load_pretrained(tmp_path)
    hidden, _ = module.apply({"params": params}, IDS, MASK)
    with torch.no_grad():
        want = ref(torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK)).last_hidden_state
    np.testing.assert_allclose(np.asarray(hidden)[MASK == 1], want.numpy()[MASK == 1], atol=1e-4)


@pytest.mark.slow
def test_base_checkpoint_gets_a_fresh_regression_head_with_a_warning(minilm_dir):
    with pytest.warns(UserWarning, match=r"classifier\.weight"):
        module, params, config = load_pretrained(minilm_dir, head="classification", num_labels=1)
    assert config.num_labels == 1 and params["classifier"]["kernel"].shape == (384, 1)
    assert module.apply({"params": params}, IDS, MASK).shape == (2, 1)


@pytest.mark.fast
def test_tokenizer_is_saved_beside_the_model(tmp_path, minilm_dir):
    module, params, config = load_pretrained(minilm_dir)
    tokenizer = load_tokenizer(minilm_dir, config)
    save_pretrained(tmp_path / "export", module, params, tokenizer=tokenizer)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert again("please help")["input_ids"] == tokenizer("please help")["input_ids"]


@pytest.mark.fast
def test_save_replaces_an_earlier_export_whole_and_nothing_else(tmp_path):
    tiny_gpt2(tmp_path / "orig")
    module, params, _ = load_pretrained(tmp_path / "orig")
    save_pretrained(tmp_path / "out", module, params)
    save_pretrained(tmp_path / "out", module, params)  # its own earlier export: replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARK, "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "out" / "notes.txt").write_text("added to the export by its user")
    with pytest.raises(OutputError, match=r"out already exists and holds files jaxrlhf did not write"):
        save_pretrained(tmp_path / "out", module, params)
    assert (tmp_path / "out" / "notes.txt").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's notes")
    with pytest.raises(OutputError, match=r"mine already exists and holds files jaxrlhf did not write \(notes.txt\)"):
        save_pretrained(tmp_path / "mine", module, params)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    save_pretrained(tmp_path / "mine", module, params, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == [MARK, "config.json", "model.safetensors"]


def make_hub_cache(cache: Path, repo_id: str, files_from: Path) -> None:
    """The layout huggingface_hub writes: blobs behind snapshots/<commit>, refs/main -> commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


@pytest.mark.fast
def test_hub_name_resolves_from_an_offline_cache(tmp_path):
    ref = tiny_gpt2(tmp_path / "files")
    make_hub_cache(tmp_path / "hub", "some-org/tiny-gpt2", tmp_path / "files")
    np.save(tmp_path / "ids.npy", IDS)
    np.save(tmp_path / "mask.npy", MASK)
    script = textwrap.dedent(f"""
        import numpy as np
        from jaxrlhf.errors import CheckpointError
        from jaxrlhf.models import load_pretrained
        module, params, _ = load_pretrained("some-org/tiny-gpt2")
        ids, mask = np.load("{tmp_path}/ids.npy"), np.load("{tmp_path}/mask.npy")
        np.save("{tmp_path}/out.npy", np.asarray(module.apply({{"params": params}}, ids, mask).logits))
        try:
            load_pretrained("some-org/not-cached")
        except CheckpointError as e:
            print("ERROR:", e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ERROR: some-org/not-cached is neither a local directory nor a model found" in result.stdout
    want = torch_logits(ref, IDS, MASK)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy")[MASK == 1], want[MASK == 1], atol=1e-4)
