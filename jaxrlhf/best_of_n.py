"""Best-of-N: sample N replies per prompt from a policy, keep the one a reward source scores
highest (ties: the first drawn). In evaluation it is a policy of its own,
`{best_of: N, policy: NAME, scorer: NAME}`, whose KL to its base policy is reported two ways:

- `kl_bound` = log N - (N - 1) / N, the usual formula: the KL when no two replies tie in score,
  and an upper bound on it for every distribution (Beirami et al. 2024, "Theoretical
  guarantees on the best-of-n alignment policy").
- `kl_estimate`, the plug-in estimate: for each prompt, the exact KL of best-of-N over the
  empirical distribution of that prompt's N scored samples (each of mass 1/N), averaged over
  prompts. With scores grouped by value (ascending, `c_g` samples in group g, F_g the
  cumulative share up to and including g, F_g- = F_g - c_g / N), best-of-N picks group g with
  probability q_g = F_g^N - F_g-^N, so KL = sum_g q_g log(q_g / (c_g / N)). It is below the
  bound, and lower the more samples tie (a policy that repeats itself, or a coarse score), but
  biased low: N samples see only N atoms (with N distinct scores it is a constant of N).
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import diagnostics
from jaxrlhf.config import check
from jaxrlhf.errors import ConfigError
from jaxrlhf.models.layers import frozen_params, init_cache
from jaxrlhf.parallel import on_host, put_state
from jaxrlhf.rewards import score_columns
from jaxrlhf.stages.common import load_policy
from jaxrlhf.stages.rollout import decode_responses, sample, sampling_config


@dataclasses.dataclass(frozen=True)
class BestOfN:
    best_of: int  # N, replies sampled per prompt
    policy: str  # the name of a checkpoint entry of `policies`, sampled from
    scorer: str  # the name of an entry of `scorers`, which picks the best

    def __post_init__(self):
        check(self.best_of >= 1, f"best_of={self.best_of} must be at least 1")


def kl_bound(n: int) -> float:
    """log N - (N - 1) / N: best-of-N's KL to its base policy when scores never tie, an upper bound always."""
    return math.log(n) - (n - 1) / n


def kl_plugin(scores_N) -> float:
    """The exact KL(best-of-N || base) over the empirical distribution of one prompt's N scored
    samples (see the module docstring). In logs: F_g^N underflows to 0 for N above about 145,
    so log q_g = N log F_g + log(1 - (F_g- / F_g)^N), which stays finite; a term whose q_g
    underflows to 0 adds 0 (0 times a finite log ratio), never 0 * log 0."""
    scores_N = np.asarray(scores_N, np.float64)
    n = len(scores_N)
    _, counts_G = np.unique(scores_N, return_counts=True)  # groups of equal scores, ascending
    upto_G = np.cumsum(counts_G)
    with np.errstate(divide="ignore"):  # the first group's F_g- = 0: log 0 = -inf, so 1 - 0^N = 1 as meant
        below_G = n * np.log1p(-counts_G / upto_G)  # N log(F_g- / F_g)
    log_q_G = n * np.log(upto_G / n) + np.log(-np.expm1(below_G))
    return float(np.sum(np.exp(log_q_G) * (log_q_G - np.log(counts_G / n))))


def pick_best(scores_PxN) -> np.ndarray:
    """The index of each prompt's best sample, the first drawn among equals -> `[P]`."""
    return np.argmax(np.asarray(scores_PxN), axis=1)


def check_entries(policies: dict, scorers: dict) -> None:
    """Each best-of-N entry names a checkpoint entry of `policies` and an entry of `scorers`."""
    for name, entry in policies.items():
        if not isinstance(entry, BestOfN):
            continue
        if not isinstance(policies.get(entry.policy), str):
            choices = [k for k, v in policies.items() if isinstance(v, str)]
            raise ConfigError(f"policies.{name}.policy={entry.policy!r} is not a checkpoint entry of policies; "
                              f"choose one of {choices}")
        if entry.scorer not in scorers:
            raise ConfigError(f"policies.{name}.scorer={entry.scorer!r} is not one of scorers {list(scorers)}")


def device_memory(mesh) -> int:
    """Bytes a device of `mesh` can hold: its allocator's limit (GPU, TPU), else (CPU devices
    report none) its share of the host's memory, which this host's devices in the mesh split."""
    here = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limit = (here[0].memory_stats() or {}).get("bytes_limit")
    if limit is not None:
        return limit
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(here)


def check_memory(name: str, entry: BestOfN, batch_size: int, section, model_config, mesh,
                 dtype: str = "float32") -> None:
    """Best-of-N samples `batch_size` x N rows in one call, split over the mesh's devices:
    refuse, before anything is sampled, an N whose rows' KV cache (in compute `dtype`) and
    float32 logits alone (a lower bound on that call's memory: the weights, activations and host
    copies come on top) exceed a device's memory."""
    rows, tokens = batch_size * entry.best_of, section.max_prompt_tokens + section.max_new_tokens
    # Shapes only: nothing allocated.
    cache = jax.eval_shape(lambda: init_cache(model_config, rows, tokens, jnp.dtype(dtype)))
    need = (sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
            + rows * model_config.vocab_size * np.dtype(np.float32).itemsize) / mesh.size
    have = device_memory(mesh)
    check(need <= have, f"policies.{name}: best_of={entry.best_of} x batch_size={batch_size} = {rows} rows of "
                        f"{tokens} tokens need at least {need / 2**30:.1f} GiB a device to sample (their KV cache "
                        f"and logits, over {mesh.size} device(s)), more than its {have / 2**30:.1f} GiB; "
                        "lower best_of or batch_size")


def evaluate(entry: BestOfN, path: str, config, prompts, scorers, mesh, score_kl: bool):
    """Best-of-`entry.best_of` from the policy at `path` on every prompt (`prompts`: its ids,
    mask, texts and rows), `config.batch_size` prompts per call (x N rows), picked by
    `scorers[entry.scorer]`'s total, the kept replies then scored by every scorer -> (replies,
    their token ids without EOS, {score column: scores [P]} (`rewards.score_columns`), KL to
    the reference [P], response lengths [P], info), as `evaluate._sample_policy` plus `info`. The KL of a prompt is its plug-in
    estimate when `score_kl` (the base policy is the evaluation's reference, sampled from its
    tempered softmax), else NaN: unknown.

    Rows are sample-major (row j * B + b is sample j of prompt b), and sample j of prompt i is
    keyed by j * P + i with the key the evaluation samples every policy with, so sample 0 is
    the base policy's own evaluation sample and best-of-N's samples are the first N of
    best-of-N' for N' > N (common random numbers: the frontier's points differ by N alone),
    whatever the batch size or the devices."""
    with on_host():
        module, params, model_config, tokenizer = load_policy(path, pad_token=config.pad_token, compute=config.compute)
    params = put_state(frozen_params(params, config.compute.dtype), mesh)
    settings = sampling_config(config.sampling, tokenizer, model_config)
    ids_PxT, mask_PxT, texts, prompt_rows = prompts
    n, b, p = entry.best_of, config.batch_size, len(texts)
    replies, tokens, lengths, scores_PxN = [], [], [], []
    for start in range(0, p, b):
        idx = np.arange(start, start + b) % p  # full batches: one compiled shape
        rows = np.tile(idx, n)
        keys = np.repeat(np.arange(n), b) * p + rows
        out = sample(module, params, ids_PxT[rows], mask_PxT[rows], jax.random.key(config.seed), settings, mesh,
                     keys)
        texts_out = decode_responses(tokenizer, out, settings.eos_ids)
        tokens_out = diagnostics.reply_tokens(out, settings.eos_ids)
        s_BxN = scorers[entry.scorer]([texts[j] for j in rows], texts_out, [prompt_rows[j] for j in rows])
        s_BxN = s_BxN.reshape(n, b).T
        best_B = pick_best(s_BxN) * b + np.arange(b)
        keep = min(b, p - start)
        replies += [texts_out[r] for r in best_B[:keep]]
        tokens += [tokens_out[r] for r in best_B[:keep]]
        lengths += list(np.asarray(out.response_mask).sum(-1)[best_B[:keep]])
        scores_PxN.append(s_BxN[:keep])
    scores_PxN = np.concatenate(scores_PxN)
    kls_P = np.asarray([kl_plugin(s) for s in scores_PxN])
    info = {"best_of": n, "policy": entry.policy, "scorer": entry.scorer, "kl_bound": kl_bound(n),
            "kl_estimate": float(kls_P.mean())}
    kls_P = kls_P if score_kl else np.full(p, np.nan)
    scores = score_columns(scorers, texts, replies, prompt_rows)
    return replies, tokens, scores, kls_P, np.asarray(lengths), info


def report_lines(results: dict) -> list[str]:
    """The results.md section on the best-of-N policies of an evaluation (none: no lines). The
    bound is the KL the frontier plots for the policy; the estimate is what the evaluation's
    `kl_to_reference` column shows for it (when its base policy is the reference)."""
    rows = [(name, r["_best_of_n"]) for name, r in results.items() if "_best_of_n" in r]
    if not rows:
        return []
    return ["", "## Best-of-N: KL to the base policy", "",
            "| policy | N | of | picked by | KL bound: log N - (N - 1) / N (the frontier's KL) "
            "| KL plug-in estimate (its kl_to_reference) |", "|---|---|---|---|---|---|",
            *(f"| {name} | {i['best_of']} | {i['policy']} | {i['scorer']} | {i['kl_bound']:.3f} "
              f"| {i['kl_estimate']:.3f} |" for name, i in rows)]
