"""Several EOS ids (Llama 3's configs list three): the sampler stops on whichever comes first,
as transformers' `generate` does, a checkpoint listing them loads, and every check of whether
a reply ended (missing-EOS penalty, reply trimming) counts each of them."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrlhf.config import SamplingSection
from jaxrlhf.errors import CheckpointError
from jaxrlhf.models import from_config, load_config, load_pretrained, save_pretrained
from jaxrlhf.rewards import penalise_missing_eos, replies_ended
from jaxrlhf.sampling import GenerateOutput, SamplingConfig, generate, process_logits
from jaxrlhf.stages.rollout import decode_responses, sampling_config
from tests.conftest import padded_batch
from tests.test_models_llama import CONFIGS, make_llama

pytestmark = pytest.mark.fast

PAD = 0


def cut_at_first(free_BxN: np.ndarray, eos_ids) -> tuple[np.ndarray, np.ndarray]:
    """Replies that never stopped, as they read had they stopped at the first of `eos_ids` ->
    (tokens, response mask)."""
    want, mask = np.full_like(free_BxN, PAD), np.zeros_like(free_BxN)
    for b, row in enumerate(free_BxN):
        hits = np.flatnonzero(np.isin(row, eos_ids))
        end = hits[0] + 1 if len(hits) else len(row)
        want[b, :end], mask[b, :end] = row[:end], 1
    return want, mask


def test_greedy_with_two_eos_ids_stops_at_either_and_equals_transformers(tmp_path):
    ref = make_llama(tmp_path, seed=3, **{**CONFIGS["gqa-untied"], "num_hidden_layers": 1})
    module, params, config = load_pretrained(tmp_path)
    ids, mask = padded_batch(config.vocab_size, lengths=[6, 3, 5], total=6, side="left", seed=1)
    n = 10

    def hf_greedy(**eos):
        with torch.no_grad():
            out = ref.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                               max_new_tokens=n, do_sample=False, pad_token_id=PAD, **eos)
        return out[:, 6:].numpy()

    free = hf_greedy(min_new_tokens=n, eos_token_id=None)
    # Row 0 stops on a token it emits midway; row 1 on another one, which row 0 does not emit before.
    a = int(free[0, 4])
    b = next(int(t) for t in free[1] if int(t) not in {a, *free[0, :5].tolist()})
    eos = (a, b)
    settings = SamplingConfig(max_new_tokens=n, pad_token_id=PAD, eos_token_id=eos, greedy=True)
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), settings)
    got = np.asarray(out.sequences[:, 6:])
    theirs = hf_greedy(eos_token_id=list(eos))
    np.testing.assert_array_equal(got[:, : theirs.shape[1]], theirs)
    want, want_mask = cut_at_first(free, eos)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(out.response_mask), want_mask)
    assert [row[m == 1][-1] for row, m in zip(got[:2], want_mask)] == [a, b]  # each id ended a reply


def test_sampled_generation_stops_at_the_first_of_either_eos_id():
    module, params, _ = from_config(dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=23,
                                         n_positions=32), jax.random.key(1))
    params = jax.tree.map(lambda x: x * 4.0, params)  # far from uniform: the EOS ids below are drawn often
    prompt = jnp.tile(jnp.arange(1, 4, dtype=jnp.int32), (32, 1))
    first_V = np.asarray(jax.jit(module.apply)({"params": params}, prompt[:1]).logits[0, -1])
    eos = tuple(int(t) for t in np.argsort(-first_V)[:2])
    settings = SamplingConfig(max_new_tokens=12, pad_token_id=PAD, eos_token_id=list(eos))
    out = generate(module, params, prompt, jnp.ones_like(prompt), jax.random.key(5), settings)
    got, got_mask = np.asarray(out.sequences[:, 3:]), np.asarray(out.response_mask)
    # Each reply is its tokens up to the first of either id: nothing after it but padding.
    real = np.where(got_mask == 1, got, -1)
    want, want_mask = cut_at_first(real, eos)
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_array_equal(got, np.where(want_mask == 1, want, PAD))
    assert {int(row[m == 1][-1]) for row, m in zip(got, got_mask) if m.sum() < 12} == set(eos)


def test_min_new_tokens_bans_every_eos_id():
    settings = SamplingConfig(max_new_tokens=4, pad_token_id=PAD, eos_token_id=(2, 5), min_new_tokens=2)
    logits = jnp.zeros((1, 8))
    banned = np.isinf(np.asarray(process_logits(logits, jnp.int32(1), settings)))[0]
    assert np.flatnonzero(banned).tolist() == [2, 5]
    assert not np.isinf(np.asarray(process_logits(logits, jnp.int32(2), settings))).any()


def write_checkpoint(path, model_type: str, eos, generation_eos=None):
    """A tiny random transformers checkpoint whose config.json says `eos_token_id: eos`, with a
    generation_config.json saying `generation_eos` only when that is given."""
    shape = ({"n_layer": 1, "n_head": 2, "n_embd": 8, "n_positions": 16} if model_type == "gpt2" else
             {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
              "max_position_embeddings": 16})
    config = transformers.AutoConfig.for_model(model_type, vocab_size=16, eos_token_id=eos, **shape)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    if generation_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_checkpoint_listing_eos_ids_loads_and_every_id_ends_a_reply(tmp_path, model_type):
    write_checkpoint(tmp_path, model_type, eos=[9, 11])
    config = load_pretrained(tmp_path)[2]
    assert config.eos_token_id == (9, 11)
    # The stages' settings: the tokenizer's EOS, then the checkpoint's.
    tokenizer = SimpleNamespace(eos_token_id=3, pad_token_id=PAD)
    settings = sampling_config(SamplingSection(max_prompt_tokens=2, max_new_tokens=3), tokenizer, config)
    assert settings.eos_ids == (3, 9, 11)
    # Prompt [5]; replies ended by 9, by 11, by 3; one cut at max_new_tokens; one with 11 only in its padding.
    sequences = np.array([[5, 4, 9, PAD], [5, 11, PAD, PAD], [5, 4, 4, 3], [5, 4, 4, 4], [5, 4, PAD, 11]])
    response_mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    rollout = GenerateOutput(sequences, np.ones_like(sequences), response_mask, None, None)
    np.testing.assert_array_equal(replies_ended(rollout, settings.eos_ids), [True, True, True, False, False])
    scores = penalise_missing_eos(np.ones(5, np.float32), rollout, settings.eos_ids, penalty=2.0)
    np.testing.assert_array_equal(scores, [1.0, 1.0, 1.0, -1.0, -1.0])
    # Replies are read without their closing EOS, whichever it is.
    words = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    assert decode_responses(words, rollout, settings.eos_ids) == ["4", "", "4 4", "4 4 4", "4"]


def test_generation_config_eos_ids_come_before_config_json_and_survive_the_export(tmp_path):
    """transformers' `generate` stops on generation_config.json's ids when the file sets them."""
    write_checkpoint(tmp_path / "in", "llama", eos=9, generation_eos=[9, 12])
    module, params, config = load_pretrained(tmp_path / "in")
    assert config.eos_token_id == (9, 12)
    save_pretrained(tmp_path / "out", module, params)
    # The export has no generation_config.json: transformers' generate reads its config.json's ids.
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").generation_config.eos_token_id == [9, 12]
    (tmp_path / "in" / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, "x"]}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: eos_token_id=\[9, 'x'\] must be a token id"):
        load_config(tmp_path / "in")


@pytest.mark.fast
def test_a_dpo_reference_listing_other_eos_ids_is_still_the_policys_architecture():
    """A hub reference whose generation_config.json lists more EOS ids than the policy's export
    scores the same token ids: DPO takes it; another width it refuses."""
    from jaxrlhf.models import GPT2Config
    from jaxrlhf.stages.dpo import architecture

    policy = GPT2Config.from_hf({"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "eos_token_id": 3})
    assert architecture(dataclasses.replace(policy, eos_token_id=(3, 9))) == architecture(policy)
    assert architecture(dataclasses.replace(policy, n_embd=64)) != architecture(policy)
