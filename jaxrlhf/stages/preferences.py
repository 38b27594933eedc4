"""Preference pairs: sample several responses per prompt, score them, pair winners with losers."""

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from jaxrlhf import data, outputs
from jaxrlhf.config import (ComputeConfig, DataConfig, MeshConfig, Reward, SamplingSection, check, check_no_remat,
                            pad_token_key)
from jaxrlhf.errors import JaxRLHFError, OutputError
from jaxrlhf.models import frozen_params
from jaxrlhf.parallel import check_rows, is_main, make_mesh, on_host, on_main, put_state
from jaxrlhf.rewards import describe_reward, make_scorer, reward_models
from jaxrlhf.stages.common import load_policy
from jaxrlhf.stages.rollout import PROMPT_COLUMNS, decode_responses, encode_prompt_rows, sample, sampling_config

COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class PreferencesConfig:
    policy: str
    reward: Reward  # one source, or a list of weighted sources
    prompts: DataConfig
    output: str  # the pairs file (JSONL: prompt, chosen, rejected, chosen_score, rejected_score)
    samples_per_prompt: int = 4
    # "all": every pair whose scores differ by more than min_margin; "best_worst": one per prompt
    pairing: Literal["all", "best_worst"] = "all"
    min_margin: float = 0.0
    batch_size: int = 64  # prompts per generation call (x samples_per_prompt rows, split over the mesh)
    seed: int = 0
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    pad_token: str | None = pad_token_key()  # the policy's (the reward model's: reward.pad_token)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # the policy's and the reward model's

    def __post_init__(self):
        check_no_remat(self.compute, "preferences")
        check(self.samples_per_prompt >= 2, f"samples_per_prompt={self.samples_per_prompt} must be at least 2")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")
        check(self.min_margin >= 0, f"min_margin={self.min_margin} must be >= 0")


def plan(config: PreferencesConfig) -> str:
    return (f"preference pairs: {config.samples_per_prompt} samples per prompt of {config.prompts.path} from "
            f"{config.policy}, scored by {describe_reward(config.reward)}, pairing "
            f"{config.pairing} (margin > {config.min_margin}) -> {config.output}")


def make_pairs(prompt: str, responses: list[str], scores, pairing: str, min_margin: float) -> list[dict]:
    """Winner/loser pairs among one prompt's scored responses (identical texts never pair)."""
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    if pairing == "best_worst":
        candidates = [(order[0], order[-1])]
    else:
        candidates = list(itertools.combinations(order, 2))
    return [{"prompt": prompt, "chosen": responses[a], "rejected": responses[b],
             "chosen_score": float(scores[a]), "rejected_score": float(scores[b])}
            for a, b in candidates if scores[a] - scores[b] > min_margin and responses[a] != responses[b]]


def preflight(config: PreferencesConfig, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Every check the run makes before it writes (the output path, the mesh, the policy and
    its tokenizer, the reward source loads, the prompts and their column, the context budget),
    writing nothing -> what the run needs, or None when `resume` keeps the pairs file there.
    `--dry-run` runs exactly this."""
    path = Path(config.output)
    outputs.check_apart(path, (config.policy, *reward_models(config.reward), config.prompts.path), "output")
    if path.is_file() and resume:
        print(f"{path} already holds this stage's pairs (written whole); kept")
        return None
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists; choose another path, pass --overwrite to replace it, "
                          "or --resume to keep it")
    k = config.samples_per_prompt
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    check_rows(config.batch_size * k, mesh, f"batch_size x samples_per_prompt ({config.batch_size} x {k})")
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = load_policy(config.policy, pad_token=config.pad_token,
                                                              compute=config.compute)
    scorer = make_scorer(config.reward, mesh, dtype=config.compute.dtype)
    rows = data.load_rows(config.prompts, tuple(COLUMNS["prompts"]), every_column=True)
    scorer.check_columns(rows)
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, config.sampling, config.seed)
    settings = sampling_config(config.sampling, tokenizer, model_config)
    return {"module": module, "params": params, "tokenizer": tokenizer, "mesh": mesh, "scorer": scorer,
            "prompts": (ids, mask, texts, rows), "settings": settings}


def run(config: PreferencesConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Sample, score and pair, then write the pairs file whole. It is written once, complete,
    so with `resume` an existing file is the finished stage and is kept; otherwise an existing
    file is replaced only with `overwrite`."""
    path = Path(config.output)
    ready = preflight(config, resume, overwrite)
    if ready is None:
        return path
    module, tokenizer, mesh, scorer, settings = (ready[k] for k in ("module", "tokenizer", "mesh", "scorer", "settings"))
    ids, mask, texts, rows = ready["prompts"]
    params = put_state(frozen_params(ready["params"], config.compute.dtype), mesh)
    k, pairs, generations = config.samples_per_prompt, [], 0
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(texts), config.batch_size), desc="pairs", disable=None if is_main() else True):
        idx = np.arange(start, min(start + config.batch_size, len(texts)))
        idx = np.concatenate([idx, np.full(config.batch_size - len(idx), idx[-1])])  # one compiled shape
        rep = np.repeat(idx, k)
        key = jax.random.fold_in(jax.random.key(config.seed), start)
        out = sample(module, params, ids[rep], mask[rep], key, settings, mesh)
        responses = decode_responses(tokenizer, out, settings.eos_ids)
        scores = scorer([texts[j] for j in rep], responses, [rows[j] for j in rep])
        for n, j in enumerate(idx[: min(config.batch_size, len(texts) - start)]):
            sl = slice(n * k, (n + 1) * k)
            pairs += make_pairs(texts[j], responses[sl], scores[sl], config.pairing, config.min_margin)
            generations += k
    if not pairs:
        raise JaxRLHFError("no preference pairs: every prompt's samples scored alike; lower min_margin or "
                           "sample with more diversity")

    def write():  # every process holds the same pairs
        outputs.replace_file(path, "".join(json.dumps(p) + "\n" for p in pairs), overwrite=overwrite)
        print(f"{generations} generations -> {len(pairs)} pairs in {path}")

    on_main(write, path)
    return path
