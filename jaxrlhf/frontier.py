"""The reward-KL frontier: every method swept over the knob that holds it near the SFT policy,
each point a run of the method's own stage in its own folder, all points evaluated together,
then reward against KL to the SFT policy, one curve per method, one panel per scorer (as
Rafailov et al. 2023, Fig. 2), with the table beside the plot.

A method is a config entry `{stage, config, knob, values, overrides}`: any training stage of
`cli.STAGES` whose config has `train.output_dir`. Best-of-N needs no training: its points are
evaluation policies (`best_of: {values: [N, ...], scorer: NAME}`) over the reference.

A rerun skips the points whose export exists, refusing one trained under another config (its
`train.steps` included), and continues an interrupted one from its last checkpoint (each point's
stage refuses a folder whose run was configured differently); the evaluation and the report are
redone whole.
"""

import dataclasses
import json
from pathlib import Path

from jaxrlhf import config as cfg
from jaxrlhf import outputs, parallel, rewards
from jaxrlhf.best_of_n import BestOfN
from jaxrlhf.config import check
from jaxrlhf.errors import ConfigError
from jaxrlhf.stages import common
from jaxrlhf.stages.rollout import off_policy_settings

REFERENCE = "sft"  # the evaluation's name for the reference policy, every curve's origin


@dataclasses.dataclass(frozen=True)
class Sweep:
    stage: str  # a training stage of cli.STAGES (ppo, dpo, online_dpo, ...)
    config: str  # its config file
    knob: str  # the key swept, e.g. ppo.kl_coef or beta
    values: tuple[float, ...]
    overrides: tuple[str, ...] = ()  # key=value for every point, before the knob and output_dir

    def __post_init__(self):
        check(bool(self.values), f"values of {self.knob} must name at least one point")
        # A point's folder and policy are named by its value to 6 significant digits (`:g`): two
        # values alike in those would be one run, trained once and reported twice.
        named: dict[str, float] = {}
        for value in self.values:
            name = f"{self.knob}={value:g}"
            check(name not in named, f"values {named.get(name)!r} and {value!r} of {self.knob} are one point "
                                     f"({name}, its folder's name); give values that differ in 6 significant digits")
            named[name] = value


@dataclasses.dataclass(frozen=True)
class BestOfSweep:
    values: tuple[int, ...]  # the N of each point
    scorer: str  # the evaluation scorer that picks the best reply

    def __post_init__(self):
        check(len(set(self.values)) == len(self.values), f"best_of.values={list(self.values)} names a point twice")


@dataclasses.dataclass(frozen=True)
class FrontierConfig:
    evaluate: str  # an evaluation config: prompts, scorers, sampling, reference (the SFT policy); its policies are replaced
    methods: dict[str, Sweep] = dataclasses.field(default_factory=dict)
    best_of: BestOfSweep | None = None
    output_dir: str = "runs/frontier"  # points/METHOD/KNOB=VALUE/, eval/, report/
    evaluate_overrides: tuple[str, ...] = ()

    def __post_init__(self):
        check(bool(self.methods) or self.best_of is not None, "methods or best_of must name at least one sweep")
        check(REFERENCE not in self.methods and "best_of_n" not in self.methods,
              f"methods may not be called {REFERENCE!r} or 'best_of_n' (the reference and best-of-N's curve)")


@dataclasses.dataclass(frozen=True)
class Point:
    method: str
    knob: str
    value: float
    name: str  # the policy's name in the evaluation
    module: object  # the stage module
    config: object  # the stage config of this point


def plan(config: FrontierConfig) -> str:
    sweeps = [f"{m} ({s.knob} in {list(s.values)})" for m, s in config.methods.items()]
    if config.best_of is not None:
        sweeps.append(f"best-of-N (N in {list(config.best_of.values)}, by {config.best_of.scorer})")
    return f"reward-KL frontier: {', '.join(sweeps)}, evaluated by {config.evaluate} -> {config.output_dir}/report"


def points(config: FrontierConfig) -> list[Point]:
    """Every training point's stage config, each validated (so a typo stops the sweep before
    its first run), writing to `output_dir/points/METHOD/KNOB=VALUE`."""
    from jaxrlhf import cli

    out = []
    for method, sweep in config.methods.items():
        module, config_cls = cli.stage(sweep.stage)
        if not cli.trains(config_cls):
            raise ConfigError(f"methods.{method}.stage={sweep.stage!r} trains no policy; choose a training stage")
        for value in sweep.values:
            folder = Path(config.output_dir) / "points" / method / f"{sweep.knob}={value:g}"
            try:
                stage_config = cfg.load(config_cls, sweep.config,
                                        [*sweep.overrides, f"{sweep.knob}={value!r}", f"train.output_dir={folder}"])
            except ConfigError as e:
                raise ConfigError(f"methods.{method} at {sweep.knob}={value:g}: {e}") from None
            stage_config = rewards.locate_reward_functions(stage_config, Path(sweep.config).parent)
            out.append(Point(method, sweep.knob, value, f"{method} {sweep.knob.rpartition('.')[2]}={value:g}", module,
                             stage_config))
    return out


def evaluation(config: FrontierConfig, train_points: list[Point]):
    """The evaluation of the reference, every training point's export and every best-of-N point."""
    from jaxrlhf.evaluate import EvaluateConfig

    base = cfg.load(EvaluateConfig, config.evaluate, list(config.evaluate_overrides))
    policies = {REFERENCE: base.reference, **{p.name: str(Path(p.config.train.output_dir) / "final")
                                              for p in train_points}}
    if config.best_of is not None:
        policies |= {f"best_of_{n}": BestOfN(n, REFERENCE, config.best_of.scorer) for n in config.best_of.values}
    # A trained point's x is its replies' KL, which sampling off the tempered softmax leaves unknown.
    off_policy = off_policy_settings(base.sampling)
    check(not off_policy, f"{config.evaluate}: sampling with {', '.join(off_policy)} gives no KL to plot the points "
                          "at; the frontier samples from the policies as they are (drop those settings)")
    evaluate_config = dataclasses.replace(base, policies=policies,
                                          output_dir=str(Path(config.output_dir) / "eval"))
    return rewards.locate_reward_functions(evaluate_config, Path(config.evaluate).parent)


def rows(config: FrontierConfig, train_points: list[Point], results: dict) -> list[dict]:
    """One row per point (the reference first): KL to the reference and each scorer's mean.
    A trained policy's KL is the evaluation's `kl_to_reference` (the mean summed log ratio
    of its sampled replies); best-of-N's is log N - (N - 1) / N, its plug-in estimate beside."""
    scorers = [k[: -len("/mean")] for k in results[REFERENCE] if k.endswith("/mean")]

    def row(method, knob, value, policy, kl, kl_estimate=None):
        r = results[policy]
        return {"method": method, "knob": knob, "value": value, "policy": policy, "kl": kl,
                "kl_estimate": kl_estimate, **{s: r[f"{s}/mean"] for s in scorers}}

    out = [row(REFERENCE, None, None, REFERENCE, 0.0)]
    out += [row(p.method, p.knob, p.value, p.name, results[p.name]["kl_to_reference"]) for p in train_points]
    if config.best_of is not None:
        for n in config.best_of.values:
            info = results[f"best_of_{n}"]["_best_of_n"]
            out.append(row("best_of_n", "N", n, f"best_of_{n}", info["kl_bound"], info["kl_estimate"]))
    return out


def table(table_rows: list[dict]) -> list[str]:
    scorers = [k for k in table_rows[0] if k not in ("method", "knob", "value", "policy", "kl", "kl_estimate")]
    head = ["| method | knob | value | KL to SFT (best-of-N: the bound log N - (N - 1) / N) | best-of-N KL plug-in "
            "estimate (the evaluation's kl_to_reference) | " + " | ".join(scorers) + " |",
            "|---|---|---|---|---|" + "---|" * len(scorers)]
    return head + [
        f"| {r['method']} | {r['knob'] or ''} | {'' if r['value'] is None else format(r['value'], 'g')} | "
        f"{r['kl']:.3f} | {'' if r['kl_estimate'] is None else format(r['kl_estimate'], '.3f')} | "
        + " | ".join(f"{r[s]:+.3f}" for s in scorers) + " |" for r in table_rows]


def plot(path: Path, table_rows: list[dict]) -> None:
    """Mean score against KL to SFT, one panel per scorer, one curve per method (ordered by
    KL); best-of-N at its bound (solid) and its plug-in estimate (dotted). The KL axis is
    linear up to 1 nat and logarithmic beyond, so a method that drifts far (offline DPO at a
    small beta) does not squeeze the others into the first tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = [k for k in table_rows[0] if k not in ("method", "knob", "value", "policy", "kl", "kl_estimate")]
    methods = list(dict.fromkeys(r["method"] for r in table_rows[1:]))
    fig, axes = plt.subplots(1, len(scorers), figsize=(5.5 * len(scorers), 4.2), squeeze=False)
    for ax, s in zip(axes[0], scorers):
        ref = table_rows[0]
        ax.scatter([0.0], [ref[s]], marker="*", s=160, color="black", zorder=3, label=REFERENCE)
        for i, m in enumerate(methods):
            rs = sorted((r for r in table_rows if r["method"] == m), key=lambda r: r["kl"])
            color = f"C{i}"
            bound = " at the KL bound log N - (N-1)/N" if m == "best_of_n" else ""
            ax.plot([r["kl"] for r in rs], [r[s] for r in rs], "o-", color=color,
                    label=f"{m} ({rs[0]['knob']}){bound}")
            if m == "best_of_n":
                ax.plot([r["kl_estimate"] for r in rs], [r[s] for r in rs], "o:", color=color, alpha=0.6,
                        label="best_of_n at the plug-in KL estimate (the evaluation's kl_to_reference)")
            for r in rs:
                ax.annotate(f"{r['value']:g}", (r["kl"], r[s]), textcoords="offset points", xytext=(3, 3),
                            fontsize=7, color=color)
        ax.set_title(f"judged by {s}")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL to the SFT policy (nats; log scale above 1)")
        ax.set_ylabel(f"mean {s} score")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finished(train_points: list[Point]) -> set[str]:
    """The names of the points whose export exists, each checked to be the run its config
    describes, length included (a finished point is reused, never retrained)."""
    done = set()
    for p in train_points:
        out = Path(p.config.train.output_dir)
        if (out / "final" / "config.json").exists():
            common.check_finished_run(out, p.config)
            done.add(p.name)
    return done


def preflight(config: FrontierConfig, resume: bool = False) -> tuple[list[Point], set[str], object]:
    """What the run checks before it trains: every point's config (the knob a key of its stage,
    each value valid, each naming its own point), the finished points' configs against their
    runs, and the evaluation's -> (points, names of the finished ones, evaluation config)."""
    del resume
    train_points = points(config)
    return train_points, finished(train_points), evaluation(config, train_points)


def run(config: FrontierConfig, resume: bool = False) -> Path:
    """Train every unfinished point, evaluate them all, write the report folder whole. A rerun
    always picks up where the last stopped, so `resume` changes nothing."""
    from jaxrlhf import evaluate

    train_points, done, evaluate_config = preflight(config, resume)
    report = Path(config.output_dir) / "report"
    outputs.check_replaceable(report, "frontier")
    for i, p in enumerate(train_points, 1):
        head = f"[{i}/{len(train_points)}] {p.name}"
        if p.name in done:
            print(f"{head}: finished ({p.config.train.output_dir}/final), skipped")
            continue
        print(f"\n{head}: {p.module.plan(p.config)}", flush=True)
        p.module.run(p.config, resume=True)
    results = json.loads((evaluate.run(evaluate_config) / "results.json").read_text())
    table_rows = rows(config, train_points, results)
    lines = table(table_rows)

    def build(folder: Path):
        (folder / "frontier.md").write_text(
            "# Reward against KL to the SFT policy\n\n![frontier](frontier.png)\n\n" + "\n".join(lines) + "\n")
        (folder / "frontier.json").write_text(outputs.json_text(table_rows))
        plot(folder / "frontier.png", table_rows)

    def write():
        outputs.replace_folder(report, "frontier", build)
        print("\n".join(lines))
        print(f"frontier table and plot in {report}")

    parallel.on_main(write, report)
    return report
