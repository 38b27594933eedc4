"""How far bfloat16 compute moves a policy's logprobs: KL(float32 policy || bfloat16 policy),
estimated on replies the float32 policy samples (their summed logprobs under each dtype, the
same token ids), and the mean absolute difference per reply. Run from the repository root:

    python benchmarks/bf16_logprobs.py POLICY PROMPTS.jsonl ROWS

(results in RESULTS.md, "bfloat16 and rematerialisation").
"""

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxrlhf.config import ComputeConfig, DataConfig, SamplingSection  # noqa: E402
from jaxrlhf.models import frozen_params  # noqa: E402
from jaxrlhf.parallel import gather, make_mesh, put_rows, put_state  # noqa: E402
from jaxrlhf.stages.common import load_policy  # noqa: E402
from jaxrlhf.stages.rollout import encode_prompt_rows, load_prompt_rows, sample, sampling_config  # noqa: E402
from jaxrlhf.updates.common import sequence_logps_jit  # noqa: E402


def main(policy: str, prompts: str, rows: int) -> None:
    section, mesh = SamplingSection(max_new_tokens=16, max_prompt_tokens=24), make_mesh(None, 1)
    models = {d: load_policy(policy, compute=ComputeConfig(dtype=d)) for d in ("float32", "bfloat16")}
    module, params, config, tokenizer = models["float32"]
    source = DataConfig(prompts, max_rows=rows)
    ids, mask, _ = encode_prompt_rows(load_prompt_rows(source), tokenizer, section, 0, source, policy)
    out = sample(module, put_state(params, mesh), ids, mask, jax.random.key(0),
                 sampling_config(section, tokenizer, config), mesh)
    reply_only = out.attention_mask.copy()
    reply_only[:, :-out.response_mask.shape[1]] = 0  # score the replies' tokens only
    scored = put_rows((out.sequences, out.attention_mask, reply_only), mesh)
    logps = {d: gather(sequence_logps_jit(m.apply, put_state(frozen_params(p, d), mesh), *scored))
             for d, (m, p, _, _) in models.items()}
    diff_B, tokens = logps["float32"] - logps["bfloat16"], out.response_mask.sum()
    print(f"{policy}: {rows} replies of {tokens / rows:.1f} tokens; KL(f32 || bf16) {diff_B.mean():+.4f} per reply "
          f"({diff_B.sum() / tokens:+.5f} per token); mean |log p_f32 - log p_bf16| {np.abs(diff_B).mean():.4f} "
          "per reply")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
