"""Our BERT and DistilBERT against transformers, base and sequence-classification heads.

Both number positions 0..T-1 whatever the padding (as transformers does), so with left
padding the outputs still match transformers', position for position."""

import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.models import load_pretrained
from tests.conftest import padded_batch, randomize, tiered


BERT = {
    "bert-gelu": dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=40),
    "bert-relu-eps-3types": dict(vocab_size=77, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=40, hidden_act="relu", layer_norm_eps=1e-5, type_vocab_size=3),
}
DISTILBERT = {
    "distil-gelu": dict(vocab_size=103, dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=40),
    "distil-relu": dict(vocab_size=59, dim=24, hidden_dim=72, n_layers=1, n_heads=3, activation="relu"),
}


def run_torch(model, ids, mask, **kw):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), **kw)


def check(ours, theirs, mask=None):
    ours, theirs = np.asarray(ours), theirs.numpy()
    if mask is not None:
        ours, theirs = ours[mask.astype(bool)], theirs[mask.astype(bool)]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", tiered(sorted(BERT), fast={"bert-gelu"}))
@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_base_matches_transformers(tmp_path, name, side):
    cfg = transformers.BertConfig(**BERT[name])
    ref = randomize(transformers.BertModel(cfg), seed=1)
    ref.save_pretrained(tmp_path)
    module, params, config = load_pretrained(tmp_path)
    ids, mask = padded_batch(cfg.vocab_size, lengths=[8, 3, 6], total=8, side=side)
    types = (np.arange(8)[None] >= 4).astype(np.int32).repeat(3, 0) * (cfg.type_vocab_size - 1)
    hidden, pooled = module.apply({"params": params}, ids, mask, types)
    out = run_torch(ref, ids, mask, token_type_ids=torch.tensor(types, dtype=torch.long))
    check(hidden, out.last_hidden_state, mask)
    check(pooled, out.pooler_output)


@pytest.mark.parametrize("name", tiered(sorted(BERT), fast={"bert-gelu"}))
@pytest.mark.parametrize("num_labels", [1, 3])
def test_bert_classifier_matches_transformers(tmp_path, name, num_labels):
    cfg = transformers.BertConfig(num_labels=num_labels, **BERT[name])
    ref = randomize(transformers.BertForSequenceClassification(cfg), seed=2)
    ref.save_pretrained(tmp_path)
    module, params, config = load_pretrained(tmp_path)
    assert config.num_labels == num_labels
    ids, mask = padded_batch(cfg.vocab_size, lengths=[5, 7, 2], total=7, side="right", seed=3)
    logits = module.apply({"params": params}, ids, mask)
    assert logits.shape == (3, num_labels)
    check(logits, run_torch(ref, ids, mask).logits)


@pytest.mark.parametrize("name", tiered(sorted(DISTILBERT), fast={"distil-gelu"}))
@pytest.mark.parametrize("side", ["right", "left"])
def test_distilbert_base_matches_transformers(tmp_path, name, side):
    cfg = transformers.DistilBertConfig(**DISTILBERT[name])
    ref = randomize(transformers.DistilBertModel(cfg), seed=4)
    ref.save_pretrained(tmp_path)
    module, params, _ = load_pretrained(tmp_path)
    ids, mask = padded_batch(cfg.vocab_size, lengths=[6, 2, 4], total=6, side=side, seed=5)
    check(module.apply({"params": params}, ids, mask), run_torch(ref, ids, mask).last_hidden_state, mask)


@pytest.mark.parametrize("name", tiered(sorted(DISTILBERT), fast={"distil-gelu"}))
@pytest.mark.parametrize("num_labels", [1, 2])
def test_distilbert_classifier_matches_transformers(tmp_path, name, num_labels):
    cfg = transformers.DistilBertConfig(num_labels=num_labels, **DISTILBERT[name])
    ref = randomize(transformers.DistilBertForSequenceClassification(cfg), seed=6)
    ref.save_pretrained(tmp_path)
    module, params, _ = load_pretrained(tmp_path)
    ids, mask = padded_batch(cfg.vocab_size, lengths=[3, 6], total=6, side="right", seed=7)
    check(module.apply({"params": params}, ids, mask), run_torch(ref, ids, mask).logits)


@pytest.mark.fast
def test_real_minilm_checkpoint_matches_transformers(minilm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    module, params, config = load_pretrained(minilm_dir)
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    texts = ["Could you please pass the salt?", "Give me that now.", "Thanks so much for your kind help!"]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    hidden, pooled = module.apply(
        {"params": params}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    )
    out = run_torch(
        ref, enc["input_ids"], enc["attention_mask"], token_type_ids=torch.tensor(enc["token_type_ids"])
    )
    check(hidden, out.last_hidden_state, enc["attention_mask"])
    check(pooled, out.pooler_output)


@pytest.mark.fast
def test_layer_norm_and_gelu_gradients_match_torch():
    """LayerNorm's hand-written gradient and the erf GELU's, against torch's autograd."""
    import jax

    from jaxrlhf.models.layers import ACTIVATIONS, layer_norm

    rng = np.random.default_rng(0)
    x = (3 + 4 * rng.normal(size=(3, 5, 16))).astype(np.float32)
    scale, bias = (1 + 0.3 * rng.normal(size=16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    ours = jax.vjp(lambda *a: ACTIVATIONS["gelu"](layer_norm(*a, 1e-5)), x, scale, bias)[1](g)
    tx, ts, tb = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
    torch.nn.functional.gelu(torch.nn.functional.layer_norm(tx, (16,), ts, tb, 1e-5)).backward(torch.tensor(g))
    for got, want in zip(ours, (tx.grad, ts.grad, tb.grad)):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)
