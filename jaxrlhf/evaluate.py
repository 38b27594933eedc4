"""Compare policies on the same prompts: reward distributions (by every scorer given), KL to
the reference, distinct-1/2 diversity and response length; writes a markdown table, a PNG of
the reward distributions overlaid, samples side by side and results.json into one folder."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from jaxrlhf import best_of_n, data, outputs
from jaxrlhf.config import DataConfig, MeshConfig, RewardSource, SamplingSection, check
from jaxrlhf.parallel import check_rows, gather, make_mesh, on_host, on_main, put_rows, put_state
from jaxrlhf.rewards import make_scorer
from jaxrlhf.stages.common import check_policy, load_policy
from jaxrlhf.updates.common import sequence_logps_jit
from jaxrlhf.stages.rollout import decode_responses, encode_prompt_rows, sample, sampling_config


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
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        check(bool(self.policies), "policies must name at least one checkpoint")
        check(bool(self.scorers), "scorers must name at least one reward source")
        best_of_n.check_entries(self.policies, self.scorers)


def plan(config: EvaluateConfig) -> str:
    return (f"evaluate {list(config.policies)} on {config.prompts.path} with scorers {list(config.scorers)}, "
            f"KL to {config.reference} -> {config.output_dir}")


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens, pooled across texts."""
    grams = [tuple(words[i: i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def _sample_policy(config, path, ref, ids, mask, texts, scorers, mesh):
    with on_host():  # the whole model is built on the host, then laid out on the mesh
        module, params, model_config, tokenizer = load_policy(path)
    params = put_state(params, mesh)
    settings = sampling_config(config.sampling, tokenizer, model_config)
    ref_module, ref_params = ref
    responses, kls, lengths = [], [], []
    n = len(texts)
    for start in range(0, n, config.batch_size):
        idx = np.arange(start, start + config.batch_size) % n  # full batches: one compiled shape
        key = jax.random.fold_in(jax.random.key(config.seed), start)
        out = sample(module, params, ids[idx], mask[idx], key, settings, mesh)
        keep = min(config.batch_size, n - start)
        responses += decode_responses(tokenizer, out)[:keep]
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
    return responses, scores, np.asarray(kls), np.asarray(lengths)


def run(config: EvaluateConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Evaluate every policy, then write the folder whole. It replaces an earlier evaluation
    (so `resume` changes nothing: evaluation is one pass); a folder of anything else only with
    `overwrite`. Every policy is checked before the first is evaluated."""
    del resume
    out_dir = Path(config.output_dir)
    checkpoints = {n: p for n, p in config.policies.items() if isinstance(p, str)}
    reads = (*checkpoints.values(), config.reference, config.prompts.path,
             *(s.model for s in config.scorers.values()))
    outputs.check_apart(out_dir, reads, "output_dir")
    outputs.check_replaceable(out_dir, "evaluation", overwrite)
    for path in (config.reference, *checkpoints.values()):
        check_policy(path)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    check_rows(config.batch_size, mesh, "batch_size")
    with on_host():
        ref_module, ref_params, _, tokenizer = load_policy(config.reference)
    ref_params = put_state(ref_params, mesh)
    rows = data.load_rows(config.prompts, ("prompt",))
    ids, mask, texts = encode_prompt_rows(rows, tokenizer, config.sampling, config.seed)
    scorers = {name: make_scorer(source, mesh) for name, source in config.scorers.items()}
    results, samples = {}, {}
    for name, path in config.policies.items():
        print(f"evaluating {name} ({path}) on {len(texts)} prompts")
        if isinstance(path, best_of_n.BestOfN):
            responses, scores, lengths, info = best_of_n.evaluate(path, checkpoints[path.policy], config, ids, mask,
                                                                  texts, scorers, mesh)
            # Its KL to the reference is known only when its base policy is the reference.
            kls = np.asarray([info["kl_estimate"] if checkpoints[path.policy] == config.reference else np.nan])
        else:
            responses, scores, kls, lengths = _sample_policy(
                config, path, (ref_module, ref_params), ids, mask, texts, scorers, mesh)
        samples[name] = responses
        results[name] = {
            **{f"{s}/{stat}": float(fn(v)) for s, v in scores.items()
               for stat, fn in (("mean", np.mean), ("median", np.median), ("std", np.std))},
            "kl_to_reference": float(kls.mean()),
            "distinct_1": distinct_n(responses, 1),
            "distinct_2": distinct_n(responses, 2),
            "response_tokens": float(lengths.mean()),
            "_scores": {s: v.tolist() for s, v in scores.items()},
        }
        if isinstance(path, best_of_n.BestOfN):
            results[name]["_best_of_n"] = info
    table = _table(results)

    def write():  # every process holds the same results
        outputs.replace_folder(out_dir, "evaluation", lambda d: _write(d, config, texts, results, samples, table),
                               overwrite=overwrite)
        print("\n".join(table))
        print(f"results, samples and plot in {out_dir}")

    on_main(write, out_dir)
    return out_dir


def _table(results) -> list[str]:
    names = list(results)
    columns = [k for k in results[names[0]] if not k.startswith("_")]
    table = ["| policy | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    return table + [f"| {n} | " + " | ".join(f"{results[n][c]:.3f}" for c in columns) + " |" for n in names]


def _write(out_dir: Path, config, prompts, results, samples, table) -> None:
    names = list(results)
    (out_dir / "results.md").write_text("# Evaluation\n\n" + "\n".join(table + best_of_n.report_lines(results)) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    show = min(config.samples_to_show, len(prompts))
    lines = ["# Samples (same prompts, side by side)\n"]
    for i in range(show):
        lines.append(f"## {prompts[i]!r}\n")
        lines += [f"- **{n}** ({results[n]['_scores'][next(iter(config.scorers))][i]:+.2f}): {samples[n][i]!r}"
                  for n in names]
        lines.append("")
    (out_dir / "samples.md").write_text("\n".join(lines))
    _plot(out_dir / "rewards.png", results, list(config.scorers))


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
