"""PEFT-format LoRA adapters against peft itself: ours load in `PeftModel.from_pretrained` onto
the transformers model exported from our params with the logits of our merged params; PEFT's
load here with the logits PEFT computes; a save/load round trip is exact; a bad folder is one
line naming it and the key."""

import json
import shutil

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from jaxrlhf.errors import CheckpointError, ConfigError
from jaxrlhf.models import load_pretrained, lora, save_pretrained
from jaxrlhf.models.peft import load_adapter, load_modules_to_save, save_adapter
from jaxrlhf.stages.common import save_lora_adapter
from tests.conftest import padded_batch, randomize, tiered

# family -> (transformers class, config, LoRA targets as PEFT spells them)
MODELS = {
    "gpt2": (transformers.GPT2LMHeadModel,
             transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=32,
                                     bos_token_id=96, eos_token_id=96),
             ["c_attn", "c_proj", "c_fc"]),
    "llama": (transformers.LlamaForCausalLM,
              transformers.LlamaConfig(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=97, max_position_embeddings=64),
              ["q_proj", "v_proj", "o_proj", "down_proj"]),
    "bert": (transformers.BertForSequenceClassification,
             transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, num_labels=1),
             ["query", "value", "dense"]),  # "dense": the attention output, FFN and pooler projections
    "distilbert": (transformers.DistilBertForSequenceClassification,
                   transformers.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=40, n_layers=2, n_heads=2,
                                                 num_labels=2),
                   ["q_lin", "v_lin", "lin1"]),
}
TASK = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS", "distilbert": "SEQ_CLS"}
# Our module names where they differ from the HF ones PEFT's targets name.
FLAX_NAMES = {"dense": ("attn_out", "ffn_in", "ffn_out", "pooler"), "q_lin": ("query",), "v_lin": ("value",),
              "lin1": ("ffn_in",)}
# A sequence classifier's heads PEFT saves whole ("classifier" also selects DistilBERT's pre_classifier).
HEADS = {"bert": ["classifier"], "distilbert": ["classifier", "pre_classifier"]}
IDS, MASK = padded_batch(64, lengths=[7, 7], total=7, side="right", seed=5)
RANK, ALPHA = 4, 12.0


def exported_base(tmp_path, family):
    """(our module, our params, the transformers model of our export of them)."""
    cls, config, _ = MODELS[family]
    randomize(cls(config), seed=1).save_pretrained(tmp_path / "hf")
    module, params, _ = load_pretrained(tmp_path / "hf")
    save_pretrained(tmp_path / "base", module, params)
    return module, params, cls.from_pretrained(tmp_path / "base").eval()


def random_adapters(params, family, seed=0):
    """Non-zero lora_a [in, r] and lora_b [r, out] on every kernel the family's PEFT targets
    select (matched on our module's last name, through FLAX_NAMES where it differs from HF's)."""
    wanted = {n for t in MODELS[family][2] for n in FLAX_NAMES.get(t, (t,))}
    rng = np.random.default_rng(seed)
    out = {}
    for path, kernel in flatten_dict(params).items():
        if path[-1] == "kernel" and path[-2] in wanted:
            out[path[:-1] + ("lora_a",)] = rng.normal(0, 0.2, (kernel.shape[0], RANK)).astype(np.float32)
            out[path[:-1] + ("lora_b",)] = rng.normal(0, 0.2, (RANK, kernel.shape[1])).astype(np.float32)
    return unflatten_dict(out)


def merged(params, adapters, scale, heads=None):
    """kernel + scale * lora_a @ lora_b at every adapted module, and whole-saved heads over it."""
    flat = {**flatten_dict(params), **flatten_dict(heads or {})}
    for path, value in flatten_dict(adapters).items():
        if path[-1] == "lora_a":
            module = path[:-1]
            b = flatten_dict(adapters)[module + ("lora_b",)]
            flat[module + ("kernel",)] = np.asarray(flat[module + ("kernel",)]) + scale * np.asarray(value) @ b
    return unflatten_dict(flat)


def our_logits(module, params):
    out = jax.jit(module.apply)({"params": params}, IDS, MASK)  # jitted: one compile, not one per op
    return np.asarray(getattr(out, "logits", out))


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK)).logits.numpy()


def settings(family, targets=None):
    return {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": targets or MODELS[family][2]}


@pytest.mark.parametrize("family", tiered(sorted(MODELS), fast={"gpt2"}))
def test_our_adapter_loads_in_peft_with_the_logits_of_our_merged_params(tmp_path, family):
    module, params, base = exported_base(tmp_path, family)
    adapters = random_adapters(params, family)
    # Saved as a stage saves its trained leaves: a reward model's heads (moved off the base's)
    # whole, as PEFT's modules_to_save.
    trained = lora.trainable(params, adapters)
    heads = jax.tree.map(lambda x: np.asarray(x) + 0.3, trained["heads"])
    assert sorted(heads) == HEADS.get(family, [])
    save_lora_adapter(tmp_path / "adapter", {**trained, "heads": heads}, settings(family), family, tmp_path / "base")
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    want = torch_logits(tuned)
    np.testing.assert_allclose(our_logits(module, merged(params, adapters, ALPHA / RANK, heads)), want,
                               atol=1e-5, rtol=1e-5)
    assert np.abs(our_logits(module, params) - want).max() > 1e-2  # the adapter changed them
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2") and config["task_type"] == TASK[family]


@pytest.mark.parametrize("family", tiered(sorted(MODELS), fast={"llama"}))
def test_a_peft_adapter_loads_with_the_logits_peft_computes(tmp_path, family):
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": "all-linear", "bert": ["query", "key"],
               "distilbert": ["k_lin", "out_lin", "lin2"]}[family]
    module, params, base = exported_base(tmp_path, family)
    torch.manual_seed(0)
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                                      task_type=TASK[family], init_lora_weights=False)).eval()
    with torch.no_grad():  # the heads PEFT trains whole, moved off the base's
        for m in HEADS.get(family, []):
            getattr(tuned.base_model.model, m).modules_to_save["default"].weight.add_(0.3)
    tuned.save_pretrained(tmp_path / "theirs")
    adapters, got = load_adapter(tmp_path / "theirs", params, family)
    heads = load_modules_to_save(tmp_path / "theirs", params, family)
    assert set(flatten_dict(heads)) == {(m, leaf) for m in HEADS.get(family, []) for leaf in ("kernel", "bias")}
    # PEFT saves "all-linear" as the module paths it chose; they come back as names. It saves
    # every list from a set: in no fixed order.
    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert {**got, "targets": sorted(got["targets"])} == {
        "rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": names if targets == "all-linear" else sorted(targets)}
    np.testing.assert_allclose(our_logits(module, merged(params, adapters, ALPHA / RANK, heads)), torch_logits(tuned),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.fast
def test_save_then_load_is_exact(tmp_path):
    _, params, _ = exported_base(tmp_path, "bert")
    adapters = random_adapters(params, "bert", seed=3)
    heads = {"classifier": {k: np.asarray(v) - 0.5 for k, v in params["classifier"].items()}}
    save_adapter(tmp_path / "a", adapters, settings("bert"), "bert", "some/base", modules_to_save=heads)
    got, got_settings = load_adapter(tmp_path / "a", params, "bert")
    assert got_settings == settings("bert")
    for tree, want in ((got, adapters), (load_modules_to_save(tmp_path / "a", params, "bert"), heads)):
        flat = flatten_dict(tree)
        assert flat.keys() == flatten_dict(want).keys()
        for path, value in flatten_dict(want).items():
            assert flat[path].dtype == np.float32 and np.array_equal(flat[path], value), path
    # Saved again over itself (an earlier adapter), "all-linear" is written as the modules adapted.
    save_adapter(tmp_path / "a", adapters, settings("bert", "all-linear"), "bert", "some/base")
    assert load_adapter(tmp_path / "a", params, "bert")[1]["targets"] == ["dense", "query", "value"]


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
BAD = {
    "no folder": (lambda f: shutil.rmtree(f), "does not exist", ""),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "has no adapter_config.json", ""),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors", ""),
    "not LoRA": (lambda f: _edit_config(f, peft_type="IA3"), "peft_type 'IA3' is not supported", "adapter_config"),
    "r of 0": (lambda f: _edit_config(f, r=0), "r must be a positive integer, got 0", "adapter_config"),
    "rslora": (lambda f: _edit_config(f, use_rslora=True), "use_rslora=True is not supported", "adapter_config"),
    "dora": (lambda f: _edit_config(f, use_dora=True), "use_dora=True is not supported", "adapter_config"),
    "PiSSA": (lambda f: _edit_config(f, init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'",
              "adapter_config"),
    "rank pattern": (lambda f: _edit_config(f, rank_pattern={"c_fc": 8}), "rank_pattern=", "adapter_config"),
    "another family's targets": (lambda f: _edit_config(f, target_modules=["q_proj", "c_attn"]),
                                 "target_modules 'q_proj' names no linear module of this gpt2 model", "adapter_config"),
    "a module we lack": (lambda f: _edit_tensors(f, lambda t: t.update({A.replace("h.0", "h.7"): t.pop(A)})),
                         "transformer.h.7.attn.c_attn, which this gpt2 model lacks", "safetensors"),
    "wrong rank": (lambda f: _edit_config(f, r=8), f"{A} has shape (4, 32); with r=8 this gpt2 model needs (8, 32)",
                   "safetensors"),
    "transposed": (lambda f: _edit_tensors(f, lambda t: t.update({A: np.ascontiguousarray(t[A].T)})),
                   f"{A} has shape (32, 4)", "safetensors"),
    "half a pair": (lambda f: _edit_tensors(f, lambda t: t.pop(A)), f"{A} is missing", "safetensors"),
}


@pytest.fixture(scope="module")
def gpt2_params(tmp_path_factory):
    cls, config, _ = MODELS["gpt2"]
    folder = tmp_path_factory.mktemp("gpt2")
    cls(config).save_pretrained(folder)  # loaded through transformers' init: nothing to compile
    return load_pretrained(folder)[1]


@pytest.mark.fast
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_adapter_folder_is_one_line_naming_it(tmp_path, gpt2_params, case):
    folder = save_adapter(tmp_path / "adapter", random_adapters(gpt2_params, "gpt2"), settings("gpt2"), "gpt2", None)
    break_it, message, file = BAD[case]
    break_it(folder)
    with pytest.raises(CheckpointError) as info:
        load_adapter(folder, gpt2_params, "gpt2")
    text = str(info.value)
    assert "\n" not in text and message in text and str(folder) in text and file in text, text


@pytest.mark.fast
def test_save_refuses_adapters_that_do_not_fit_their_settings(tmp_path, gpt2_params):
    adapters = random_adapters(gpt2_params, "gpt2")
    with pytest.raises(ConfigError, match=r"^adapters at transformer/h_0/attn/c_attn: expected lora_a \[in, 8\]"):
        save_adapter(tmp_path / "a", adapters, {**settings("gpt2"), "rank": 8}, "gpt2", None)
    with pytest.raises(ConfigError, match=r"\(transformer\.h\.0\.attn\.c_proj\) are not among the targets"):
        save_adapter(tmp_path / "a", adapters, settings("gpt2", ["c_attn", "c_fc"]), "gpt2", None)
    with pytest.raises(ConfigError, match=r"^adapter settings: targets must be 'all-linear' or a list"):
        save_adapter(tmp_path / "a", adapters, settings("gpt2", r".*c_attn"), "gpt2", None)
    assert not (tmp_path / "a").exists()
