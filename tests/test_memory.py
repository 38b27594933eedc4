"""What `train.grad_accum_steps` bounds: the compiled rollout updates' temporaries (XLA's
`memory_analysis()`, compile only, no weights) fall with the number of microbatches when the
rollout's logits dominate, because every pass that scores the whole rollout runs in chunks no
larger than a loss microbatch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import losses, parallel
from jaxrlhf.models.hub import from_config
from jaxrlhf.updates import GRPOConfig, PPOConfig, TrainState, make_grpo_update, make_ppo_update
from jaxrlhf.updates.common import response_outputs, score_responses
from tests.test_steps import policy, rollout_batch

# A vocabulary far wider than the model: one rollout's float32 logits (16 x 64 x 16384 x 4 B =
# 64 MiB) outweigh everything else the update holds.
LOGITS_DOMINATE = dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=16384, n_positions=128,
                       bos_token_id=1, eos_token_id=2)


def abstract_update(kind: str, hf_config: dict, rows: int, prompt: int, response: int, grad_accum_steps: int):
    """-> (update, state, batch, key) for GRPO (2 epochs, beta 0.04) or PPO, as shapes only."""
    made = {}

    def init(key):
        made["module"], params, _ = from_config(hf_config, key, value_head=kind == "ppo")
        return params

    params = jax.eval_shape(init, jax.random.key(0))
    state = jax.eval_shape(lambda p: TrainState.create(made["module"], p, optax.adam(1e-5), ref_params=p,
                                                       kl_coef=jnp.float32(0.05),
                                                       grad_accum_steps=grad_accum_steps), params)
    update = make_grpo_update(GRPOConfig(num_generations=8, epochs=2, beta=0.04)) if kind == "grpo" else \
        make_ppo_update(PPOConfig(epochs=2))
    length = prompt + response
    batch = {"sequences": jax.ShapeDtypeStruct((rows, length), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((rows, length), jnp.int32),
             "response_mask": jax.ShapeDtypeStruct((rows, response), jnp.int32),
             "scores": jax.ShapeDtypeStruct((rows,), jnp.float32)}
    return update, state, batch, jax.eval_shape(lambda: jax.random.key(0))


def temp_bytes(kind: str, hf_config: dict, rows: int, prompt: int, response: int, grad_accum_steps: int) -> int:
    """The compiled update's temporary bytes (what it allocates beyond its arguments and outputs)."""
    update, state, batch, key = abstract_update(kind, hf_config, rows, prompt, response, grad_accum_steps)
    return jax.jit(update).lower(state, batch, key).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_eight_microbatches_hold_at_most_two_fifths_of_the_temporaries_of_one(kind):
    """16 rollouts of 16 + 48 tokens: at grad_accum_steps=8 the scoring passes (old logprobs,
    reference logprobs, PPO's values and entropy) hold 2 rows' logits at a time, as the loss does."""
    one, eight = (temp_bytes(kind, LOGITS_DOMINATE, 16, 16, 48, k) for k in (1, 8))
    assert eight <= 0.4 * one, f"{kind}: {eight / 2**20:.1f} MiB at 8 microbatches vs {one / 2**20:.1f} MiB at 1"


@pytest.mark.fast
def test_the_rollout_scored_in_chunks_is_the_rollout_scored_at_once():
    """Logprobs, values and entropy of 8 rollouts in 1, 2, 4 and 8 chunks (num_minibatches x
    grad_accum_steps) are the unchunked pass's, row for row; on a mesh of 4 devices each
    device scores its own rows in every chunk, so the compiled pass moves no rows between them."""
    module, params, _ = policy(value_head=True)
    batch = rollout_batch()
    seq, attn, n, t = batch["sequences"], batch["attention_mask"], batch["response_mask"].shape[1], 0.7
    logits, logprobs, values = response_outputs(module.apply, params, seq, attn, n, t)
    whole = {"logprobs": logprobs, "values": values, "entropy": losses.entropy(logits, t)}

    def scoring(minibatches):
        return jax.jit(lambda state, seq, attn: score_responses(state, state.params, seq, attn, n, t, minibatches,
                                                                entropy=True))

    for minibatches, k in ((1, 1), (1, 2), (1, 4), (2, 4)):
        state = TrainState.create(module, params, optax.sgd(0.1), grad_accum_steps=k)
        got = scoring(minibatches)(state, seq, attn)
        for name in whole:
            np.testing.assert_allclose(got[name], whole[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} in {k} chunks")
    mesh = parallel.make_mesh(4, 1)
    state = parallel.put_state(TrainState.create(module, params, optax.sgd(0.1), grad_accum_steps=2), mesh)
    rows = parallel.put_rows((seq, attn), mesh)
    with jax.set_mesh(mesh):
        compiled = scoring(1).lower(state, *rows).compile()
        got = compiled(state, *rows)
    for name in whole:
        np.testing.assert_allclose(got[name], whole[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} on the mesh")
    moves = [op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce") if op in compiled.as_text()]
    assert not moves, f"rows moved between devices: {moves}"
