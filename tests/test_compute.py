"""The `compute` section: block rematerialisation (same params, same gradients), bfloat16
compute with float32 training state and bfloat16 frozen params, and the section's keys."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import config as cfg
from jaxrlhf.errors import ConfigError
from jaxrlhf.models import from_config, frozen_params, save_pretrained
from tests.conftest import tiered

VOCAB = 64
MODELS = {  # one block: enough to rematerialise
    "gpt2": dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64),
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "bert": dict(model_type="bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, num_labels=1),
    "distilbert": dict(model_type="distilbert", vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                       max_position_embeddings=64, num_labels=1),
}
HEADS = {"gpt2": "lm", "llama": "lm", "bert": "classification", "distilbert": "classification"}


def batch(rows=3, t=10):
    """Random ids `[B, T]` with right padding of various lengths."""
    rng = np.random.default_rng(0)
    mask = (np.arange(t)[None] < np.array([t, 7, 5])[:rows, None]).astype(np.int32)
    return jnp.asarray(rng.integers(0, VOCAB, (rows, t)), jnp.int32), jnp.asarray(mask)


@functools.cache
def tiny(family: str):
    """A fresh float32 model of `family` -> (module, params, config): built once per module."""
    return from_config(MODELS[family], jax.random.key(0), head=HEADS[family])


def output(module, params, ids, mask):
    out = module.apply({"params": params}, ids, mask)
    return out if isinstance(out, jax.Array) else out.logits


@pytest.mark.parametrize("family", tiered(list(MODELS), fast=("gpt2",)))
def test_remat_gives_the_same_params_and_gradients(family):
    ids, mask = batch()
    plain, params, _ = tiny(family)
    rematted = plain.clone(remat=True)
    # One param tree (names, shapes): a checkpoint loads either way.
    init = jax.eval_shape(rematted.init, jax.random.key(0), ids[:1, :1])["params"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), init) == jax.tree.map(lambda x: (x.shape, x.dtype), params)

    def loss(module):
        def weighted(p):  # every output its own weight, so no gradient hides behind a symmetry
            y = output(module, p, ids, mask)
            return jnp.sum(jnp.tanh(y) * jnp.linspace(-1.0, 2.0, y.size).reshape(y.shape))
        return weighted

    # The rematerialised gradient is a checkpointed program (not the plain one under another name)...
    assert "remat" in str(jax.make_jaxpr(jax.grad(loss(rematted)))(params))
    assert "remat" not in str(jax.make_jaxpr(jax.grad(loss(plain)))(params))
    # ... with the plain program's gradient (one compile for both).
    g, g_remat = jax.jit(lambda p: (jax.grad(loss(plain))(p), jax.grad(loss(rematted))(p)))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", tiered(["gpt2", "llama", "bert"], fast=("gpt2",)))
def test_bfloat16_frozen_params_compute_what_their_float32_originals_do(family):
    """Every layer rounds its params to the compute dtype where it uses them (LayerNorm too),
    so a frozen copy stored in bfloat16 scores exactly what the trained float32 params would: a
    reference starts at KL 0 from the policy."""
    ids, mask = batch()
    module, params, _ = tiny(family)
    module = module.clone(dtype=jnp.dtype(jnp.bfloat16))
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)  # LN != 1
    stored = frozen_params(params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
    out, out_stored = jax.jit(lambda a, b: (output(module, a, ids, mask), output(module, b, ids, mask)))(params, stored)
    np.testing.assert_array_equal(np.asarray(out_stored), np.asarray(out))
    assert out.dtype == jnp.float32  # logits (and a classifier's scores) stay float32


@pytest.mark.fast
def test_the_compute_section_loads_and_refuses_what_it_does_not_know():
    from jaxrlhf.evaluate import EvaluateConfig
    from jaxrlhf.stages.grpo import GRPOStageConfig
    from jaxrlhf.stages.preferences import PreferencesConfig
    from jaxrlhf.stages.sft import SFTConfig

    grpo = cfg.load(GRPOStageConfig, "configs/tiny/grpo.yaml", ["compute.dtype=bfloat16", "compute.remat=block"])
    assert grpo.compute == cfg.ComputeConfig(dtype="bfloat16", remat="block")
    assert cfg.load(SFTConfig, "configs/tiny/sft.yaml").compute == cfg.ComputeConfig("float32", "none")
    with pytest.raises(ConfigError, match=r"compute.dtype='bf16' is not allowed; choose one of \['float32', "
                                          r"'bfloat16'\]"):
        cfg.load(SFTConfig, "configs/tiny/sft.yaml", ["compute.dtype=bf16"])
    with pytest.raises(ConfigError, match=r"compute: unknown key 'dtyp'; did you mean 'dtype'\?"):
        cfg.load(SFTConfig, "configs/tiny/sft.yaml", ["compute.dtyp=bfloat16"])
    # Nothing is trained in these: a remat setting would be silently meaningless, so it is refused.
    for cls, name, stage in ((EvaluateConfig, "evaluate", "evaluation"), (PreferencesConfig, "preferences", "preferences")):
        assert cfg.load(cls, f"configs/tiny/{name}.yaml", ["compute.dtype=bfloat16"]).compute.dtype == "bfloat16"
        with pytest.raises(ConfigError, match=rf"compute.remat='block' does nothing in {stage}, which trains nothing"):
            cfg.load(cls, f"configs/tiny/{name}.yaml", ["compute.remat=block"])


@pytest.mark.fast
def test_a_resume_may_switch_remat_but_not_the_compute_dtype(tmp_path):
    from jaxrlhf.errors import JaxRLHFError
    from jaxrlhf.stages import common

    saved = {"_stage": "sft", "_working_dir": str(tmp_path), "compute": {"dtype": "float32", "remat": "none"}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    common._check_same_run(tmp_path, saved, {**saved, "compute": {"dtype": "float32", "remat": "block"}})
    with pytest.raises(JaxRLHFError, match=r"this config changes compute.dtype \('float32' -> 'bfloat16'\)"):
        common._check_same_run(tmp_path, saved, {**saved, "compute": {"dtype": "bfloat16", "remat": "none"}})
    # A run written before the compute section existed computed in float32 without remat.
    older = {k: v for k, v in saved.items() if k != "compute"}
    common._check_same_run(tmp_path, older, saved)
    with pytest.raises(JaxRLHFError, match=r"compute.dtype \('float32' -> 'bfloat16'\)"):
        common._check_same_run(tmp_path, older, {**saved, "compute": {"dtype": "bfloat16", "remat": "none"}})


class Stop(Exception):
    """Raised where the stage would compile its update: its start is all a test needs."""


@pytest.mark.fast
def test_a_bfloat16_stage_trains_float32_params_against_bfloat16_frozen_models(tiny_data, tmp_path, monkeypatch):
    """PPO's start under compute.dtype=bfloat16, remat=block, from the stage's own setup code
    (stopped where the update would be compiled): the policy, value head and optimizer state
    float32; the reference and the reward model stored in bfloat16; every model computing in it."""
    import inspect

    from jaxrlhf.models import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                                load_tokenizer)
    from jaxrlhf.stages import ppo, rollout

    tokenizers = tiny_data / "data" / "tokenizers"
    policy = GPT2LMHeadModel(GPT2Config.from_hf({**MODELS["gpt2"], "vocab_size": 1024, "eos_token_id": 0}),
                             value_head=True)  # saved with one, so no fresh head is compiled to start it
    scorer = BertForSequenceClassification(BertConfig.from_hf({**MODELS["bert"], "vocab_size": 512}))
    for name, module, tokenizer in (("policy", policy, "gpt2"), ("reward", scorer, "bert")):
        shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        params = jax.tree.map(lambda x: np.random.default_rng(0).normal(0, 0.02, x.shape).astype(np.float32), shapes)
        save_pretrained(tmp_path / name, module, params, tokenizer=load_tokenizer(tokenizers / tokenizer))
    config = cfg.load(ppo.PPOStageConfig, "configs/tiny/ppo.yaml", [
        f"policy={tmp_path / 'policy'}", f"reward.model={tmp_path / 'reward'}",
        f"prompts.path={tiny_data / 'data' / 'prompts.jsonl'}", f"train.output_dir={tmp_path / 'ppo'}",
        "train.batch_size=16", "sampling.max_new_tokens=8", "compute.dtype=bfloat16", "compute.remat=block"])
    started, scorers = [], []
    real_scorer = rollout.make_scorer
    monkeypatch.setattr(rollout, "make_scorer", lambda *a, **k: scorers.append(real_scorer(*a, **k)) or scorers[-1])

    def stop(make_update, mesh, state):
        started.append(state)
        raise Stop

    monkeypatch.setattr(ppo, "data_parallel", stop)
    with pytest.raises(Stop):
        ppo.run(config)
    state, (scorer,) = started[0], scorers

    def dtypes(tree):
        return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}

    assert "v_head" in state.params and dtypes(state.params) == {"float32"}
    assert dtypes(state.opt_state) == {"float32"}
    assert dtypes(state.ref_params) == {"bfloat16"}
    # The reference holds the policy's values (rounded): the same model, half the bytes.
    np.testing.assert_array_equal(np.asarray(state.ref_params["transformer"]["wte"]["embedding"]),
                                  np.asarray(state.params["transformer"]["wte"]["embedding"].astype(jnp.bfloat16)))
    policy = state.apply_fn.__self__
    assert policy.dtype == jnp.bfloat16 and policy.remat
    [(_, model_score)] = scorer.parts.values()  # the one source: (weight, its scorer)
    closure = inspect.getclosurevars(model_score).nonlocals
    assert dtypes(closure["params"]) == {"bfloat16"}
