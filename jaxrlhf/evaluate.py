"""Compare policies on the same prompts: reward distributions (by every scorer given), KL to
the reference, diversity over words and tokens, a collapse indicator, response length and
reward per token; writes a markdown table, a PNG of the reward distributions overlaid,
samples side by side, every reply with its scores (replies.jsonl) and results.json into one
folder."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxrlhf import best_of_n, data, diagnostics, outputs
from jaxrlhf.config import DataConfig, MeshConfig, RewardSource, SamplingSection, check, pad_token_key
from jaxrlhf.parallel import check_rows, gather, make_mesh, on_host, on_main, put_rows, put_state
from jaxrlhf.rewards import make_scorer
from jaxrlhf.stages.common import check_policy, load_policy
from jaxrlhf.updates.common import sequence_logps_jit
from jaxrlhf.stages.rollout import PROMPT_COLUMNS, decode_responses, encode_prompt_rows, sample, sampling_config

COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    # name -> checkpoint, or best-of-N over another entry ({best_of: N, policy: NAME, scorer: NAME}), in table order
    policies: dict[str, str | best_of_n.BestOfN]
    reference: str  # KL is measured against this policy
    prompts: DataConfig
    scorers: dict[str, RewardSource]  # name -> reward source
    output_dir: str = "runs/eval"
    batch_size: int = 64
    seed: int = 0
    samples_to_show: int = 8
    # The collapse indicator's n-gram length, in the policy's tokens.
    collapse_ngram: int = 4
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    pad_token: str | None = pad_token_key()  # the policies' (a reward model's: scorers.NAME.pad_token)

    def __post_init__(self):
        check(bool(self.policies), "policies must name at least one checkpoint")
        check(bool(self.scorers), "scorers must name at least one reward source")
        check(self.collapse_ngram >= 1, f"collapse_ngram={self.collapse_ngram} must be at least 1")
        best_of_n.check_entries(self.policies, self.scorers)


def plan(config: EvaluateConfig) -> str:
    return (f"evaluate {list(config.policies)} on {config.prompts.path} with scorers {list(config.scorers)}, "
            f"KL to {config.reference} -> {config.output_dir}")


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens, pooled across texts."""
    return diagnostics.distinct([t.split() for t in texts], n)


def _sample_policy(config, path, ref, ids, mask, texts, scorers, mesh):
    """A policy's replies to every prompt -> (texts, token ids without EOS, {scorer: scores},
    KLs to the reference, lengths in tokens counting EOS)."""
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = load_policy(path, pad_token=config.pad_token)
    params = put_state(params, mesh)
    settings = sampling_config(config.sampling, tokenizer, model_config)
    ref_module, ref_params = ref
    responses, tokens, kls, lengths = [], [], [], []
    n = len(texts)
    for start in range(0, n, config.batch_size):
        idx = np.arange(start, start + config.batch_size) % n  # full batches: one compiled shape
        key = jax.random.fold_in(jax.random.key(config.seed), start)
        out = sample(module, params, ids[idx], mask[idx], key, settings, mesh)
        keep = min(config.batch_size, n - start)
        responses += decode_responses(tokenizer, out)[:keep]
        tokens += diagnostics.reply_tokens(out, tokenizer.eos_token_id)[:keep]
        # Summed logprobs of each response under the policy and the reference, both at the
        # sampling temperature: the KL of the distribution the replies were drawn from.
        response_only = out.attention_mask.copy()
        response_only[:, : -out.response_mask.shape[1]] = 0
        scored = put_rows((out.sequences, out.attention_mask, response_only), mesh)
        policy_lp, ref_lp = (gather(sequence_logps_jit(m.apply, p, *scored, temperature=config.sampling.temperature))
                             for m, p in ((module, params), (ref_module, ref_params)))
        kls += list((policy_lp - ref_lp)[:keep])
        lengths += list(out.response_mask.sum(-1)[:keep])
    scores = {s: scorer(texts, responses) for s, scorer in scorers.items()}
    return responses, tokens, scores, np.asarray(kls), np.asarray(lengths)



def preflight(config: EvaluateConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Every check the run makes before it samples (the output folder, every policy and its
    tokenizer, the mesh, the prompts and their column, every scorer loads), writing nothing ->
    what the run needs. `--dry-run` runs exactly this."""
    del resume  # evaluation is one pass, written whole
    out_dir = Path(config.output_dir)
    checkpoints = {n: p for n, p in config.policies.items() if isinstance(p, str)}
    reads = (*checkpoints.values(), config.reference, config.prompts.path,
             *(s.model for s in config.scorers.values()))
    outputs.check_apart(out_dir, reads, "output_dir")
    outputs.check_replaceable(out_dir, "evaluation", overwrite)
    for path in (config.reference, *checkpoints.values()):
        check_policy(path, config.pad_token)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    check_rows(config.batch_size, mesh, "batch_size")
    with on_host():
        ref_module, ref_params, _, tokenizer = load_policy(config.reference, pad_token=config.pad_token)
    rows = data.load_rows(config.prompts, tuple(COLUMNS["prompts"]))
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, config.sampling, config.seed)
    scorers = {name: make_scorer(source, mesh, f"scorers.{name}") for name, source in config.scorers.items()}
    return {"mesh": mesh, "reference": (ref_module, ref_params), "tokenizer": tokenizer,
            "prompts": (ids, mask, texts), "scorers": scorers}


def run(config: EvaluateConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Evaluate every policy, then write the folder whole. It replaces an earlier evaluation
    (so `resume` changes nothing: evaluation is one pass); a folder of anything else only with
    `overwrite`. Every policy is checked before the first is evaluated."""
    out_dir = Path(config.output_dir)
    ready = preflight(config, resume, overwrite)
    mesh, scorers, tokenizer = ready["mesh"], ready["scorers"], ready["tokenizer"]
    ids, mask, texts = ready["prompts"]
    ref_module, ref_params = ready["reference"]
    ref = (ref_module, put_state(ref_params, mesh))
    checkpoints = {n: p for n, p in config.policies.items() if isinstance(p, str)}
    samples, infos = {}, {}  # name -> what _sample_policy returns; best-of-N's -> its KL report
    for name, entry in config.policies.items():
        print(f"evaluating {name} ({entry}) on {len(texts)} prompts")
        if isinstance(entry, best_of_n.BestOfN):
            *sampled, infos[name] = best_of_n.evaluate(entry, checkpoints[entry.policy], config, ids, mask, texts,
                                                       scorers, mesh)
            samples[name] = tuple(sampled)
        else:
            samples[name] = _sample_policy(config, entry, ref, ids, mask, texts, scorers, mesh)
    reference_tokens = next((samples[n][1] for n, p in checkpoints.items() if p == config.reference), None)
    if reference_tokens is None:
        print(f"sampling the reference ({config.reference}) for the collapse indicator's baseline")
        reference_tokens = _sample_policy(config, config.reference, ref, ids, mask, texts, scorers, mesh)[1]
    results = {name: _results(config, tokenizer, *sampled, reference_tokens) for name, sampled in samples.items()}
    for name, info in infos.items():
        results[name]["_best_of_n"] = info
    tables = _tables(results, list(config.scorers))

    def write():  # every process holds the same results
        outputs.replace_folder(out_dir, "evaluation", lambda d: _write(d, config, texts, results, samples, tables),
                               overwrite=overwrite)
        print("\n\n".join("\n".join(t) for t in tables))
        print(f"results, replies, samples and plot in {out_dir}")

    on_main(write, out_dir)
    return out_dir


def _results(config, tokenizer, responses, tokens, scores, kls, lengths, reference_tokens) -> dict:
    """One policy's row of results.json (keys starting with _ are not table columns)."""
    collapse = diagnostics.collapse(tokens, reference_tokens, config.collapse_ngram)
    gram = collapse["ngram"]
    return {
        **{f"{s}/{stat}": float(fn(v)) for s, v in scores.items()
           for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std))},
        **{f"{s}/per_token": diagnostics.per_token(v, lengths) for s, v in scores.items()},
        "kl_to_reference": float(kls.mean()),
        "response_tokens": float(lengths.mean()),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "distinct_1_tokens": diagnostics.distinct(tokens, 1),
        "distinct_2_tokens": diagnostics.distinct(tokens, 2),
        "collapse_share": collapse["share"],
        "collapse_reference_share": collapse["reference_share"],
        "_collapse_ngram": None if gram is None else tokenizer.decode(list(gram)),
        "_collapse_ngram_ids": None if gram is None else list(gram),
        "_scores": {s: v.tolist() for s, v in scores.items()},
    }


def _tables(results, scorer_names) -> list[list[str]]:
    """Markdown tables: the scores beside length, reward per token and KL; diversity and collapse."""
    scores = [f"{s}/{stat}" for s in scorer_names for stat in ("mean", "median", "std", "per_token")]
    diversity = ["distinct_1", "distinct_2", "distinct_1_tokens", "distinct_2_tokens", "collapse_share",
                 "collapse_reference_share", "_collapse_ngram"]
    return [_table(results, [*scores, "response_tokens", "kl_to_reference"]), _table(results, diversity)]


def _table(results, columns) -> list[str]:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else f"`{v!r}`"

    head = [c.removeprefix("_") for c in columns]
    table = ["| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(columns)]
    return table + [f"| {n} | " + " | ".join(cell(results[n][c]) for c in columns) + " |" for n in results]


def _write(out_dir: Path, config, prompts, results, samples, tables) -> None:
    names, scorer_names = list(results), list(config.scorers)
    (out_dir / "results.md").write_text(
        "# Evaluation\n\n" + "\n".join(tables[0]) + "\n\n## Diversity and collapse\n\n"
        f"distinct-n over words and over the policy's tokens; collapse: the share of a policy's replies that "
        f"carry its most shared {config.collapse_ngram}-token n-gram, and the reference's share of the same "
        "n-gram.\n\n" + "\n".join(tables[1] + best_of_n.report_lines(results)) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with (out_dir / "replies.jsonl").open("w") as f:
        for name, (responses, _, scores, kls, lengths) in samples.items():
            for i, (prompt, reply) in enumerate(zip(prompts, responses)):
                f.write(json.dumps({"policy": name, "prompt": prompt, "reply": reply, "tokens": int(lengths[i]),
                                    "kl_to_reference": None if np.isnan(kls[i]) else float(kls[i]),
                                    "scores": {s: float(scores[s][i]) for s in scorer_names}}) + "\n")
    show = min(config.samples_to_show, len(prompts))
    lines = ["# Samples (same prompts, side by side, scored by every scorer)\n"]
    for i in range(show):
        lines += [f"## {prompts[i]!r}\n", "| policy | reply | " + " | ".join(scorer_names) + " | tokens |",
                  "|---|---|" + "---|" * (len(scorer_names) + 1)]
        for n in names:
            reply = repr(samples[n][0][i]).replace("|", "\\|")
            lines.append(f"| {n} | {reply} | " + " | ".join(f"{samples[n][2][s][i]:+.2f}" for s in scorer_names)
                         + f" | {int(samples[n][4][i])} |")
        lines.append("")
    (out_dir / "samples.md").write_text("\n".join(lines))
    _plot(out_dir / "rewards.png", results, scorer_names)


def _plot(path: Path, results, scorer_names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scorer_names), figsize=(5.5 * len(scorer_names), 4), squeeze=False)
    for ax, s in zip(axes[0], scorer_names):
        values = [np.asarray(r["_scores"][s]) for r in results.values()]
        bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values) + 1e-6, 30)
        for name, v in zip(results, values):
            ax.hist(v, bins=bins, alpha=0.45, label=f"{name} (mean {v.mean():+.2f})")
        ax.set_title(f"reward: {s}")
        ax.set_xlabel("score")
        ax.set_ylabel("responses")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
