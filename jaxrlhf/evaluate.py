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
from jaxrlhf.config import (ComputeConfig, DataConfig, MeshConfig, Reward, SamplingSection, check, check_no_remat,
                            pad_token_key)
from jaxrlhf.parallel import check_rows, gather, make_mesh, on_host, on_main, put_rows, put_state
from jaxrlhf.models import frozen_params, load_config
from jaxrlhf.rewards import make_scorer, reward_models, score_columns
from jaxrlhf.stages.common import load_policy, policy_tokenizer
from jaxrlhf.updates.common import sequence_logps_jit
from jaxrlhf.stages.rollout import (PROMPT_COLUMNS, decode_responses, encode_prompt_rows, off_policy_settings, sample,
                                    sampling_config)

COLUMNS = PROMPT_COLUMNS  # the prompts' column, with an example row


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    # name -> checkpoint, or best-of-N over another entry ({best_of: N, policy: NAME, scorer: NAME}), in table order
    policies: dict[str, str | best_of_n.BestOfN]
    reference: str  # KL is measured against this policy
    prompts: DataConfig
    scorers: dict[str, Reward]  # name -> a reward source, or a list of weighted ones (each reported too)
    output_dir: str = "runs/eval"
    batch_size: int = 64
    seed: int = 0
    samples_to_show: int = 8
    # The collapse indicator's n-gram length, in the policy's tokens.
    collapse_ngram: int = 4
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    pad_token: str | None = pad_token_key()  # the policies' (a reward model's: scorers.NAME.pad_token)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)  # every policy's and scorer's

    def __post_init__(self):
        check_no_remat(self.compute, "evaluation")
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


def _sample_policy(config, path, ref, prompts, scorers, mesh, score_kl: bool):
    """A policy's replies to every prompt (`prompts`: ids, mask, texts in its own tokens, rows)
    -> (texts, token ids without EOS, {score column: scores} (`rewards.score_columns`), KLs to the reference (NaN unless
    `score_kl`), lengths in tokens counting EOS). Prompt i's reply is keyed by i, its index in
    the prompt file, so it does not depend on `batch_size` or the devices."""
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = load_policy(path, pad_token=config.pad_token, compute=config.compute)
    params = put_state(frozen_params(params, config.compute.dtype), mesh)
    settings = sampling_config(config.sampling, tokenizer, model_config)
    ref_module, ref_params = ref
    ids, mask, texts, rows = prompts
    responses, tokens, kls, lengths = [], [], [], []
    n = len(texts)
    for start in range(0, n, config.batch_size):
        idx = np.arange(start, start + config.batch_size) % n  # full batches: one compiled shape
        out = sample(module, params, ids[idx], mask[idx], jax.random.key(config.seed), settings, mesh, idx)
        keep = min(config.batch_size, n - start)
        responses += decode_responses(tokenizer, out, settings.eos_ids)[:keep]
        tokens += diagnostics.reply_tokens(out, settings.eos_ids)[:keep]
        lengths += list(out.response_mask.sum(-1)[:keep])
        if not score_kl:
            kls += [np.nan] * keep
            continue
        # Summed logprobs of each response under the policy and the reference, both at the
        # sampling temperature: the KL of the distribution the replies were drawn from.
        response_only = out.attention_mask.copy()
        response_only[:, : -out.response_mask.shape[1]] = 0
        scored = put_rows((out.sequences, out.attention_mask, response_only), mesh)
        policy_lp, ref_lp = (gather(sequence_logps_jit(m.apply, p, *scored, temperature=config.sampling.temperature))
                             for m, p in ((module, params), (ref_module, ref_params)))
        kls += list((policy_lp - ref_lp)[:keep])
    scores = score_columns(scorers, texts, responses, rows)
    return responses, tokens, scores, np.asarray(kls), np.asarray(lengths)


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two checkpoint entries name one folder (a trailing slash or a relative path aside)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_vocabulary(name: str, path: str, tokenizer, config: EvaluateConfig, reference_tokenizer) -> None:
    """A policy's KL to the reference is scored by the reference model on the policy's token
    ids, so both must give every id the same token: the same vocabulary (token -> id, added
    tokens included), not merely the same size."""
    check(tokenizer.get_vocab() == reference_tokenizer.get_vocab(),
          f"policies.{name} ({path}) and the reference ({config.reference}) have different tokenizers: the "
          "reference would score the policy's token ids as other tokens; evaluate it against a reference with "
          "its vocabulary")


def preflight(config: EvaluateConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Every check the run makes before it samples (the output folder, every policy and its
    tokenizer, its vocabulary against the reference's, best-of-N's rows against memory, the
    mesh, the prompts and their column, every scorer loads), writing nothing -> what the run
    needs, the prompts encoded by each policy's own tokenizer. `--dry-run` runs exactly this."""
    del resume  # evaluation is one pass
    out_dir = Path(config.output_dir)
    checkpoints = _checkpoints(config)
    reads = (*checkpoints.values(), config.reference, config.prompts.path,
             *(m for s in config.scorers.values() for m in reward_models(s)))
    outputs.check_apart(out_dir, reads, "output_dir")
    outputs.check_replaceable(out_dir, "evaluation", overwrite)
    model_configs = {path: load_config(path, head="lm") for path in dict.fromkeys((config.reference,
                                                                                   *checkpoints.values()))}
    tokenizers = {path: policy_tokenizer(path, c, config.pad_token) for path, c in model_configs.items()}
    for name, path in checkpoints.items():
        check_vocabulary(name, path, tokenizers[path], config, tokenizers[config.reference])
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    check_rows(config.batch_size, mesh, "batch_size")
    for name, entry in config.policies.items():
        if isinstance(entry, best_of_n.BestOfN):
            best_of_n.check_memory(name, entry, config.batch_size, config.sampling,
                                   model_configs[checkpoints[entry.policy]], mesh, config.compute.dtype)
    with on_host():
        ref_module, ref_params, _, _ = load_policy(config.reference, pad_token=config.pad_token, compute=config.compute)
    rows = data.load_rows(config.prompts, tuple(COLUMNS["prompts"]), every_column=True)
    prompts = {path: (*encode_prompt_rows(rows, tokenizer, config.sampling, config.seed), rows)
               for path, tokenizer in tokenizers.items()}
    scorers = {name: make_scorer(source, mesh, f"scorers.{name}", config.compute.dtype)
               for name, source in config.scorers.items()}
    for scorer in scorers.values():
        scorer.check_columns(rows)
    return {"mesh": mesh, "reference": (ref_module, ref_params), "tokenizer": tokenizers[config.reference],
            "prompts": prompts, "scorers": scorers}


def _checkpoints(config: EvaluateConfig) -> dict[str, str]:
    """The checkpoint entries of `policies`: name -> path."""
    return {n: p for n, p in config.policies.items() if isinstance(p, str)}


def run(config: EvaluateConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Evaluate every policy, writing the folder (whole, swapped in) after each one, so a long
    evaluation keeps every finished policy's results if a later one fails. It replaces an
    earlier evaluation (so `resume` changes nothing: evaluation is one pass); a folder of
    anything else only with `overwrite`. Every policy is checked before the first is
    evaluated; the reference's replies (the collapse indicator's baseline) come first."""
    out_dir = Path(config.output_dir)
    ready = preflight(config, resume, overwrite)
    mesh, scorers, tokenizer, prompts = ready["mesh"], ready["scorers"], ready["tokenizer"], ready["prompts"]
    ref_module, ref_params = ready["reference"]
    ref = (ref_module, put_state(frozen_params(ref_params, config.compute.dtype), mesh))
    checkpoints = _checkpoints(config)
    off_policy = off_policy_settings(config.sampling)
    if off_policy:
        print(_no_kl_note(off_policy))
    first = next((n for n, p in checkpoints.items() if same_checkpoint(p, config.reference)), None)
    if first is None:
        print(f"sampling the reference ({config.reference}) for the collapse indicator's baseline")
        reference_tokens = _sample_policy(config, config.reference, ref, prompts[config.reference], {}, mesh,
                                          score_kl=False)[1]
    order = [first] * (first is not None) + [n for n in config.policies if n != first]
    samples, results = {}, {}  # name -> (prompt texts, *what _sample_policy returns); name -> its results row
    for name in order:
        entry = config.policies[name]
        best = isinstance(entry, best_of_n.BestOfN)
        path = checkpoints[entry.policy] if best else entry
        # A KL only of replies drawn from the tempered softmax; best-of-N's is to its base policy.
        score_kl = not off_policy and (not best or same_checkpoint(path, config.reference))
        print(f"evaluating {name} ({entry}) on {len(prompts[path][2])} prompts")
        if best:
            *sampled, info = best_of_n.evaluate(entry, path, config, prompts[path], scorers, mesh, score_kl)
        else:
            sampled, info = _sample_policy(config, path, ref, prompts[path], scorers, mesh, score_kl), None
        if name == first:
            reference_tokens = sampled[1]
        samples[name] = (prompts[path][2], *sampled)
        results[name] = _results(config, tokenizer, *sampled, reference_tokens)
        if info is not None:
            results[name]["_best_of_n"] = info
        _write_so_far(out_dir, config, samples, results, overwrite, off_policy)
        print(f"{name}: results written to {out_dir} ({len(results)} of {len(config.policies)} policies)")
    print("\n\n".join("\n".join(t) for t in _tables({n: results[n] for n in config.policies}, config)))
    print(f"results, replies, samples and plot in {out_dir}")
    return out_dir


def _write_so_far(out_dir, config, samples, results, overwrite, off_policy) -> None:
    """The evaluation folder with every policy evaluated so far, in `policies` order, swapped in
    whole (process 0 writes; every process holds the same results)."""
    done = [n for n in config.policies if n in results]
    results, samples = {n: results[n] for n in done}, {n: samples[n] for n in done}
    notes = _notes(config, results, off_policy)
    on_main(lambda: outputs.replace_folder(
        out_dir, "evaluation", lambda d: _write(d, config, results, samples, _tables(results, config), notes,
                                                plot=len(done) == len(config.policies)),
        overwrite=overwrite), out_dir)


def _results(config, tokenizer, responses, tokens, scores, kls, lengths, reference_tokens) -> dict:
    """One policy's row of results.json (keys starting with _ are not table columns)."""
    collapse = diagnostics.collapse(tokens, reference_tokens, config.collapse_ngram)
    gram = collapse["ngram"]
    totals = {s: v for s, v in scores.items() if s in config.scorers}
    return {
        **{f"{s}/{stat}": float(fn(v)) for s, v in totals.items()
           for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std))},
        **{f"{s}/per_token": diagnostics.per_token(v, lengths) for s, v in totals.items()},
        # The standard error of each mean; a source's mean and SE leave out its None replies (NaN).
        **{f"{s}/se": diagnostics.mean_and_se(v)[1] for s, v in totals.items()},
        **{f"{s}/{stat}": x for s, v in scores.items() if s not in totals
           for stat, x in zip(("mean", "se"), diagnostics.mean_and_se(v))},
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


def _tables(results, config) -> list[list[str]]:
    """Markdown tables: the scores (each scorer's total, each source of a scorer of several)
    beside length, reward per token and KL; diversity and collapse."""
    columns = list(next(iter(results.values()))["_scores"])
    scores = [f"{s}/{stat}" for s in columns
              for stat in (("mean", "se", "median", "std", "per_token") if s in config.scorers else ("mean", "se"))]
    diversity = ["distinct_1", "distinct_2", "distinct_1_tokens", "distinct_2_tokens", "collapse_share",
                 "collapse_reference_share", "_collapse_ngram"]
    return [_table(results, [*scores, "response_tokens", "kl_to_reference"]), _table(results, diversity)]


def _table(results, columns) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return "n/a" if np.isnan(v) else f"{v:.3f}"
        return f"`{v!r}`"

    head = [c.removeprefix("_") for c in columns]
    table = ["| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(columns)]
    return table + [f"| {n} | " + " | ".join(cell(results[n][c]) for c in columns) + " |" for n in results]


def _no_kl_note(off_policy: list[str]) -> str:
    return (f"kl_to_reference is n/a: with {', '.join(off_policy)} set, the replies are not drawn from the tempered "
            "softmax the KL is scored under.")


def _notes(config, results, off_policy) -> list[str]:
    """What the first table's KL column holds where it is not a policy's own log ratio, and
    which policies are still to come."""
    notes = [_no_kl_note(off_policy)] if off_policy else []
    best = [n for n, r in results.items() if "_best_of_n" in r]
    if best and not off_policy:
        notes.append(f"kl_to_reference of {', '.join(best)} is the plug-in estimate over each prompt's N samples "
                     "(n/a unless its base policy is the reference), not the bound log N - (N - 1) / N that the "
                     "frontier plots; both are in the best-of-N table below.")
    missing = [n for n in config.policies if n not in results]
    if missing:
        notes.append(f"Partial: {', '.join(missing)} not evaluated (yet): the evaluation is running or stopped.")
    return notes


def _write(out_dir: Path, config, results, samples, tables, notes, plot: bool) -> None:
    """results.md, results.json, replies.jsonl, samples.md and (`plot`: once every policy is
    done, as drawing it after each would cost a second per policy) rewards.png of `results`
    (name -> row) from `samples` (name -> prompt texts as the policy saw them, then what
    `_sample_policy` returns)."""
    names, scorer_names = list(results), list(config.scorers)
    (out_dir / "results.md").write_text(
        "# Evaluation\n\n" + "\n".join(tables[0]) + "".join(f"\n\n{n}" for n in notes) +
        "\n\n## Diversity and collapse\n\n"
        f"distinct-n over words and over the policy's tokens; collapse: the share of a policy's replies that "
        f"carry its most shared {config.collapse_ngram}-token n-gram, and the reference's share of the same "
        "n-gram.\n\n" + "\n".join(tables[1] + best_of_n.report_lines(results)) + "\n")
    (out_dir / "results.json").write_text(outputs.json_text(results))
    with (out_dir / "replies.jsonl").open("w") as f:
        for name, (prompts, responses, _, scores, kls, lengths) in samples.items():
            # A best-of-N reply's KL is its prompt's plug-in estimate; any other's, its summed log ratio.
            estimator = "best_of_n_plugin" if "_best_of_n" in results[name] else "log_ratio"
            for i, (prompt, reply) in enumerate(zip(prompts, responses)):
                known = not np.isnan(kls[i])
                f.write(json.dumps({"policy": name, "prompt": prompt, "reply": reply, "tokens": int(lengths[i]),
                                    "kl_to_reference": float(kls[i]) if known else None,
                                    "kl_estimator": estimator if known else None,
                                    "scores": {s: _known(v[i]) for s, v in scores.items()}}) + "\n")
    prompts = samples[names[0]][0]
    show = min(config.samples_to_show, len(prompts))
    lines = ["# Samples (same prompts, side by side, scored by every scorer)\n"]
    for i in range(show):
        lines += [f"## {prompts[i]!r}\n", "| policy | reply | " + " | ".join(scorer_names) + " | tokens |",
                  "|---|---|" + "---|" * (len(scorer_names) + 1)]
        for n in names:
            _, responses, _, scores, _, lengths = samples[n]
            reply = repr(responses[i]).replace("|", "\\|")
            lines.append(f"| {n} | {reply} | " + " | ".join(f"{scores[s][i]:+.2f}" for s in scorer_names)
                         + f" | {int(lengths[i])} |")
        lines.append("")
    (out_dir / "samples.md").write_text("\n".join(lines))
    if plot:
        _plot(out_dir / "rewards.png", results, scorer_names)


def _known(x) -> float | None:
    """A score for JSON: None where unknown (NaN: a reward function's None)."""
    return None if np.isnan(x) else float(x)


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
